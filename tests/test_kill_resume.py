"""A run killed with SIGKILL (no chance to clean up) resumes from its last checkpoint when the
same command is run again, and ends where an uninterrupted run ends: fine-tuning in one process
and under torchrun, and pretraining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refit_gym.backbones import load_backbone

SYN = "ReFiT-Synthetic-v0"


def _command(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "refit_gym.cli", "finetune", "--env", SYN, "--algo", "refit",
            "--checkpoint", str(checkpoint), "--out", str(out), "--seed", "3", "--quiet",
            "--set", "epochs=3", "--set", "users_per_epoch=256", "--set", "users_per_batch=32",
            "--set", "checkpoint_every=2"]


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(pretrained_synthetic: Path,
                                                                 tmp_path: Path) -> None:
    # Run from tmp_path: from the repository root, `python -m` would import the source folder
    # instead of the installed package.
    whole = tmp_path / "whole"
    subprocess.run(_command(pretrained_synthetic, whole), check=True, timeout=600, cwd=tmp_path)
    cut = tmp_path / "cut"
    _kill_when(_command(pretrained_synthetic, cut), cut / "state.pt", tmp_path)
    assert not (cut / "metrics.json").exists()  # the first checkpoint, two batches in
    subprocess.run(_command(pretrained_synthetic, cut), check=True, timeout=600, cwd=tmp_path)

    def report(folder: Path) -> dict:
        payload = json.loads((folder / "metrics.json").read_text())
        for entry in payload["history"]:
            entry.pop("elapsed")
        return {k: payload[k] for k in ("history", "valid", "test", "best_epoch")}

    assert report(cut) == report(whole)
    _weights_equal(whole / "finetuned.pt", cut / "finetuned.pt")


def _kill_when(command: list[str], marker: Path, cwd: Path,
               env: dict[str, str] | None = None) -> None:
    """Start ``command`` and SIGKILL its whole process group once ``marker`` exists."""
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _weights_equal(a: Path, b: Path) -> None:
    first, _ = load_backbone(a)
    second, _ = load_backbone(b)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_pretraining_killed_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "refit_gym.cli", "pretrain", "--env",
                "ReFiT-SeqSynthetic-v0", "--out", str(out), "--max-epochs", "6", "--quiet"]

    subprocess.run(command(tmp_path / "whole"), check=True, timeout=600, cwd=tmp_path)
    cut = tmp_path / "cut"
    _kill_when(command(cut), cut / "pretrain_state.pt", tmp_path)  # after the first epoch
    assert not (cut / "metrics.json").exists()
    subprocess.run(command(cut), check=True, timeout=600, cwd=tmp_path)
    whole, again = (json.loads((tmp_path / run / "metrics.json").read_text())
                    for run in ("whole", "cut"))
    for key in ("history", "valid", "test", "best_epoch", "test_std"):
        assert again[key] == whole[key], key
    _weights_equal(tmp_path / "whole" / "denoiser.pt", cut / "denoiser.pt")


def test_torchrun_finetuning_killed_then_rerun_equals_an_uninterrupted_run(
        pretrained_synthetic: Path, tmp_path: Path) -> None:
    """Every process of a 2-process run is SIGKILLed mid-epoch; rerunning resumes exactly."""
    def command(out: Path) -> list[str]:
        finetune = _command(pretrained_synthetic, out)[1:]  # without the interpreter
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", *finetune, "--set", "users_per_chunk=8"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, timeout=600, cwd=tmp_path, env=env)
    cut = tmp_path / "cut"
    _kill_when(command(cut), cut / "state.pt", tmp_path, env)
    subprocess.run(command(cut), check=True, timeout=600, cwd=tmp_path, env=env)
    whole, again = (json.loads((tmp_path / run / "metrics.json").read_text())
                    for run in ("whole", "cut"))
    for entry in whole["history"] + again["history"]:
        entry.pop("elapsed")
    assert again["history"] == whole["history"] and again["test"] == whole["test"]
    _weights_equal(tmp_path / "whole" / "finetuned.pt", cut / "finetuned.pt")


def test_pretraining_refuses_a_state_it_did_not_write(tmp_path: Path) -> None:
    from refit_gym.backbones import CheckpointError
    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.specs import load_env_spec
    from refit_gym.training.pretrain import pretrain

    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    pretrain(spec, data, tmp_path, seed=1, max_epochs=1, progress=False)
    with pytest.raises(CheckpointError,
                       match=r"another pretraining run's state \(seed = 1, this run gives 2\)"):
        pretrain(spec, data, tmp_path, seed=2, max_epochs=1, progress=False)
    (tmp_path / "pretrain_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        pretrain(spec, data, tmp_path, seed=1, max_epochs=1, progress=False)


def test_a_finished_pretraining_run_again_returns_its_result_and_rewrites_nothing(
        tmp_path: Path, monkeypatch) -> None:
    # Fine-tuning runs record their backbone's sha256: a rerun of the finished pretraining
    # (refit-gym pretrain twice, a scan run again) must leave denoiser.pt's bytes alone.
    import hashlib
    import importlib

    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.specs import load_env_spec

    pretraining = importlib.import_module("refit_gym.training.pretrain")

    seq = "ReFiT-SeqSynthetic-v0"  # stochastic: the selected model gets a final evaluation
    spec, data = load_env_spec(seq), cached_dataset(seq, None)
    first = pretraining.pretrain(spec, data, tmp_path, seed=1, max_epochs=2, progress=False)
    digest = hashlib.sha256((tmp_path / "denoiser.pt").read_bytes()).hexdigest()

    def refused(*args, **kwargs):
        raise AssertionError("a finished pretraining trained or evaluated again")

    monkeypatch.setattr(pretraining, "train_epoch", refused)
    monkeypatch.setattr(pretraining, "evaluate", refused)
    again = pretraining.pretrain(spec, data, tmp_path, seed=1, max_epochs=2, progress=False)
    assert again == first
    assert hashlib.sha256((tmp_path / "denoiser.pt").read_bytes()).hexdigest() == digest
    with pytest.raises(AssertionError, match="trained or evaluated again"):  # a larger cap
        pretraining.pretrain(spec, data, tmp_path, seed=1, max_epochs=3, progress=False)
