"""Run states read back where the run resumes: a state written on a GPU loads on a CPU."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from refit_gym.backbones import CheckpointError
from refit_gym.training.resume import load_state, save_state


def _as_if_written_on_a_gpu(path: Path) -> None:
    """Rewrite the storages' saved location from cpu to cuda:0 (what a GPU run's file holds)."""
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in entries:
            if name.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(name, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_written_state_resumes_on_the_cpu(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    identity = {"env": "X-v0", "seed": 1}
    save_state(path, {"identity": identity, "model": {"w": torch.arange(3.0)},
                      "generator": torch.Generator().get_state(), "epoch": 4})
    _as_if_written_on_a_gpu(path)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain load does on this machine
        torch.load(path, weights_only=True)
    payload = load_state(path, identity, "fine-tuning")
    assert payload["model"]["w"].device.type == "cpu"
    assert payload["model"]["w"].tolist() == [0.0, 1.0, 2.0] and payload["epoch"] == 4
    with pytest.raises(CheckpointError, match="another fine-tuning run's state"):
        load_state(path, {**identity, "seed": 2}, "fine-tuning")
