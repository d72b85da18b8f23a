"""Terminal rewards R(scores(x_0); episode) of the denoising MDP, for every scenario.

A reward is split in two so that the expensive part runs once per episode: ``relevance``
turns the episode's target items y (B, n) into a per-item weight tensor at reset, and
``__call__`` scores the final item scores (B, n) against it at the last step, in O(B n). Items
the episode's input already shows (CF: the history) are masked from rankings; a sequential
episode masks nothing (``visible`` None).

Collaborative signal: the target is propagated over an item graph S, never formed densely.
- CF (:class:`Propagator`): S = D_I^-1/2 R^T D_U^-1 R D_I^-1/2 (user-item-user-item) over the
  training matrix R, exactly with two sparse products per hop (O(B nnz(R)) per batch), or
  through a rank-r factorisation S ~ V diag(s^2) V^T from a truncated SVD of
  D_U^-1/2 R D_I^-1/2 (GF-CF), O(n r) per user and O(nnz(R) r) once, cached per dataset.
- Sequential (:class:`TransitionPropagator`): S = D_out^-1/2 C D_in^-1/2 over the item-transition
  counts C of the training rows (C[i, j]: j follows i), one sparse product per hop. The
  collaborative reward may also credit what follows the episode's last history item,
  q = D_out^-1 C from that item (:class:`NextItemPrior`; on a training row q counts the row's
  own last-item-to-target pair among the others).
Both are linear in users (rows) and in items.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from refit_gym.data import InteractionData, SequenceData
from refit_gym.data.fileio import atomic_path
from refit_gym.data.progress import announce
from refit_gym.data.sequences import last_history_items


def _sparse_tensor(matrix: sp.spmatrix, device: torch.device) -> Tensor:
    coo = matrix.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, device=device,
                                   check_invariants=True).coalesce()


def _inverse_power(degrees: np.ndarray, power: float) -> np.ndarray:
    out = np.zeros_like(degrees, dtype=np.float64)
    np.power(degrees, -power, out=out, where=degrees > 0)
    return out


class Propagator:
    """h -> [h S, h S^2, ..., h S^K] for a batch h of shape (B, n_items)."""

    def __init__(
        self,
        train: sp.csr_matrix,
        hops: int,
        rank: int | None = None,
        device: torch.device | str = "cpu",
        cache_dir: str | Path | None = None,
    ) -> None:
        """``rank=None`` propagates exactly; an int uses a rank-``rank`` factorisation of S."""
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.hops, self.rank, self.device = hops, rank, torch.device(device)
        user_deg = np.asarray(train.sum(axis=1)).ravel()
        item_deg = np.asarray(train.sum(axis=0)).ravel()
        if rank is None:
            self.R = _sparse_tensor(train, self.device)
            self.Rt = _sparse_tensor(train.T, self.device)
            self.d_item = torch.tensor(_inverse_power(item_deg, 0.5), dtype=torch.float32,
                                       device=self.device)
            self.d_user = torch.tensor(_inverse_power(user_deg, 1.0), dtype=torch.float32,
                                       device=self.device)
        else:
            vectors, sq_values = _cached_factors(train, user_deg, item_deg, rank, cache_dir)
            self.V = torch.from_numpy(vectors).to(self.device)
            self.s2 = torch.from_numpy(sq_values).to(self.device)

    def __call__(self, h: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        if self.rank is None:
            x = h
            for _ in range(self.hops):
                a = (x * self.d_item).T.contiguous()  # (n, B)
                b = torch.sparse.mm(self.R, a) * self.d_user.unsqueeze(-1)  # (U, B)
                x = torch.sparse.mm(self.Rt, b).T * self.d_item  # (B, n)
                out.append(x)
        else:
            coeffs = h @ self.V  # (B, r)
            for _ in range(self.hops):
                coeffs = coeffs * self.s2
                out.append(coeffs @ self.V.T)
        return out


# The factor cache's format version, part of its key: bump it whenever the normalisation, the
# solver or the stored layout changes, so a stale factorisation is never read back.
FACTORS_FORMAT = 1


def factors_cache_name(train: sp.csr_matrix, rank: int) -> str:
    """The cache file name of ``train``'s rank-``rank`` factors: its sparsity pattern's sha256,
    the rank and :data:`FACTORS_FORMAT`."""
    digest = hashlib.sha256(f"format{FACTORS_FORMAT}".encode())
    digest.update(train.indptr.tobytes() + train.indices.tobytes())
    return f"svd-{digest.hexdigest()[:16]}-r{rank}.npz"


def _cached_factors(train, user_deg, item_deg, rank, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` right singular vectors (n, r) and squared values (r,) of the normalised R."""
    path = Path(cache_dir) / factors_cache_name(train, rank) if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return cached["vectors"], cached["sq_values"]
    n_users, n_items = train.shape
    # A truncated SVD of a large graph takes minutes with nothing else on screen.
    announce(f"reward: computing the rank-{rank} factors of the {n_users} x {n_items} "
             "interaction graph " + (f"once (cached in {path})" if path is not None
                                     else "(no cache directory: not kept)"))
    normalised = sp.diags(_inverse_power(user_deg, 0.5)) @ train @ sp.diags(
        _inverse_power(item_deg, 0.5))
    full = min(normalised.shape)
    if rank >= full - 1:  # ARPACK needs rank < min(shape); small data takes the dense SVD
        _, values, vt = np.linalg.svd(normalised.toarray(), full_matrices=False)
        values, vt = values[:rank], vt[:rank]
    else:
        v0 = np.random.default_rng(0).random(full)  # ARPACK's start vector, for determinism
        _, values, vt = spla.svds(normalised.astype(np.float64), k=rank, v0=v0)
    vectors = vt.T.astype(np.float32)
    sq_values = (values**2).astype(np.float32)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, vectors=vectors, sq_values=sq_values)
    return vectors, sq_values


