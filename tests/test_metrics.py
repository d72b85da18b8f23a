from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from refit_gym.backbones import DiffRec, DiffRecConfig, DreamRec, DreamRecConfig
from refit_gym.data import InteractionData, SequenceData
from refit_gym.diffusion import DiffusionConfig
from refit_gym.training.metrics import (
    evaluate_cf,
    evaluate_sequential,
    format_metrics_table,
    next_item_metrics,
    ranking_metrics,
)


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

    class Oracle(DiffRec):
        def predict_x0(self, x_t, t, condition):
            calls.append(len(x_t))
            return preference

    schedule = DiffusionConfig(steps=3, noise_scale=0.01, noise_min=0.1, noise_max=0.2)
    result = evaluate_cf(Oracle(DiffRecConfig(n_items=6, dims=(2,)), schedule), data, ks=(1,),
                         batch_size=8)
    # The history item has the top score but is masked; the next best is the target.
    assert result["valid"] == {"recall@1": 1.0, "ndcg@1": 1.0}
    assert result["test"] == {"recall@1": 1.0, "ndcg@1": 1.0}
    assert calls == [2, 2, 2]  # one 3-step chain for both splits
    table = format_metrics_table(result)
    assert "recall@1" in table.splitlines()[0] and "1.0000" in table


def test_next_item_metrics_match_a_ranking_loop() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(40, 30))
    targets = rng.integers(0, 30, size=40)
    got = next_item_metrics(torch.from_numpy(scores), torch.from_numpy(targets), ks=(1, 5, 20))
    for k in (1, 5, 20):
        hr = ndcg = 0.0
        for row, target in zip(scores, targets):
            ranked = sorted(range(30), key=lambda i: -row[i])[:k]  # DreamRec: top-K then index
            if target in ranked:
                hr += 1
                ndcg += 1 / math.log2(ranked.index(target) + 2)
        assert got[f"hr@{k}"].mean().item() == np_approx(hr / 40)
        assert got[f"ndcg@{k}"].mean().item() == np_approx(ndcg / 40)


def test_sequential_evaluation_averages_sampling_seeds_and_splits_by_target() -> None:
    """Every row counts; seeds change the samples; seen/unseen split the rows by target."""
    histories = {s: np.array([[0, 1, 5], [2, 5, 5], [5, 5, 5]]) for s in ("train", "valid", "test")}
    targets = {"train": np.array([1, 2, 3]), "valid": np.array([1, 4, 3]),
               "test": np.array([4, 4, 2])}
    data = SequenceData("toy", 5, histories, targets)
    torch.manual_seed(0)
    model = DreamRec(DreamRecConfig(n_items=5, max_len=3, hidden=4),
                     DiffusionConfig(steps=5, schedule="linear"))
    out = evaluate_sequential(model, data, ks=(1, 5), batch_size=2, sampling_seeds=(0, 1, 2))
    assert out["valid"]["hr@5"] == 1.0 and out["test"]["hr@5"] == 1.0  # 5 items: always in
    assert out["valid_seen"]["rows"] == 2 and out["valid_unseen"]["rows"] == 1
    assert out["test_seen"]["rows"] == 1 and out["test_unseen"]["rows"] == 2
    single = [evaluate_sequential(model, data, ks=(1,), sampling_seeds=(s,), splits=("valid",))
              for s in (0, 1, 2)]
    per_seed = [r["valid"]["hr@1"] for r in single]
    assert out["valid"]["hr@1"] == np_approx(float(np.mean(per_seed)))
    assert out["valid_std"]["hr@1"] == np_approx(float(np.std(per_seed, ddof=1)))


