"""The driver's evaluation rules: selection passes score validation only, test is scored for the
start and the selected model (issue 31 item 9), and the start-model cache is versioned."""

from __future__ import annotations

import importlib
import itertools
import types
from pathlib import Path

import pytest
import torch

from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training import metrics
from refit_gym.training.finetune import finetune
from refit_gym.training.metrics import evaluate
from refit_gym.training.selection import weights_digest

driver = importlib.import_module("refit_gym.training.finetune")
SYN, SEQ = "ReFiT-Synthetic-v0", "ReFiT-SeqSynthetic-v0"


def test_sequential_selection_passes_score_validation_only(pretrained_seq_synthetic: Path,
                                                           tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path / "cache"))  # the start is not cached
    calls: list[tuple[str, ...]] = []
    original = metrics.evaluate_sequential

    def recorded(*args, **kwargs):
        calls.append(tuple(kwargs.get("splits", ("valid", "test"))))
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics, "evaluate_sequential", recorded)
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    result = finetune(spec, data, pretrained_seq_synthetic, "refit", tmp_path / "run",
                      hyperparams={"epochs": 2, "users_per_epoch": 256}, progress=False)
    passes = [c for c in calls if c == ("valid",)]
    with_test = [c for c in calls if "test" in c]
    assert len(passes) == 3  # the start and two epochs
    # The selected model's and the start's final evaluations (own sampler, tuned chain), or
    # only one pair when selection kept the start.
    assert len(with_test) == (2 if result["best_epoch"] == 0 else 4)
    assert all("test" not in h for h in result["history"])
    assert "test" in result and "test" in result["start"]
    selection = result["selection"]
    assert selection["best_epoch"] == result["best_epoch"]
    assert selection["metric"] == "valid ndcg@20" and len(selection["weights_sha256"]) == 64


def test_cf_history_holds_test_for_the_start_only_unless_asked(pretrained_synthetic: Path,
                                                               tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    settings = {"epochs": 2, "users_per_epoch": 64, "checkpoint_every": 5}
    result = finetune(spec, data, pretrained_synthetic, "refit", tmp_path / "a",
                      hyperparams=settings, progress=False)
    assert ["test" in h for h in result["history"]] == [True, False, False]
    curve = finetune(spec, data, pretrained_synthetic, "refit", tmp_path / "b",
                     hyperparams=settings, progress=False, test_curve=True)
    assert all("test" in h for h in curve["history"])
    best = curve["history"][curve["best_epoch"]]
    assert result["test"] == best["test"] and result["valid"] == best["valid"]
    assert result["start"]["test"] == curve["history"][0]["test"]
    from refit_gym.backbones import load_backbone

    tuned, _ = load_backbone(tmp_path / "a" / "finetuned.pt")
    chain = driver.EnvSettings.resolve(spec, {}).chain(spec)
    assert evaluate(tuned, data, spec.pretrain, chain=chain)["test"] == result["test"]
    assert result["selection"]["weights_sha256"] == weights_digest(tuned.state_dict())


def test_start_metrics_cache_key_carries_a_format_version(pretrained_synthetic: Path,
                                                          tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path))
    filled: list[int] = []
    monkeypatch.setattr(driver, "_final_metrics",
                        lambda *args: filled.append(1) or {"valid": {"n": len(filled)}})
    spec = load_env_spec(SYN)
    chain = driver.EnvSettings.resolve(spec, {}).chain(spec)

    def start() -> dict:
        return driver._start_metrics(None, pretrained_synthetic, None, spec, chain, "cpu")

    assert start() == start() == {"valid": {"n": 1}}  # cached
    monkeypatch.setattr(driver, "START_METRICS_FORMAT", driver.START_METRICS_FORMAT + 1)
    assert start() == {"valid": {"n": 2}}  # a new format: not the stale number
    assert len(list((tmp_path / "evaluations").iterdir())) == 2


