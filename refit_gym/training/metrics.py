"""Each scenario's evaluation protocol (DESIGN section 7), batched in torch.

Collaborative filtering, as DiffRec computes it: all items ranked with history masked
(validation masks train; test masks train + valid); Recall = hits / |ground truth|; NDCG's ideal
DCG runs over min(K, |ground truth|) positions; averages over all users, a user with no ground
truth counting 0. Sequential, as DreamRec and DiffuRec compute it: one target per row, all items
ranked, nothing masked, HR@K and NDCG@K averaged over every row (DreamRec's own code drops the
last partial batch of 100; this evaluates every row), mean and spread over sampling seeds.

Under ``torchrun`` each rank evaluates every ``world_size``-th batch and one reduction sums the
results: every rank gets the numbers one process gets (up to the order of float sums).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from refit_gym.backbones import Backbone
from refit_gym.data import Dataset, InteractionData, SequenceData, dense_rows
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.distributed import current
from refit_gym.specs import PretrainConfig

DEFAULT_KS: tuple[int, ...] = (10, 20)
# What fine-tuning and the peers' grids select by (validation): the project's headline metric.
SELECTION_METRIC = "ndcg@20"


def ranking_metrics(scores: Tensor, targets: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-user metrics. scores (B, n) with masked items at -inf; targets (B, n) in {0, 1}.

    Returns ``{"recall@K": (B,), "ndcg@K": (B,)}`` for each K in ``ks``.
    """
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hits = targets.gather(1, top).gt(0).to(torch.float64)
    n_truth = targets.gt(0).sum(1)
    discount = 1.0 / torch.log2(torch.arange(k_max, device=scores.device, dtype=torch.float64) + 2)
    ideal = discount.cumsum(0)
    has_truth = n_truth > 0
    out: dict[str, Tensor] = {}
    for k in ks:
        k_eff = min(k, k_max)
        hits_k = hits[:, :k_eff]
        recall = hits_k.sum(1) / n_truth.clamp(min=1)
        dcg = (hits_k * discount[:k_eff]).sum(1)
        idcg = ideal[(n_truth.clamp(max=k_eff) - 1).clamp(min=0)]
        out[f"recall@{k}"] = torch.where(has_truth, recall, torch.zeros_like(recall))
        out[f"ndcg@{k}"] = torch.where(has_truth, dcg / idcg, torch.zeros_like(dcg))
    return out


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Switch ``module`` to eval mode for the block, then restore its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _live(progress: bool) -> bool:
    """Evaluation bars only on a terminal (to a file they would be carriage-return redraws)."""
    return progress and sys.stderr.isatty()


class Ranker(Protocol):
    """Anything that scores items for a batch: a backbone (its own inference) or a peer."""

    def rank_scores(self, batch: dict[str, Tensor], chain: GaussianDiffusion | None = None,
                    generator: torch.Generator | None = None) -> Tensor: ...


@contextmanager
def _evaluating(model: Ranker) -> Iterator[Ranker]:
    if isinstance(model, nn.Module):
        with eval_mode(model):
            yield model
    else:
        yield model


