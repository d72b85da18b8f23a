from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refit_gym.backbones import (
    CheckpointError,
    DiffRec,
    DiffRecConfig,
    DreamRec,
    DreamRecConfig,
    load_backbone,
    save_backbone,
)
from refit_gym.diffusion import DiffusionConfig

SCHEDULE = DiffusionConfig(steps=10, schedule="linear")


def _model(n_items: int = 12) -> DiffRec:
    torch.manual_seed(0)
    return DiffRec(DiffRecConfig(n_items=n_items, dims=(5, 7)), SCHEDULE)


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _model()
    path = save_backbone(tmp_path / "m.pt", model, "ReFiT-Synthetic-v0", epoch=3)
    loaded, meta = load_backbone(path, n_items=12)
    assert isinstance(loaded, DiffRec) and loaded.diffusion.config == SCHEDULE
    x, t = torch.rand(4, 12), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(loaded.eval()(x, t), model.eval()(x, t), rtol=0, atol=0)
    assert meta["env_id"] == "ReFiT-Synthetic-v0" and meta["extra"] == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_dreamrec_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DreamRec(DreamRecConfig(n_items=30, max_len=4, hidden=8), SCHEDULE).eval()
    loaded, _ = load_backbone(save_backbone(tmp_path / "d.pt", model, "X"), n_items=30)
    batch = {"history": torch.tensor([[3, 4, 30, 30], [30, 30, 30, 30]])}
    x, t = torch.randn(2, 8), torch.tensor([9, 0])
    condition = model.encode(batch)
    torch.testing.assert_close(loaded.eval().encode(batch), condition, rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict_x0(x, t, condition),
                               model.predict_x0(x, t, condition), rtol=0, atol=0)


def test_bad_checkpoints_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*refit-gym pretrain"):
        load_backbone(tmp_path / "none.pt")
    good = save_backbone(tmp_path / "good.pt", _model(), "X")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone(truncated)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a refit-gym backbone checkpoint"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="trained on 12 items.*has 99"):
        load_backbone(good, n_items=99)
    payload = torch.load(good, weights_only=True)
    payload["config"]["dims"] = [5, 8]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_backbone(tmp_path / "mismatch.pt")
    payload["backbone"] = "vae"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown backbone 'vae'"):
        load_backbone(tmp_path / "unknown.pt")


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = save_backbone(tmp_path / "m.pt", _model(), "X", version=1)

    def explode(obj, f, *args, **kwargs):
        f.write(b"partial")  # save_backbone hands torch.save an open file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(path, _model(), "X", version=2)
    monkeypatch.undo()
    assert load_backbone(path)[1]["extra"] == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