def _fake_clock(monkeypatch) -> None:
    """Every reading of the driver's clock 0.5 s after the last: each epoch counts 0.5 s."""
    ticks = itertools.count()
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.5 * next(ticks)))


def test_an_interrupted_continue_run_resumes_to_the_same_result(pretrained_synthetic: Path,
                                                                tmp_path: Path,
                                                                monkeypatch) -> None:
    """continue is budgeted by training seconds; under a clock that gives each epoch 0.5 s,
    a 2.4 s budget is 5 epochs, killed in the fourth and resumed."""
    from refit_gym.training.algorithms import continue_training

    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    _fake_clock(monkeypatch)
    whole = finetune(spec, data, pretrained_synthetic, "continue", tmp_path / "whole",
                     budget_seconds=2.4, hyperparams={"eval_every": 2}, progress=False)
    assert [h["epoch"] for h in whole["history"]] == [0, 2, 4, 5]
    train_epoch, calls = continue_training.train_epoch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return train_epoch(*args)

    monkeypatch.setattr(continue_training, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, data, pretrained_synthetic, "continue", tmp_path / "cut",
                 budget_seconds=2.4, hyperparams={"eval_every": 2}, progress=False)
    monkeypatch.setattr(continue_training, "train_epoch", train_epoch)
    resumed = finetune(spec, data, pretrained_synthetic, "continue", tmp_path / "cut",
                       budget_seconds=2.4, hyperparams={"eval_every": 2}, progress=False)
    assert resumed["history"] == whole["history"] and resumed["wall_time_s"] == 2.5
    a = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_an_interrupted_sb3_run_resumes_from_its_last_epoch(pretrained_synthetic: Path,
                                                            tmp_path: Path,
                                                            monkeypatch) -> None:
    """PPO killed in its second epoch resumes from the first (its .zip and run state) and
    finishes. The epochs before the cut are the uninterrupted run's; the later ones need not
    be: SB3 saves neither its environment's episode stream nor the random state."""
    from refit_gym.rl.sb3_agents import SB3_ALGOS

    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    settings = {"n_envs": 8, "n_steps": 10, "batch_size": 40, "epochs": 2, "users_per_epoch": 5}
    whole = finetune(spec, data, pretrained_synthetic, "ppo", tmp_path / "whole",
                     hyperparams=settings, progress=False)
    learn, calls = SB3_ALGOS["ppo"].learn, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return learn(self, *args, **kwargs)

    monkeypatch.setattr(SB3_ALGOS["ppo"], "learn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, data, pretrained_synthetic, "ppo", tmp_path / "cut", hyperparams=settings,
                 progress=False)
    monkeypatch.setattr(SB3_ALGOS["ppo"], "learn", learn)
    resumed = finetune(spec, data, pretrained_synthetic, "ppo", tmp_path / "cut",
                       hyperparams=settings, progress=False)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in whole["history"][:2]]
    assert [{k: v for k, v in h.items() if k != "elapsed"}
            for h in resumed["history"][:2]] == strip


def test_a_run_on_held_out_rows_is_its_own_run(pretrained_seq_synthetic: Path,
                                               tmp_path: Path) -> None:
    # Fine-tuning on the held-out latest rows (SequenceData.hold_out_latest) draws its fixed
    # check episodes from those rows, and its folder is refused to a run on the whole split.
    from refit_gym.backbones import CheckpointError

    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    short = {"epochs": 1, "users_per_epoch": 64}
    held = finetune(spec, data.hold_out_latest(), pretrained_seq_synthetic, "refit",
                    tmp_path / "held", hyperparams=short, progress=False)
    whole = finetune(spec, data, pretrained_seq_synthetic, "refit", tmp_path / "whole",
                     hyperparams=short, progress=False)
    assert held["history"][0]["fixed_reward"] != whole["history"][0]["fixed_reward"]
    with pytest.raises(CheckpointError, match="episodes"):
        finetune(spec, data, pretrained_seq_synthetic, "refit", tmp_path / "held",
                 hyperparams=short, progress=False)
