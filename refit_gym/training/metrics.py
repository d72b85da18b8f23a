"""Each scenario's evaluation protocol, batched in torch.

Collaborative filtering, as DiffRec computes it: all items ranked with history masked
(validation masks train; test masks train + valid); Recall = hits / |ground truth|; NDCG's ideal
DCG runs over min(K, |ground truth|) positions; averages over all users, a user with no ground
truth counting 0. Sequential, as DreamRec and DiffuRec compute it: one target per row, all items
ranked, nothing masked, HR@K and NDCG@K averaged over every row (DreamRec's own code drops the
last partial batch of 100; this evaluates every row), mean and spread over sampling seeds.

Ties (one rule, both scenarios): a tie between a relevant item and other items is never
resolved in the relevant item's favour; each metric is its expected value under a uniformly
random order of the tied items. An item scored below ``above`` items and level with ``tied - 1``
others sits at a position uniform on above, ..., above + tied - 1, so its hit probability at K
and its expected discount are exact closed forms (:func:`tie_expectations`); with several
relevant items (CF) the expectations add up by linearity. A model whose scores tie by
construction (popularity) therefore scores what a random order of its tied items would, on
average, and tie-free scores give the usual numbers.

Spreads over seeds are sample standard deviations (n - 1), from :func:`sample_std` everywhere.

Under ``torchrun`` each rank evaluates every ``world_size``-th batch and one reduction sums the
results: every rank gets the numbers one process gets (up to the order of float sums).
"""

from __future__ import annotations

import statistics
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


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1) of ``values``; 0.0 for a single value (one seed
    has no spread to report)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _discount_sums(k: int, device: torch.device) -> Tensor:
    """D (k + 1,) float64: D[p] = sum over positions q < p of 1 / log2(q + 2)."""
    discount = 1.0 / torch.log2(torch.arange(k, device=device, dtype=torch.float64) + 2)
    return torch.cat([discount.new_zeros(1), discount.cumsum(0)])


