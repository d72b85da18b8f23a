from __future__ import annotations

import math

import numpy as np
import torch

from refit_gym.data import InteractionData
from refit_gym.diffusion import DiffusionConfig, GaussianDiffusion
from refit_gym.metrics import evaluate, format_metrics_table, ranking_metrics


def _reference(scores: np.ndarray, truth: list[list[int]], k: int) -> tuple[float, float]:
    """DiffRec's computeTopNAccuracy, one user at a time, averaged over all users."""
    recall_sum = ndcg_sum = 0.0
    for row, items in zip(scores, truth):
        if not items:
            continue
        ranked = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        hits = [i in items for i in ranked]
        dcg = sum(1 / math.log2(j + 2) for j, hit in enumerate(hits) if hit)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(items))))
        recall_sum += sum(hits) / len(items)
        ndcg_sum += dcg / idcg
    return recall_sum / len(truth), ndcg_sum / len(truth)


def test_metrics_match_per_user_reference() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 60
    scores = rng.normal(size=(n_users, n_items))  # continuous: no ties
    truth = [sorted(rng.choice(n_items, size=rng.integers(0, 25), replace=False).tolist())
             for _ in range(n_users)]
    targets = torch.zeros(n_users, n_items)
    for u, items in enumerate(truth):
        targets[u, items] = 1
    got = ranking_metrics(torch.from_numpy(scores), targets, ks=(1, 10, 20))
    for k in (1, 10, 20):
        recall, ndcg = _reference(scores, truth, k)
        assert got[f"recall@{k}"].mean().item() == np_approx(recall)
        assert got[f"ndcg@{k}"].mean().item() == np_approx(ndcg)


def np_approx(value: float):
    import pytest

    return pytest.approx(value, abs=1e-12)


def test_evaluate_masks_history_and_uses_one_chain() -> None:
    """A denoiser that knows the future: scores rank valid items first, then test items."""
    import scipy.sparse as sp

    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=np.float32))
    valid = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=np.float32))
    data = InteractionData("toy", train, valid, test)
    preference = torch.tensor([[9.0, 8, 7, 0, 0, 0], [0, 9, 8, 7, 0, 0]])
    calls = []

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            calls.append(len(x))
            return preference

    diffusion = GaussianDiffusion(DiffusionConfig(steps=3, noise_scale=0.01, noise_min=0.1,
                                                  noise_max=0.2))
    result = evaluate(Oracle(), diffusion, data, ks=(1,), batch_size=8)
    # The history item has the top score but is masked; the next best is the target.
    assert result["valid"] == {"recall@1": 1.0, "ndcg@1": 1.0}
    assert result["test"] == {"recall@1": 1.0, "ndcg@1": 1.0}
    assert calls == [2, 2, 2]  # one 3-step chain for both splits
    table = format_metrics_table(result, ks=(1,))
    assert "recall@1" in table.splitlines()[0] and "1.0000" in table