def test_seeded_sequential_results_do_not_depend_on_the_batch_size() -> None:
    """64 rows of a stochastic backbone: every row draws its own x_K and noise, so batches of
    8, 16 or 64 rows give the same numbers (batch-keyed seeds gave 64 rows other draws)."""
    rng = np.random.default_rng(2)
    n_items, rows = 30, 64
    histories = {s: rng.integers(0, n_items + 1, size=(rows, 4)) for s in ("train", "valid",
                                                                            "test")}
    targets = {s: rng.integers(0, n_items, size=rows) for s in ("train", "valid", "test")}
    data = SequenceData("toy", n_items, histories, targets)
    torch.manual_seed(0)
    model = DreamRec(DreamRecConfig(n_items=n_items, max_len=4, hidden=8),
                     DiffusionConfig(steps=4, schedule="linear"))
    runs = [evaluate_sequential(model, data, ks=(5, 10), batch_size=size, sampling_seeds=(0, 3))
            for size in (8, 16, 64)]
    for run in runs[1:]:
        for split in ("valid", "test", "test_std"):
            assert run[split] == runs[0][split]
    other = evaluate_sequential(model, data, ks=(5, 10), batch_size=16, sampling_seeds=(1, 4))
    assert other["test"] != runs[0]["test"]  # the seed still matters
    model.eval()  # no dropout: only the draws can differ
    batch = data.batch("test", np.arange(40, 50))
    whole = model.generate({**batch, "row": torch.arange(40, 50)}, None,
                           torch.Generator().manual_seed(3))
    part = model.generate({**data.batch("test", np.arange(45, 50)), "row": torch.arange(45, 50)},
                          None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(whole[5:], part)  # a row's sample, wherever it sits


def test_ties_never_favour_the_target() -> None:
    """All items level: the target's place is uniform over the n places, so HR@K = K / n and
    NDCG@K = sum_{p<K} 1/log2(p+2) / n (counting only strictly higher items gave 1)."""
    n, k = 10, 3
    expected_ndcg = sum(1 / math.log2(p + 2) for p in range(k)) / n
    seq = next_item_metrics(torch.zeros(4, n), torch.tensor([0, 3, 5, 9]), ks=(k,))
    assert seq[f"hr@{k}"].tolist() == np_approx([k / n] * 4)
    assert seq[f"ndcg@{k}"].tolist() == np_approx([expected_ndcg] * 4)
    targets = torch.zeros(2, n)
    targets[0, [1, 4]] = 1
    targets[1, 7] = 1
    cf = ranking_metrics(torch.zeros(2, n), targets, ks=(k,))
    assert cf[f"recall@{k}"].tolist() == np_approx([k / n] * 2)
    empty = ranking_metrics(torch.zeros(2, n), torch.zeros(2, n), ks=(k,))
    assert empty[f"recall@{k}"].tolist() == [0.0, 0.0]  # no ground truth: counts 0
    ideal = [sum(1 / math.log2(p + 2) for p in range(m)) for m in (2, 1)]
    assert cf[f"ndcg@{k}"].tolist() == np_approx([2 * expected_ndcg / ideal[0],
                                                  expected_ndcg / ideal[1]])


def _mean_over_tie_orders(row: np.ndarray, relevant: set[int], k: int) -> tuple[float, float]:
    """Recall@k and NDCG@k of one row averaged over every order of its items that keeps the
    scores descending (all permutations, each breaking ties its own way)."""
    n = len(row)
    recall = ndcg = 0.0
    orders = list(itertools.permutations(range(n)))
    idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(relevant))))
    for tie_order in orders:
        ranked = sorted(range(n), key=lambda i: (-row[i], tie_order[i]))[:k]
        hits = [j for j, i in enumerate(ranked) if i in relevant]
        recall += len(hits) / len(relevant)
        ndcg += sum(1 / math.log2(j + 2) for j in hits) / idcg
    return recall / len(orders), ndcg / len(orders)


def test_tie_rule_is_the_mean_over_random_tie_orders_in_both_scenarios() -> None:
    rng = np.random.default_rng(4)
    n = 6
    scores = rng.integers(0, 3, size=(8, n)).astype(np.float32)  # many ties
    scores[0, 2] = -np.inf  # a masked item ties with nothing relevant
    relevant = [set(rng.choice(n, size=rng.integers(1, 4), replace=False).tolist())
                for _ in range(8)]
    relevant[0].discard(2)
    relevant[0].add(0)
    targets = torch.zeros(8, n)
    for u, items in enumerate(relevant):
        targets[u, sorted(items)] = 1
    for k in (1, 3, 5):
        cf = ranking_metrics(torch.from_numpy(scores), targets, ks=(k,))
        seq = next_item_metrics(torch.from_numpy(scores),
                                torch.tensor([min(r) for r in relevant]), ks=(k,))
        for u in range(8):
            recall, ndcg = _mean_over_tie_orders(scores[u], relevant[u], k)
            assert cf[f"recall@{k}"][u].item() == np_approx(recall)
            assert cf[f"ndcg@{k}"][u].item() == np_approx(ndcg)
            hr, seq_ndcg = _mean_over_tie_orders(scores[u], {min(relevant[u])}, k)
            assert seq[f"hr@{k}"][u].item() == np_approx(hr)
            assert seq[f"ndcg@{k}"][u].item() == np_approx(seq_ndcg)
