"""The one selection rule: strictly better wins, patience in epochs, curve, digest, resume;
and pretraining, which selects with it, on scripted validation scores and from a resume state
in the format of the code before it."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refit_gym.backbones import read_checkpoint
from refit_gym.backbones.diffrec import DiffRec
from refit_gym.specs import load_env_spec
from refit_gym.training.pretrain import PretrainResult
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


# Pretraining's selection, driven by scripted validation scores. Settings (eval_every,
# patience, first selectable epoch, max_epochs): ReFiT-Beauty-v1's, an evaluation every epoch
# (as a spec with eval_every = 1), ReFiT-Beauty-v0's, ReFiT-SeqSynthetic-v1's, a max_epochs
# that is no multiple of eval_every, and the smallest patience.
SETTINGS = [(5, 20, 26, 100), (1, 20, 1, 60), (5, 10, 1, 30), (2, 8, 8, 40), (3, 7, 1, 23),
            (1, 2, 1, 15)]
SHAPES: dict[str, Callable[[int], float]] = {  # epoch -> validation score
    "peak at 12": lambda e: -abs(e - 12.0),
    "peak at 40": lambda e: -abs(e - 40.0),
    "plateau from 10 (ties)": lambda e: float(min(e, 10)),
    "rising": float,
    "late rise after 15": lambda e: 1.0 if e < 15 else 2.0 if e < 30 else float(e),
    "NaN at 10 and 30": lambda e: math.nan if e in (10, 30) else -abs(e - 30.0) - 0.5 * (e > 30),
}


def _reference(score: Callable[[int], float], eval_every: int, patience: int, start: int,
               max_epochs: int) -> tuple[list[int], int, int]:
    """Pretraining's selection before it used the Selector (its loop's rule, verbatim): the
    evaluated epochs, the selected epoch (0: none) and the last epoch that ran."""
    best_epoch, best_score, evaluated, epoch = 0, -math.inf, [], 0
    for epoch in range(1, max_epochs + 1):
        if epoch - max(best_epoch, start - 1) >= patience:
            epoch -= 1
            break
        if epoch >= start and (epoch % eval_every == 0 or epoch == max_epochs):
            evaluated.append(epoch)
            if score(epoch) > best_score:
                best_epoch, best_score = epoch, score(epoch)
    return evaluated, best_epoch, epoch


def test_the_reference_rule_on_hand_worked_cases() -> None:
    # Beauty-v1: best at 40, evaluations at 45, 50, 55 do not improve, epoch 60 does not run.
    assert _reference(SHAPES["peak at 40"], 5, 20, 26, 100) == (list(range(30, 56, 5)), 40, 59)
    # Every epoch evaluated: best at 12, epochs 13-31 run, epoch 32 does not.
    assert _reference(SHAPES["peak at 12"], 1, 20, 1, 60) == (list(range(1, 32)), 12, 31)
    # The last epoch is evaluated even off the schedule.
    assert _reference(float, 3, 7, 1, 23) == ([3, 6, 9, 12, 15, 18, 21, 23], 23, 23)


def _scripted_pretrain(folder: Path, monkeypatch: pytest.MonkeyPatch,
                       score: Callable[[int], float], eval_every: int, patience: int,
                       start: int, max_epochs: int, *, stochastic: bool = False,
                       fail_in: int | None = None) -> tuple[PretrainResult, int]:
    """``pretrain`` of a small DiffRec where training epoch e writes e into its first
    parameter and evaluation reads it back and returns ``score(e)`` as validation
    ``recall@20`` (test: the sum of the weights, so it follows the model). ``fail_in``:
    training that epoch raises (an interrupted run). Returns the result and the epoch whose
    weights the checkpoint holds."""
    pretraining = importlib.import_module("refit_gym.training.pretrain")
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # not under test; most of the time
    spec = load_env_spec("ReFiT-Synthetic-v0")
    spec = dataclasses.replace(spec, pretrain=dataclasses.replace(
        spec.pretrain, eval_every=eval_every, patience=patience, max_epochs=max_epochs))
    monkeypatch.setattr(DiffRec, "selection_start", property(lambda self: start))
    monkeypatch.setattr(DiffRec, "stochastic_inference", stochastic)
    monkeypatch.setattr(DiffRec, "begin_pretrain_epoch",
                        lambda self, epoch: setattr(self, "scripted_epoch", epoch))

    name = next(spec.build_backbone(50).named_parameters())[0]  # the marked parameter

    def train_epoch(backbone: DiffRec, *args) -> float:
        if backbone.scripted_epoch == fail_in:
            raise KeyboardInterrupt
        with torch.no_grad():
            backbone.get_parameter(name).view(-1)[0] = backbone.scripted_epoch
        return 0.0

    def evaluate(model: DiffRec, *args, **kwargs) -> dict:
        epoch = int(model.get_parameter(name).view(-1)[0].item())
        return {"valid": {"recall@20": score(epoch)},
                "test": {"recall@20": sum(p.sum().item() for p in model.parameters())}}

    monkeypatch.setattr(pretraining, "train_epoch", train_epoch)
    monkeypatch.setattr(pretraining, "evaluate", evaluate)
    data = SimpleNamespace(n_items=50, episode_split="train")
    result = pretraining.pretrain(spec, data, folder, seed=1, progress=False)
    weights = read_checkpoint(folder / "denoiser.pt")["state_dict"]
    return result, int(weights[name].view(-1)[0].item())


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "every{}-patience{}-start{}-max{}"
                         .format(*s))
def test_pretraining_evaluates_selects_and_stops_as_its_rule_says(
        setting: tuple[int, int, int, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A regression guard: the same epochs evaluated, the same one selected (its weights in
    the checkpoint) and the same last epoch as the pre-Selector rule, for every shape."""
    for index, (shape, score) in enumerate(SHAPES.items()):
        evaluated, best, last = _reference(score, *setting)
        result, selected = _scripted_pretrain(tmp_path / str(index), monkeypatch, score,
                                              *setting)
        got = ([h["epoch"] for h in result.history], result.best_epoch, result.epochs)
        assert got == (evaluated, best, last), shape
        assert selected == best, shape


