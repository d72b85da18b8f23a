"""The driver's evaluation rules: selection passes score validation only, test is scored for the
start and the selected model (issue 31 item 9), and the start-model cache is versioned."""

from __future__ import annotations

import importlib
from pathlib import Path

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
