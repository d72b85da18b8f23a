"""Recall@K and NDCG@K exactly as DiffRec computes them (DESIGN section 6), batched in torch.

Ranking covers all items with history masked (validation masks train; test masks train + valid);
Recall = hits / |ground truth|; NDCG's ideal DCG runs over min(K, |ground truth|) positions;
averages are over all users, a user with no ground truth counting 0 (DiffRec's convention).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from refit_gym.data import InteractionData, dense_rows
from refit_gym.diffusion import GaussianDiffusion

DEFAULT_KS: tuple[int, ...] = (10, 20)


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


@torch.no_grad()
def evaluate(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    data: InteractionData,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    sampling_steps: int = 0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Validation and test metrics of every user from ONE reverse chain per user.

    Both rank the same scores (the chain starts from the training history); only the masks and
    targets differ. Returns ``{"valid": {"recall@10": ..., ...}, "test": {...}}``.
    """
    totals = {split: {} for split in ("valid", "test")}
    starts = range(0, data.n_users, batch_size)
    with eval_mode(denoiser):
        for start in tqdm(starts, desc="evaluate", disable=not progress, leave=False):
            users = np.arange(start, min(start + batch_size, data.n_users))
            history = dense_rows(data.train, users, device)
            scores = diffusion.ranking_scores(denoiser, history, sampling_steps, generator)
            scores = scores.masked_fill(history > 0, -torch.inf)
            valid = dense_rows(data.valid, users, device)
            for split, targets in (("valid", valid), ("test", None)):
                if targets is None:
                    scores.masked_fill_(valid > 0, -torch.inf)
                    targets = dense_rows(data.test, users, device)
                for key, per_user in ranking_metrics(scores, targets, ks).items():
                    totals[split][key] = totals[split].get(key, 0.0) + per_user.sum().item()
    return {s: {k: v / data.n_users for k, v in m.items()} for s, m in totals.items()}


def format_metrics_table(rows: dict[str, dict[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A small aligned text table: one row per entry of ``rows`` (e.g. valid, test)."""
    keys = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    width = max(len(name) for name in rows) if rows else 5
    lines = [" ".join([" " * width, *(f"{k:>9}" for k in keys)])]
    for name, metrics in rows.items():
        lines.append(" ".join([f"{name:<{width}}", *(f"{metrics[k]:9.4f}" for k in keys)]))
    return "\n".join(lines)