def tie_expectations(above: Tensor, tied: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """An item's P(position < k) and E[1(position < k) / log2(position + 2)] (float64, the
    shape of ``above``) when ``above`` items score strictly higher and ``tied`` items
    (itself included, so >= 1) score the same: its position (0-based) is uniform on
    above, ..., above + tied - 1 under a random order of the tied items."""
    sums = _discount_sums(k, above.device)
    low, high = above.clamp(max=k), (above + tied).clamp(max=k)
    size = tied.to(torch.float64)
    return (high - low).to(torch.float64) / size, (sums[high] - sums[low]) / size


def ranking_metrics(scores: Tensor, targets: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-user metrics. scores (B, n) with masked items at -inf; targets (B, n) in {0, 1}.

    Returns ``{"recall@K": (B,), "ndcg@K": (B,)}`` for each K in ``ks``: the expected values
    under a random order of tied items (module docstring). One top-k and two passes over
    (B, n); the rest runs over the relevant items only.
    """
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).values  # (B, k_max), descending
    boundary = top[:, -1:]
    # Tie-group size of each top value: a value above the k_max-th score has all its equals in
    # the top; the k_max-th score's equals are counted over the whole row.
    within = (top.unsqueeze(2) == top.unsqueeze(1)).count_nonzero(2)
    at_boundary = (scores == boundary).count_nonzero(1).unsqueeze(1)
    counts = torch.where(top == boundary, at_boundary, within)
    rows, items = targets.gt(0).nonzero(as_tuple=True)  # the relevant items, (R,) each
    relevant_scores = scores[rows, items].unsqueeze(1)
    # Items strictly above each relevant one, exact below k_max (one under the k_max-th score
    # has all k_max above it and counts nothing at any K <= k_max); then it scores exactly
    # top[row, above], whose group size is its tie count.
    above = k_max - torch.searchsorted(top.flip(1)[rows], relevant_scores, right=True).squeeze(1)
    tied = counts[rows, above.clamp(max=k_max - 1)]
    n_truth = torch.bincount(rows, minlength=scores.shape[0])
    # Each relevant item's slot in a (B, most relevant items) table: row sums in a fixed order
    # (an index_add would sum in the order a GPU's atomics land).
    slot = torch.arange(len(rows), device=rows.device) - (n_truth.cumsum(0) - n_truth)[rows]
    table = torch.zeros(scores.shape[0], max(int(n_truth.max()), 1) if len(rows) else 1,
                        dtype=torch.float64, device=scores.device)

    def row_sums(values: Tensor) -> Tensor:
        return table.index_put((rows, slot), values).sum(1)

    ideal = _discount_sums(k_max, scores.device)
    has_truth = n_truth > 0
    zeros = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    out: dict[str, Tensor] = {}
    for k in ks:
        k_eff = min(k, k_max)
        hit, gain = tie_expectations(above, tied, k_eff)
        recall = row_sums(hit) / n_truth.clamp(min=1)
        dcg = row_sums(gain)
        idcg = ideal[n_truth.clamp(min=1, max=k_eff)]
        out[f"recall@{k}"] = torch.where(has_truth, recall, zeros)
        out[f"ndcg@{k}"] = torch.where(has_truth, dcg / idcg, zeros)
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

    The target sits below the items scored strictly higher and, by the tie rule (module
    docstring), at a uniformly random place among the items level with it: HR@K and NDCG@K
    are the expected hit and discount of that place. O(B n), no sort.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))
    above = (scores > target_scores).count_nonzero(1)
    tied = (scores == target_scores).count_nonzero(1)
    out: dict[str, Tensor] = {}
    for k in ks:
        out[f"hr@{k}"], out[f"ndcg@{k}"] = tie_expectations(above, tied, k)
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
    all T steps); row i of seed s draws the same whatever the batch size and whichever
    process evaluates it (:class:`~refit_gym.backbones.row_noise.RowNoise`). Returns the
    means over seeds under each split, their sample std under ``"<split>_std"``, and the means
    split by whether the row's target was ever a training target under ``"<split>_seen"`` and
    ``"<split>_unseen"``."""
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
                generator = torch.Generator(device).manual_seed(seed)
                stop = min(start + batch_size, rows)
                batch = data.batch(split, np.arange(start, stop), device)
                batch["row"] = torch.arange(start, stop, device=device)  # draws keyed by row
                metrics = next_item_metrics(backbone.rank_scores(batch, chain, generator),
                                            batch["target"], ks)
                per_row[:, i, start:stop] = torch.stack([metrics[k] for k in keys])
            stacked = dict(zip(keys, dist.sum_(per_row), strict=True))  # each (S, N)
            out[split] = {k: v.mean().item() for k, v in stacked.items()}
            out[f"{split}_std"] = {k: sample_std(v.mean(1).tolist())
                                   for k, v in stacked.items()}
            for name, mask in ((f"{split}_seen", seen), (f"{split}_unseen", ~seen)):
                out[name] = {k: v[:, mask].mean().item() if bool(mask.any()) else 0.0
                             for k, v in stacked.items()}
                out[name]["rows"] = int(mask.sum())
    return out


def evaluate(backbone: Ranker, data: Dataset, config: PretrainConfig, *,
             device: torch.device | str = "cpu", chain: GaussianDiffusion | None = None,
             sampling_seeds: int | None = None, splits: Sequence[str] = ("valid", "test"),
             progress: bool = False) -> dict[str, dict[str, float]]:
    """The backbone's own evaluation protocol for ``data``, configured by a spec's
    [pretrain] section: ``chain`` is the reverse chain (default: the backbone's own T steps);
    a stochastic backbone is scored over ``sampling_seeds`` seeds 0, 1, ... (default:
    ``final_sampling_seeds``). ``splits``: the sequential splits to score (a selection pass
    needs only ``("valid",)``); CF always gives both, ranked from one chain."""
    if isinstance(data, InteractionData):
        return evaluate_cf(backbone, data, ks=config.ks, batch_size=config.eval_batch_size,
                           device=device, chain=chain, progress=progress)
    seeds = config.final_sampling_seeds if sampling_seeds is None else sampling_seeds
    return evaluate_sequential(backbone, data, ks=config.ks, batch_size=config.eval_batch_size,
                               device=device, chain=chain, sampling_seeds=range(seeds),
                               splits=splits, progress=progress)


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