@torch.no_grad()
def evaluate_cf(
    backbone: Ranker,
    data: InteractionData,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    chain: GaussianDiffusion | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Validation and test metrics of every user from ONE reverse chain per user.

    Both rank the same scores (the chain starts from the training history); only the masks and
    targets differ. Returns ``{"valid": {"recall@10": ..., ...}, "test": {...}}``.
    """
    keys = [f"{name}@{k}" for k in ks for name in ("recall", "ndcg")]
    totals = {split: dict.fromkeys(keys, 0.0) for split in ("valid", "test")}
    dist = current()
    starts = dist.share(range(0, data.n_users, batch_size))
    with _evaluating(backbone):
        for start in tqdm(starts, desc="evaluate", disable=not _live(progress), leave=False):
            users = np.arange(start, min(start + batch_size, data.n_users))
            batch = data.train_batch(users, device)
            history = batch["history"]
            scores = backbone.rank_scores(batch, chain, generator)
            scores = scores.masked_fill(history > 0, -torch.inf)
            valid = dense_rows(data.valid, users, device)
            for split, targets in (("valid", valid), ("test", None)):
                if targets is None:
                    scores.masked_fill_(valid > 0, -torch.inf)
                    targets = dense_rows(data.test, users, device)
                for key, per_user in ranking_metrics(scores, targets, ks).items():
                    totals[split][key] += per_user.sum().item()
    sums = iter(dist.sum_floats(v for m in totals.values() for v in m.values()))
    return {s: {k: next(sums) / data.n_users for k in m} for s, m in totals.items()}


def next_item_metrics(scores: Tensor, targets: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-row HR@K and NDCG@K of one target each: scores (B, n), nothing masked; targets (B,).

    The target's rank is the number of items scored strictly above it (so ties do not push it
    down); HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2). O(B n), no sort.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))
    rank = (scores > target_scores).sum(1).to(torch.float64)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = (rank < k).to(torch.float64)
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(rank + 2)
    return out


@torch.no_grad()
def evaluate_sequential(
    backbone: Ranker,
    data: SequenceData,
    *,
    ks: Sequence[int] = (10, 20, 50),
    batch_size: int = 8192,
    device: torch.device | str = "cpu",
    chain: GaussianDiffusion | None = None,
    sampling_seeds: Sequence[int] = (0, 1, 2),
    splits: Sequence[str] = ("valid", "test"),
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """HR@K and NDCG@K of every row of ``splits``, all items ranked, nothing masked, each
    sampling seed one run of the backbone's own (stochastic) sampler on ``chain`` (default:
    all T steps); batch b of seed s draws from a generator seeded s + b * 2^32, whichever
    process evaluates it. Returns the means over seeds under each split, their population std
    under ``"<split>_std"``, and the means split by whether the row's target was ever a training
    target under ``"<split>_seen"`` and ``"<split>_unseen"``."""
    out: dict[str, dict[str, float]] = {}
    keys = [f"{name}@{k}" for k in ks for name in ("hr", "ndcg")]
    dist = current()
    with _evaluating(backbone):
        for split in splits:
            seen = torch.from_numpy(data.target_in_train(split)).to(device)
            rows = len(data.targets[split])
            per_row = torch.zeros(len(keys), len(sampling_seeds), rows, dtype=torch.float64,
                                  device=device)  # (metrics, S, N), this rank's batches filled
            units = [(i, seed, start) for i, seed in enumerate(sampling_seeds)
                     for start in range(0, rows, batch_size)]
            for i, seed, start in tqdm(dist.share(units), desc=f"evaluate {split}",
                                       disable=not _live(progress), leave=False):
                generator = torch.Generator(device).manual_seed(
                    seed + (start // batch_size << 32))
                stop = min(start + batch_size, rows)
                batch = data.batch(split, np.arange(start, stop), device)
                metrics = next_item_metrics(backbone.rank_scores(batch, chain, generator),
                                            batch["target"], ks)
                per_row[:, i, start:stop] = torch.stack([metrics[k] for k in keys])
            stacked = dict(zip(keys, dist.sum_(per_row), strict=True))  # each (S, N)
            out[split] = {k: v.mean().item() for k, v in stacked.items()}
            out[f"{split}_std"] = {k: v.mean(1).std(unbiased=False).item()
                                   for k, v in stacked.items()}
            for name, mask in ((f"{split}_seen", seen), (f"{split}_unseen", ~seen)):
                out[name] = {k: v[:, mask].mean().item() if bool(mask.any()) else 0.0
                             for k, v in stacked.items()}
                out[name]["rows"] = int(mask.sum())
    return out


def evaluate(backbone: Ranker, data: Dataset, config: PretrainConfig, *,
             device: torch.device | str = "cpu", chain: GaussianDiffusion | None = None,
             sampling_seeds: int | None = None,
             progress: bool = False) -> dict[str, dict[str, float]]:
    """The backbone's own evaluation protocol for ``data`` (DESIGN 7), configured by a spec's
    [pretrain] section: ``chain`` is the reverse chain (default: the backbone's own T steps);
    a stochastic backbone is scored over ``sampling_seeds`` seeds 0, 1, ... (default:
    ``final_sampling_seeds``)."""
    if isinstance(data, InteractionData):
        return evaluate_cf(backbone, data, ks=config.ks, batch_size=config.eval_batch_size,
                           device=device, chain=chain, progress=progress)
    seeds = config.final_sampling_seeds if sampling_seeds is None else sampling_seeds
    return evaluate_sequential(backbone, data, ks=config.ks, batch_size=config.eval_batch_size,
                               device=device, chain=chain, sampling_seeds=range(seeds),
                               progress=progress)


def selection_chain(backbone: Backbone, config: PretrainConfig) -> GaussianDiffusion | None:
    """The cheaper chain of pretraining's selection passes (None: the backbone's own)."""
    return backbone.diffusion.respaced(config.selection_steps) if config.selection_steps else None


def format_metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A small aligned text table: one row per entry of ``rows`` (e.g. valid, test), one column
    per metric of the first row, grouped by metric."""
    first = [k for k in next(iter(rows.values()), {}) if "@" in k]
    names = list(dict.fromkeys(k.split("@")[0] for k in first))  # recall, ndcg / hr, ndcg
    keys = sorted(first, key=lambda k: (names.index(k.split("@")[0]), int(k.split("@")[1])))
    width = max(len(name) for name in rows) if rows else 5
    lines = [" ".join([" " * width, *(f"{k:>9}" for k in keys)])]
    for name, metrics in rows.items():
        lines.append(" ".join([f"{name:<{width}}", *(f"{metrics[k]:9.4f}" for k in keys)]))
    return "\n".join(lines)