def test_pretraining_records_the_selection_and_resumes_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The report holds the Selector's curve and the checkpoint's digest; a run interrupted
    before or after its first selection, with its state as this code writes it or as the code
    before the Selector wrote it (``best`` instead of ``selector``), ends as an uninterrupted
    one, also for a stochastic backbone (its selected checkpoint evaluated again)."""
    score, setting = SHAPES["peak at 12"], (2, 6, 4, 30)
    whole, selected = _scripted_pretrain(tmp_path / "whole", monkeypatch, score, *setting,
                                         stochastic=True)
    assert (whole.best_epoch, whole.epochs, selected) == (12, 17, 12)
    summary = whole.selection
    assert [(p["epoch"], p["score"]) for p in summary["curve"]] == [
        (h["epoch"], h["valid"]["recall@20"]) for h in whole.history]
    assert summary["best_epoch"] == 12 and summary["best_score"] == 0.0
    # The spec's patience 6 (epoch best + 6 does not run) is the Selector's 5 (epochs that run).
    assert (summary["spec_patience"], summary["patience_epochs"]) == (6, 5)
    assert summary["weights_sha256"] == weights_digest(
        read_checkpoint(tmp_path / "whole" / "denoiser.pt")["state_dict"])
    assert whole.to_json("x", 1)["selection"] == summary
    for fail_in in (3, 9):  # before the first evaluation (epoch 4), after the selection of 8
        for legacy in (False, True):
            folder = tmp_path / f"cut{fail_in}{'-legacy' * legacy}"
            with pytest.raises(KeyboardInterrupt):
                _scripted_pretrain(folder, monkeypatch, score, *setting, stochastic=True,
                                   fail_in=fail_in)
            if legacy:
                _as_written_before_the_selector(folder / "pretrain_state.pt")
            again, selected = _scripted_pretrain(folder, monkeypatch, score, *setting,
                                                 stochastic=True)
            assert dataclasses.asdict(again) | {"checkpoint": None, "wall_time_s": 0,
                                                "train_seconds": 0} == \
                dataclasses.asdict(whole) | {"checkpoint": None, "wall_time_s": 0,
                                             "train_seconds": 0}, (fail_in, legacy)
            assert selected == 12


def _as_written_before_the_selector(path: Path) -> None:
    """Rewrite a pretraining state as the code before the Selector wrote it: the best epoch
    (0: none), its score and metrics as ``best``; no ``selector`` (a state that code really
    wrote: test_a_state_written_before_the_selector_resumes_as_an_uninterrupted_run)."""
    state = torch.load(path, weights_only=True)
    selector = state.pop("selector")
    state["best"] = {"epoch": selector["best_epoch"] or 0, "score": selector["best_score"],
                     **(selector["best_metrics"] or {"valid": {}, "test": {}})}
    torch.save(state, path)


def test_pretraining_refuses_a_patience_that_stops_before_any_selection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="patience must be >= 2"):
        _scripted_pretrain(tmp_path / "one", monkeypatch, float, 1, 1, 1, 10)
    # Patience 3 runs out (at epoch 3) before the first evaluation (epoch 5): no checkpoint.
    with pytest.raises(RuntimeError, match="selected no epoch by validation recall@20"):
        _scripted_pretrain(tmp_path / "late", monkeypatch, float, 5, 3, 1, 10)
    with pytest.raises(RuntimeError, match="no score was a number"):
        _scripted_pretrain(tmp_path / "nan", monkeypatch, lambda e: math.nan, 1, 3, 1, 10)
