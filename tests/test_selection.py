"""The one selection rule: strictly better wins, patience in epochs, curve, digest, resume."""

from __future__ import annotations

import math

import pytest
import torch

from refit_gym.training.selection import Selector, weights_digest


def _metrics(score: float) -> dict:
    return {"valid": {"ndcg@20": score}, "test": {"ndcg@20": -1.0}}


def test_strictly_better_wins_and_the_best_weights_are_kept() -> None:
    selector = Selector("ndcg@20", patience=2, start=1)
    weights = {"w": torch.tensor([1.0, 2.0])}
    assert selector.offer(1, _metrics(0.1), weights)
    weights["w"].add_(1)  # the kept copy must not follow the live weights
    assert selector.offer(2, _metrics(0.3), {"w": torch.tensor([5.0, 5.0])})
    assert not selector.offer(3, _metrics(0.3), {"w": torch.zeros(2)})  # a tie: earliest stays
    assert not selector.offer(4, _metrics(math.nan), {"w": torch.zeros(2)})
    assert selector.best_epoch == 2 and selector.best_score == 0.3
    assert selector.best_weights["w"].tolist() == [5.0, 5.0]
    assert selector.digest == weights_digest({"w": torch.tensor([5.0, 5.0])})
    assert selector.best_metrics["test"]["ndcg@20"] == -1.0
    summary = selector.summary()
    assert [p["epoch"] for p in summary["curve"]] == [1, 2, 3, 4]
    assert summary["best_epoch"] == 2 and summary["weights_sha256"] == selector.digest


def test_patience_counts_epochs_after_the_best() -> None:
    selector = Selector("ndcg@20", patience=2, start=3)
    assert not selector.should_stop(4)  # epochs before start use no patience
    assert selector.should_stop(5)
    selector.offer(4, _metrics(0.2))
    assert not selector.should_stop(5) and not selector.should_stop(6)
    assert selector.should_stop(7)  # epochs 5 and 6 ran without a better score
    assert not Selector("ndcg@20").should_stop(10**6)  # no patience: a grid
    with pytest.raises(ValueError, match="patience must be >= 1"):
        Selector("ndcg@20", patience=0)


def test_state_round_trips_through_torch_save(tmp_path) -> None:
    selector = Selector("ndcg@20", patience=3, start=1)
    selector.offer(1, _metrics(0.5), {"w": torch.arange(3.0)})
    selector.offer(2, _metrics(0.4), {"w": torch.zeros(3)})
    torch.save(selector.state_dict(), tmp_path / "state.pt")
    again = Selector.from_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert again.summary() == selector.summary()
    assert again.best_weights["w"].tolist() == [0.0, 1.0, 2.0]
    assert again.should_stop(5) and not again.should_stop(4)


def test_digest_sees_names_dtypes_and_values() -> None:
    base = weights_digest({"a": torch.zeros(2), "b": torch.ones(1, dtype=torch.bfloat16)})
    assert base == weights_digest({"b": torch.ones(1, dtype=torch.bfloat16),
                                   "a": torch.zeros(2)})
    assert base != weights_digest({"a": torch.zeros(2), "b": torch.ones(1)})
    assert base != weights_digest({"c": torch.zeros(2), "b": torch.ones(1, dtype=torch.bfloat16)})
    assert base != weights_digest({"a": torch.tensor([0.0, 1e-30]),
                                   "b": torch.ones(1, dtype=torch.bfloat16)})
