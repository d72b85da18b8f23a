"""A fine-tuning process killed with SIGKILL (no chance to clean up) resumes from its last
checkpoint when the same command is run again, and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    process = subprocess.Popen(_command(pretrained_synthetic, cut), cwd=tmp_path)
    state = cut / "state.pt"
    deadline = time.monotonic() + 300
    while not state.is_file():  # the first checkpoint: two batches into the first epoch
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (cut / "metrics.json").exists()
    subprocess.run(_command(pretrained_synthetic, cut), check=True, timeout=600, cwd=tmp_path)

    def report(folder: Path) -> dict:
        payload = json.loads((folder / "metrics.json").read_text())
        for entry in payload["history"]:
            entry.pop("elapsed")
        return {k: payload[k] for k in ("history", "valid", "test", "best_epoch")}

    assert report(cut) == report(whole)
    a, _ = load_backbone(whole / "finetuned.pt")
    b, _ = load_backbone(cut / "finetuned.pt")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
