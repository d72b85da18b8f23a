"""Peers: the models a practitioner would try before a diffusion recommender.

Each peer is fitted on the training split and scores items exactly where a backbone does
(``rank_scores``), so the same evaluation code, splits and masks judge both. Hyperparameters
come from a small grid per id in ``agents/<peer>.toml`` (every key a list of values); the grid
point with the best validation NDCG@20 is kept and its test metrics reported.

Collaborative filtering, on the user's training history h (B, n): ``pop`` (item popularity),
``itemknn`` (cosine item-item with shrinkage, top-k neighbours), ``rp3beta`` (random walk
user-item-user with a popularity penalty, top-k), ``ease`` (Steck 2019, closed form with a zero
diagonal) and ``dlae`` (Steck 2020, denoising linear autoencoder, closed form); scores h W.
Sequential, on the row's history: ``pop`` (popularity as a next item), ``markov`` (first-order
item transitions of the training rows, mixed with popularity) and ``sasrec`` (the
self-attentive encoder DreamRec conditions on, trained with cross-entropy over all items).

Item-item weights are sparse (top-k) or, for the closed forms, a dense n x n matrix: those
check the memory they need first and say so instead of swapping.

Peers add no tie-break of their own: items level in score (popularity's equal counts, Markov's
unseen transitions) are judged by the metrics' one tie rule, the expected rank under a random
order of the tied items (:mod:`refit_gym.training.metrics`), so no model gains from an id order
that may correlate with the targets. (An id offset in float32 also vanished for counts >= 1.)
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from refit_gym.backbones.dreamrec import DreamRecConfig, HistoryEncoder
from refit_gym.backbones.next_item import every_position_targets, last_positions
from refit_gym.data import Dataset, InteractionData, SequenceData
from refit_gym.data.progress import Progress
from refit_gym.mdp.rewards import NextItemPrior
from refit_gym.specs import EnvSpec, PretrainConfig, load_agent_hyperparams
from refit_gym.training.identity import data_digest
from refit_gym.training.metrics import SELECTION_METRIC, evaluate
from refit_gym.training.resume import load_state, save_state
from refit_gym.training.selection import Selector


class Peer(ABC):
    """A fitted non-diffusion recommender that scores items for a backbone batch."""

    name: ClassVar[str]
    sequential: ClassVar[bool]

    @abstractmethod
    def fit(self, data: Dataset, seed: int) -> Peer:
        """Fit on ``data``'s training split only; returns self."""

    @abstractmethod
    def rank_scores(self, batch: dict[str, Tensor], chain: Any = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Item scores (B, n_items) for a batch, as a backbone's ``rank_scores``."""


# --------------------------------------------------------------------------- collaborative


def _check_dense_fits(n_items: int, copies: int, what: str) -> None:
    """Refuse a dense n x n float64 computation that would not fit in available memory."""
    need = copies * n_items * n_items * 8
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return
    if available is not None and need > 0.8 * available:
        raise MemoryError(
            f"{what} needs about {need / 2**30:.1f} GiB for dense {n_items} x {n_items} item "
            f"matrices; {available / 2**30:.1f} GiB are available. Use a sparse peer "
            "(itemknn, rp3beta) on this catalogue, or a machine with more memory.")


class MostPopular(Peer):
    """CF: every user gets the items ranked by their number of training users."""

    name, sequential = "pop", False

    def fit(self, data: InteractionData, seed: int) -> MostPopular:
        counts = np.asarray(data.train.sum(axis=0)).ravel()
        self.popularity = torch.from_numpy(counts.astype(np.float32))
        return self

    def rank_scores(self, batch, chain=None, generator=None) -> Tensor:
        history = batch["history"]
        return self.popularity.to(history.device).expand(len(history), -1)


class ItemItem(Peer):
    """Scores h W for an item-item weight W (sparse CSR or a dense tensor)."""

    sequential = False
    weights: sp.csr_matrix | Tensor

    def rank_scores(self, batch, chain=None, generator=None) -> Tensor:
        history = batch["history"]
        if isinstance(self.weights, Tensor):
            return history @ self.weights.to(history.device)
        scores = sp.csr_matrix(history.cpu().numpy()) @ self.weights  # (B, n), sparse rows
        return torch.from_numpy(np.asarray(scores.todense(), dtype=np.float32)).to(
            history.device)


def _top_k_rows(dense_chunk: np.ndarray, k: int, first_row: int) -> sp.csr_matrix:
    """Keep each row's k largest entries (self-similarity removed) as a sparse block."""
    rows = np.arange(len(dense_chunk))
    dense_chunk[rows, first_row + rows] = 0.0
    k = min(k, dense_chunk.shape[1])
    top = np.argpartition(-dense_chunk, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(dense_chunk, top, axis=1)
    keep = values > 0
    return sp.csr_matrix((values[keep], (np.repeat(rows, k)[keep.ravel()], top[keep])),
                         shape=dense_chunk.shape)


def _chunked_top_k(left: sp.csr_matrix, right: sp.csr_matrix, k: int,
                   finish: Callable[[np.ndarray, slice], np.ndarray],
                   chunk: int = 1024) -> sp.csr_matrix:
    """Top-k rows of finish(left @ right) (n x n), built ``chunk`` rows at a time: memory
    O(chunk n), never n x n."""
    n = left.shape[0]
    blocks = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        block = np.asarray((left[rows] @ right).todense(), dtype=np.float64)
        blocks.append(_top_k_rows(finish(block, rows), k, start))
    return sp.vstack(blocks).tocsr().astype(np.float32)


class ItemKNN(ItemItem):
    """Cosine similarity of item columns with shrinkage, top-k neighbours per item."""

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 10.0) -> None:
        if k < 1 or shrink < 0:
            raise ValueError(f"itemknn needs k >= 1 and shrink >= 0, got k={k}, "
                             f"shrink={shrink}")
        self.k, self.shrink = k, shrink

    def fit(self, data: InteractionData, seed: int) -> ItemKNN:
        """cos_ij = r_i . r_j / (|r_i| |r_j| + shrink) over the item columns r of R."""
        train = data.train.astype(np.float64).tocsr()
        norms = np.sqrt(np.asarray(train.multiply(train).sum(axis=0)).ravel())

        def shrunk_cosine(block: np.ndarray, rows: slice) -> np.ndarray:
            return block / (np.outer(norms[rows], norms) + self.shrink + 1e-12)

        self.weights = _chunked_top_k(train.T.tocsr(), train, self.k, shrunk_cosine)
        return self


class RP3beta(ItemItem):
    """P(i -> u -> j)^alpha over the bipartite graph, divided by pop_j^beta; top-k per item."""

    name = "rp3beta"

    def __init__(self, k: int = 100, alpha: float = 1.0, beta: float = 0.5) -> None:
        if k < 1 or alpha <= 0 or beta < 0:
            raise ValueError(f"rp3beta needs k >= 1, alpha > 0, beta >= 0; got k={k}, "
                             f"alpha={alpha}, beta={beta}")
        self.k, self.alpha, self.beta = k, alpha, beta

    def fit(self, data: InteractionData, seed: int) -> RP3beta:
        train = data.train.astype(np.float64).tocsr()
        user_deg = np.asarray(train.sum(axis=1)).ravel()
        item_deg = np.asarray(train.sum(axis=0)).ravel()
        p_ui = sp.diags(np.divide(1.0, user_deg, out=np.zeros_like(user_deg),
                                  where=user_deg > 0)) @ train
        p_iu = sp.diags(np.divide(1.0, item_deg, out=np.zeros_like(item_deg),
                                  where=item_deg > 0)) @ train.T.tocsr()
        p_ui, p_iu = p_ui.power(self.alpha).tocsr(), p_iu.power(self.alpha).tocsr()
        penalty = np.divide(1.0, item_deg ** self.beta, out=np.zeros_like(item_deg),
                            where=item_deg > 0)
        self.weights = _chunked_top_k(p_iu, p_ui, self.k, lambda block, rows: block * penalty)
        return self


class EASE(ItemItem):
    """B = I - P diag(1 / diag(P)), P = (R^T R + lambda I)^-1: the zero-diagonal closed form."""

    name = "ease"

    def __init__(self, l2: float = 500.0) -> None:
        if l2 <= 0:
            raise ValueError(f"ease needs l2 > 0, got {l2}")
        self.l2 = l2

    def fit(self, data: InteractionData, seed: int) -> EASE:
        n = data.n_items
        _check_dense_fits(n, 3, "EASE")
        gram = torch.from_numpy((data.train.T @ data.train).toarray().astype(np.float64))
        gram.diagonal().add_(self.l2)
        inverse = torch.linalg.inv(gram)
        weights = -inverse / inverse.diagonal()
        weights.diagonal().zero_()
        self.weights = weights.float()
        return self


class DLAE(ItemItem):
    """B = (G + Lambda)^-1 G, Lambda = diag(p / (1 - p) diag(G)) + lambda I (dropout-emphasised
    denoising, no zero-diagonal constraint)."""

    name = "dlae"

    def __init__(self, dropout: float = 0.33, l2: float = 1.0) -> None:
        if not 0 < dropout < 1 or l2 < 0:
            raise ValueError(f"dlae needs 0 < dropout < 1 and l2 >= 0, got dropout={dropout}, "
                             f"l2={l2}")
        self.dropout, self.l2 = dropout, l2

    def fit(self, data: InteractionData, seed: int) -> DLAE:
        _check_dense_fits(data.n_items, 3, "DLAE")
        gram = torch.from_numpy((data.train.T @ data.train).toarray().astype(np.float64))
        penalty = self.dropout / (1 - self.dropout) * gram.diagonal() + self.l2
        self.weights = torch.linalg.solve(gram + torch.diag(penalty), gram).float()
        return self


# --------------------------------------------------------------------------- sequential


class NextItemPopular(Peer):
    """Sequential: every row gets the items ranked by how often they are a training target."""

    name, sequential = "pop", True

    def fit(self, data: SequenceData, seed: int) -> NextItemPopular:
        counts = np.bincount(data.targets["train"], minlength=data.n_items).astype(np.float64)
        self.popularity = torch.from_numpy(counts.astype(np.float32))
        return self

    def rank_scores(self, batch, chain=None, generator=None) -> Tensor:
        history = batch["history"]
        return self.popularity.to(history.device).expand(len(history), -1)


class Markov(Peer):
    """P(next | last item) from the training transitions, plus ``smoothing`` x popularity
    (which alone ranks rows with an empty history or an unseen last item)."""

    name, sequential = "markov", True

    def __init__(self, smoothing: float = 0.01) -> None:
        if smoothing < 0:
            raise ValueError(f"markov needs smoothing >= 0, got {smoothing}")
        self.smoothing = smoothing

    def fit(self, data: SequenceData, seed: int) -> Markov:
        self.next_item = NextItemPrior(data)
        popularity = np.bincount(data.targets["train"], minlength=data.n_items).astype(float)
        self.prior = torch.from_numpy((popularity / popularity.sum()).astype(np.float32))
        return self

    def rank_scores(self, batch, chain=None, generator=None) -> Tensor:
        history = batch["history"]
        scores = self.next_item(history.cpu()) + self.smoothing * self.prior
        return scores.to(history.device)


class SASRec(Peer, nn.Module):
    """The self-attentive history encoder (DreamRec's) with item logits c E^T, trained with
    cross-entropy over all items; epochs selected by validation NDCG@20 with the project's one
    :class:`Selector` (``patience`` in epochs), its best weights restored. Given a state file,
    a killed fit resumes at its last finished epoch and ends as the uninterrupted one would.

    ``every_position=False`` passes over every training row, each its history's last output
    against its target. ``True`` is Kang and McAuley's recipe (and ADRec's): an epoch passes
    over each training sequence's latest window only (:attr:`SequenceData.sequence_end_rows`),
    every position of it a target at once under the causal mask. Both see the same (prefix,
    target) pairs while no sequence is longer than ``max_len + 1`` and no row's history is
    empty (DiffuRec's rows); beyond that the long sequences' earlier windows are left out,
    which is what makes the recipe affordable on long-history data (ML-1M: 6,040 windows an
    epoch instead of 982,089 rows)."""

    name, sequential = "sasrec", True

    def __init__(self, hidden: int = 64, dropout: float = 0.1, lr: float = 1e-3,
                 batch_size: int = 256, max_epochs: int = 30, patience: int = 3,
                 every_position: bool = False) -> None:
        nn.Module.__init__(self)
        if (hidden < 1 or not 0 <= dropout < 1 or lr <= 0 or max_epochs < 1 or patience < 1
                or not isinstance(every_position, bool)):
            raise ValueError("sasrec needs hidden >= 1, 0 <= dropout < 1, lr > 0, "
                             "max_epochs >= 1, patience >= 1, every_position true or false; "
                             f"got hidden={hidden}, dropout={dropout}, lr={lr}, "
                             f"max_epochs={max_epochs}, patience={patience}, "
                             f"every_position={every_position!r}")
        self.hidden, self.dropout_p, self.lr = hidden, dropout, lr
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.every_position = every_position

    def fit(self, data: SequenceData, seed: int, state_path: Path | None = None,
            progress: str | None = None) -> SASRec:
        """Train on ``data``'s training rows; ``state_path``: the resume state, written after
        every epoch (model, optimizer, order generator, dropout RNG, selection). ``progress``:
        the label of a line per epoch on standard error (None: silent)."""
        torch.manual_seed(seed)
        self.build(data)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(seed)
        selection = PretrainConfig(ks=(20,), eval_batch_size=4096, final_sampling_seeds=1)
        self.selector = Selector(SELECTION_METRIC, patience=self.patience, start=1)
        identity = {"peer": self.name, "seed": seed, "data": data_digest(data),
                    "params": {"hidden": self.hidden, "dropout": self.dropout_p, "lr": self.lr,
                               "batch_size": self.batch_size, "max_epochs": self.max_epochs,
                               "patience": self.patience}}
        if self.every_position:  # only then: row-by-row states written before the key resume
            identity["params"]["every_position"] = True
        rows = data.sequence_end_rows if self.every_position else np.arange(data.n_train_rows)
        first = 1
        resumed = load_state(state_path, identity, "SASRec") if state_path else None
        if resumed is not None:
            self.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            generator.set_state(resumed["generator"])
            torch.set_rng_state(resumed["random"])
            self.selector = Selector.from_state(resumed["selector"])
            first = resumed["epoch"] + 1
        bar = Progress(self.max_epochs, progress or "", unit="epoch", initial=first - 1,
                       enabled=progress is not None)
        for epoch in range(first, self.max_epochs + 1):
            if self.selector.should_stop(epoch):
                break
            self.train()
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            total_loss, terms = torch.zeros(()), torch.zeros((), dtype=torch.long)
            for start in range(0, len(rows), self.batch_size):
                batch = data.train_batch(order[start : start + self.batch_size])
                logits, targets = self._training_logits(batch)
                loss = nn.functional.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.detach() * len(targets)
                terms += len(targets)
            metrics = evaluate(self, data, selection, splits=("valid",))
            self.selector.offer(epoch, metrics, self.state_dict())
            bar.advance()
            bar.epoch(f"epoch {epoch}", loss=(total_loss / terms).item(), **{
                f"valid {SELECTION_METRIC}": metrics["valid"][SELECTION_METRIC],
                "best epoch": self.selector.best_epoch})
            if state_path is not None:
                save_state(state_path, {
                    "identity": identity, "epoch": epoch, "model": self.state_dict(),
                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                    "random": torch.get_rng_state(), "selector": self.selector.state_dict()})
        bar.close()
        self.load_state_dict(self.selector.best_weights)
        self.eval()
        return self

    def build(self, data: SequenceData) -> SASRec:
        """Fresh weights for ``data``'s items and history length (drawn from torch's RNG)."""
        config = DreamRecConfig(n_items=data.n_items, max_len=data.max_len, hidden=self.hidden,
                                dropout=self.dropout_p)
        self.items = nn.Embedding(data.n_items + 1, self.hidden)
        nn.init.normal_(self.items.weight, 0.0, self.hidden ** -0.5)
        self.encoder = HistoryEncoder(config, self.items)
        self.n_items = data.n_items
        return self

    def selection(self) -> dict[str, Any]:
        """The epoch selection of the last :meth:`fit`: best epoch, curve, weights digest."""
        return self.selector.summary()

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encoder(batch["history"]) @ self.items.weight[: self.n_items].T

    def _training_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The batch's training terms: logits (T, n_items) and their targets (T,); T is the
        batch's rows, or with ``every_position`` every position that has a next item."""
        if not self.every_position:
            return self._logits(batch), batch["target"]
        history = batch["history"]
        targets, has_target = every_position_targets(
            history, batch["target"], last_positions(history, self.n_items))
        outputs = self.encoder.sequence(history)[has_target]
        return outputs @ self.items.weight[: self.n_items].T, targets[has_target]

    @torch.no_grad()
    def rank_scores(self, batch, chain=None, generator=None) -> Tensor:
        return self._logits(batch)


PEERS: dict[tuple[str, bool], type[Peer]] = {
    (cls.name, cls.sequential): cls
    for cls in (MostPopular, ItemKNN, RP3beta, EASE, DLAE, NextItemPopular, Markov, SASRec)
}
PEER_NAMES = tuple(sorted({name for name, _ in PEERS}))


def grid(algo: str, env_id: str) -> list[dict[str, Any]]:
    """The grid of agents/<algo>.toml for ``env_id``: every key a list of values (a scalar is a
    one-value list); the product of them, in file order."""
    table = load_agent_hyperparams(algo, env_id)
    values = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
    return [dict(zip(values, point)) for point in itertools.product(*values.values())]


def tune_peer(algo: str, spec: EnvSpec, data: Dataset, seed: int = 1,
              device: str = "cpu", out_dir: Path | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Fit ``algo`` at every grid point, keep the best by validation NDCG@20, and return its
    metrics (test reported, never used; sequential: also split by seen/unseen targets) with
    the whole grid's validation scores. ``out_dir``: where a trained peer (SASRec) keeps the
    resume state of each grid point (``sasrec_state<i>.pt``); ``progress``: a trained peer
    prints a line per epoch."""
    sequential = isinstance(data, SequenceData)
    if (algo, sequential) not in PEERS:
        scenario = "sequential" if sequential else "collaborative-filtering"
        known = sorted(name for name, seq in PEERS if seq == sequential)
        raise ValueError(f"{algo!r} is not a {scenario} peer; choose from {known}")
    started = time.perf_counter()
    cls = PEERS[(algo, sequential)]
    points = grid(algo, spec.id)
    selector, fits = Selector(SELECTION_METRIC), {}
    for index, params in enumerate(points):
        try:
            peer = cls(**params)
        except TypeError as err:
            raise ValueError(f"agents/{algo}.toml [{spec.id}]: {err}") from err
        if isinstance(peer, SASRec):
            label = f"{algo} {spec.id} seed {seed}, grid point {index + 1}/{len(points)} {params}"
            state = None if out_dir is None else Path(out_dir) / f"sasrec_state{index}.pt"
            peer.fit(data, seed, state, progress=label if progress else None)
        else:
            peer.fit(data, seed)
        metrics = evaluate(peer, data, spec.pretrain, device=device, sampling_seeds=1)
        if selector.offer(index, metrics) and isinstance(peer, SASRec):
            fits = {"selection": peer.selection()}  # the selected point's epochs
    best = selector.best_epoch
    return {"env": spec.id, "algo": algo, "seed": seed, "params": points[best],
            "grid": [{"params": points[p["epoch"]], "valid": p["score"]}
                     for p in selector.curve],
            **selector.best_metrics, **fits, "wall_time_s": time.perf_counter() - started,
            "history": []}