class TransitionPropagator:
    """h -> [h S, ..., h S^K] over the item-transition graph S = D_out^-1/2 C D_in^-1/2."""

    def __init__(self, transitions: sp.csr_matrix, hops: int,
                 device: torch.device | str = "cpu") -> None:
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.hops, self.device = hops, torch.device(device)
        out_deg = np.asarray(transitions.sum(axis=1)).ravel()
        in_deg = np.asarray(transitions.sum(axis=0)).ravel()
        normalised = sp.diags(_inverse_power(out_deg, 0.5)) @ transitions @ sp.diags(
            _inverse_power(in_deg, 0.5))
        self.St = _sparse_tensor(normalised.T, self.device)  # h S = (S^T h^T)^T

    def __call__(self, h: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        x = h
        for _ in range(self.hops):
            x = torch.sparse.mm(self.St, x.T.contiguous()).T
            out.append(x)
        return out


Propagate = Propagator | TransitionPropagator


class NextItemPrior:
    """histories (B, L) -> q(. | last item) (B, n_items) float32: each row's first-order
    next-item distribution (:meth:`SequenceData.next_item_distribution`) from its latest history
    item (histories right-padded with n_items); zero for an empty history or a last item that no
    training row continues. The rows are selected from the sparse matrix (no one-hot product,
    no dense n x n). The Markov peer ranks by it; the collaborative reward mixes it in."""

    def __init__(self, data: SequenceData, device: torch.device | str = "cpu") -> None:
        self.n_items = data.n_items
        self.distribution = _sparse_tensor(data.next_item_distribution(), torch.device(device))

    def __call__(self, history: Tensor) -> Tensor:
        last = last_history_items(history, self.n_items)
        rows = self.distribution.index_select(0, last.clamp(min=0)).to_dense()
        return rows * (last >= 0).unsqueeze(1)


def _ranking_scores(scores: Tensor, visible: Tensor | None) -> Tensor:
    """Scores as the scenario ranks them: items the input shows (CF history) are excluded."""
    return scores if visible is None else scores.masked_fill(visible > 0, -torch.inf)


class Reward(ABC):
    """R(scores; episode). Subclasses say what the target means (``relevance``) and how final
    scores earn reward. ``visible`` (B, n) marks the items the episode's input shows (masked
    from rankings), or is None when nothing is masked."""

    name: str
    on_state: ClassVar[bool] = False  # True: scored on the final state x_0, not item scores

    @abstractmethod
    def relevance(self, target: Tensor, visible: Tensor | None,
                  inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        """Per-episode weights (B, n) from the target items (B, n); ``inputs``: the episodes'
        inputs (sequential: ``"history"`` (B, L)), for a reward that reads them."""

    @abstractmethod
    def __call__(self, scores: Tensor, relevance: Tensor, visible: Tensor | None) -> Tensor:
        """Rewards (B,) float32 of final item scores (B, n) (or states, if ``on_state``)."""


class CollaborativeReward(Reward):
    """sum_i p_i log softmax(x0 / tau)_i with p ~ y + sum_k alpha_k y S^k + beta q(. | last
    item) (cross-entropy); the last term (sequential, ``next_item``) credits the items that
    follow the episode's latest history item in the training transitions."""

    name = "collaborative"

    def __init__(self, propagator: Propagate | None, alphas: Sequence[float], tau: float,
                 exclude_history: bool, next_item: NextItemPrior | None = None,
                 beta: float = 0.0) -> None:
        if alphas and propagator is None:
            raise ValueError("alphas need a propagator")
        if beta and next_item is None:
            raise ValueError("a transition weight needs the next-item prior")
        self.propagator, self.alphas = propagator, list(alphas)
        self.tau, self.exclude_history = tau, exclude_history
        self.next_item, self.beta = next_item, beta

    def relevance(self, target: Tensor, visible: Tensor | None,
                  inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        p = target.clone()
        if self.alphas:
            for alpha, hop in zip(self.alphas, self.propagator(target)):
                p.add_(hop, alpha=alpha)
        if self.beta:
            if inputs is None or "history" not in inputs:
                raise ValueError("transition_weight scores the episode's last history item: "
                                 "pass the episodes' inputs (a sequential id's)")
            p.add_(self.next_item(inputs["history"]), alpha=self.beta)
        if self.exclude_history and visible is not None:
            p.masked_fill_(visible > 0, 0.0)
        p.clamp_(min=0.0)  # a low-rank S can dip below zero
        return p.div_(p.sum(-1, keepdim=True).clamp(min=1e-12))

    def __call__(self, scores: Tensor, relevance: Tensor, visible: Tensor | None) -> Tensor:
        # sum_i p_i (l_i - logsumexp(l)) = p . l - logsumexp(l) sum_i p_i; p is 0 on excluded
        # items, so only the normaliser needs the mask.
        logits = scores / self.tau
        normaliser_logits = logits.masked_fill(visible > 0, -torch.inf) if (
            self.exclude_history and visible is not None) else logits
        lse = torch.logsumexp(normaliser_logits, dim=-1)
        return ((relevance * logits).sum(-1) - lse * relevance.sum(-1)).float()


class HitReward(Reward):
    """1 if any of the top-k non-history items is in the target, else 0 (binary, sparse)."""

    name = "hit"

    def __init__(self, k: int = 20) -> None:
        self.k = k

    def relevance(self, target: Tensor, visible: Tensor | None,
                  inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        return target.clone()

    def __call__(self, scores: Tensor, relevance: Tensor, visible: Tensor | None) -> Tensor:
        top = _ranking_scores(scores, visible).topk(min(self.k, scores.shape[-1]), dim=-1).indices
        return relevance.gather(-1, top).gt(0).any(-1).float()


class NDCGReward(Reward):
    """NDCG@k of the non-history ranking; graded when alphas are given.

    Graded relevance: target items 1, other items sum_k alpha_k (y S^k)_i, so a ranking earns
    credit for collaboratively plausible items rather than only for exact hits.
    """

    name = "ndcg"

    def __init__(self, k: int = 20, propagator: Propagate | None = None,
                 alphas: Sequence[float] = ()) -> None:
        if alphas and propagator is None:
            raise ValueError("graded NDCG needs a propagator")
        self.k, self.propagator, self.alphas = k, propagator, list(alphas)

    def relevance(self, target: Tensor, visible: Tensor | None,
                  inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        rel = target.clone()
        if self.alphas:
            graded = sum(a * hop for a, hop in zip(self.alphas, self.propagator(target)))
            rel = torch.where(target > 0, target, graded.clamp(min=0.0))
        return rel if visible is None else rel.masked_fill(visible > 0, 0.0)

    def __call__(self, scores: Tensor, relevance: Tensor, visible: Tensor | None) -> Tensor:
        k = min(self.k, scores.shape[-1])
        discount = 1.0 / torch.log2(torch.arange(k, device=scores.device,
                                                 dtype=torch.float32) + 2)
        top = _ranking_scores(scores, visible).topk(k, dim=-1).indices
        dcg = (relevance.gather(-1, top) * discount).sum(-1)
        idcg = (relevance.topk(k, dim=-1).values * discount).sum(-1)
        return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg))


class NegativeMSEReward(Reward):
    """-mean (x0 - x*)^2 to the episode's target state x*: the backbone's own regression loss.

    CF: x* is the whole training history (uninformative by design); sequential: x* = E[target]
    (DreamRec's loss), with ``item_embeddings`` E (n_items, d).
    """

    name = "neg_mse"
    on_state = True

    def __init__(self, item_embeddings: Tensor | None = None) -> None:
        self.item_embeddings = item_embeddings

    def relevance(self, target: Tensor, visible: Tensor | None,
                  inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        if self.item_embeddings is not None:  # target @ E over the few target items, O(nnz d)
            rows, items = target.nonzero(as_tuple=True)
            weighted = self.item_embeddings[items] * target[rows, items].unsqueeze(-1)
            return torch.zeros(len(target), self.item_embeddings.shape[1],
                               device=target.device).index_add_(0, rows, weighted)
        return target if visible is None else (target + visible).clamp(max=1.0)

    def __call__(self, scores: Tensor, relevance: Tensor, visible: Tensor | None) -> Tensor:
        return -(scores - relevance).pow(2).mean(-1)


REWARD_PARAMS: dict[str, set[str]] = {
    "collaborative": {"alphas", "tau", "exclude_history", "propagation", "rank",
                      "transition_weight"},
    "hit": {"k"},
    "ndcg": {"k", "alphas", "propagation", "rank"},
    "neg_mse": set(),
}


def make_reward(
    name: str, params: Mapping[str, Any], data: InteractionData | SequenceData,
    device: torch.device | str = "cpu", cache_dir: str | Path | None = None,
    item_embeddings: Tensor | None = None,
) -> Reward:
    """Build a reward by name over ``data``'s training split (its item graph).

    CF: ``propagation`` "exact" or "lowrank" (with ``rank``); sequential: the transition graph,
    exact. ``item_embeddings`` (sequential) is the target-state table of ``neg_mse``.
    """
    if name not in REWARD_PARAMS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARD_PARAMS)}")
    unknown = sorted(set(params) - REWARD_PARAMS[name])
    if unknown:
        raise ValueError(f"reward {name!r} got unknown parameters {unknown}; "
                         f"allowed: {sorted(REWARD_PARAMS[name])}")
    alphas = list(params.get("alphas", []))
    propagator: Propagate | None = None
    if alphas:
        mode = params.get("propagation", "lowrank")
        if mode not in ("exact", "lowrank"):
            raise ValueError(f"propagation must be 'exact' or 'lowrank', got {mode!r}")
        if isinstance(data, SequenceData):
            if mode != "exact":
                raise ValueError("sequential ids propagate over the item-transition graph "
                                 "exactly: set propagation = 'exact'")
            propagator = TransitionPropagator(data.transitions(), len(alphas), device)
        else:
            rank = int(params.get("rank", 256)) if mode == "lowrank" else None
            propagator = Propagator(data.train, len(alphas), rank, device, cache_dir)
    if name == "collaborative":
        beta = params.get("transition_weight", 0.0)
        if (isinstance(beta, bool) or not isinstance(beta, int | float)
                or not math.isfinite(beta) or beta < 0):
            raise ValueError(f"reward_params transition_weight must be a finite number >= 0, "
                             f"got {beta!r}")
        if beta and not isinstance(data, SequenceData):
            raise ValueError("reward_params transition_weight applies to sequential ids (it "
                             "weights the items that follow the episode's last history item)")
        return CollaborativeReward(
            propagator, alphas, float(params.get("tau", 0.05)),
            bool(params.get("exclude_history", False)),
            NextItemPrior(data, device) if beta else None, beta)
    if name == "hit":
        return HitReward(int(params.get("k", 20)))
    if name == "ndcg":
        return NDCGReward(int(params.get("k", 20)), propagator, alphas)
    return NegativeMSEReward(item_embeddings)
