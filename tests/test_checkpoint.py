from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refit_gym.checkpoint import CheckpointError, load_denoiser, save_denoiser
from refit_gym.denoiser import DenoiserConfig, MLPDenoiser


def _model(n_items: int = 12) -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(DenoiserConfig(n_items=n_items, dims=(5, 7)))


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _model()
    path = save_denoiser(tmp_path / "m.pt", model, "ReFiT-Synthetic-v0", epoch=3)
    loaded, meta = load_denoiser(path, n_items=12)
    x, t = torch.rand(4, 12), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(loaded.eval()(x, t), model.eval()(x, t), rtol=0, atol=0)
    assert meta["env_id"] == "ReFiT-Synthetic-v0" and meta["extra"] == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_bad_checkpoints_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*refit-gym pretrain"):
        load_denoiser(tmp_path / "none.pt")
    good = save_denoiser(tmp_path / "good.pt", _model(), "X")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_denoiser(truncated)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_denoiser(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a refit-gym denoiser checkpoint"):
        load_denoiser(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="trained on 12 items.*has 99"):
        load_denoiser(good, n_items=99)
    payload = torch.load(good, weights_only=True)
    payload["denoiser_config"]["dims"] = [5, 8]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_denoiser(tmp_path / "mismatch.pt")


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = save_denoiser(tmp_path / "m.pt", _model(), "X", version=1)

    def explode(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_denoiser(path, _model(), "X", version=2)
    monkeypatch.undo()
    assert load_denoiser(path)[1]["extra"] == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
