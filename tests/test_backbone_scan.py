"""benchmarks/backbone_scan.py sets one [backbone] or [pretrain] field of a spec per value, and
refuses a field the spec does not have before anything is trained."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from refit_gym.specs import load_env_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from backbone_scan import with_value


def test_a_pretrain_field_and_a_backbone_field_are_set_and_nothing_else() -> None:
    spec = load_env_spec("ReFiT-SeqSynthetic-v0")
    tuned = with_value(spec, "pretrain.lr", 0.0005)
    assert tuned.pretrain.lr == 0.0005 and spec.pretrain.lr == 0.001  # a copy, not an edit
    assert tuned.backbone == spec.backbone
    assert tuned.pretrain.max_epochs == spec.pretrain.max_epochs
    scaled = with_value(spec, "guidance", 4.0)
    assert scaled.backbone["guidance"] == 4.0 and scaled.pretrain == spec.pretrain


@pytest.mark.parametrize(("field", "message"), [("pretrain.learning_rate", "has no key"),
                                                ("env.steps", "pretrain.<key>")])
def test_a_field_the_spec_cannot_take_is_refused(field: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        with_value(load_env_spec("ReFiT-SeqSynthetic-v0"), field, 1.0)


def test_finished_cells_are_reused_and_reported_without_recomputing(tmp_path: Path,
                                                                     monkeypatch) -> None:
    # A scan run one value at a time is reported whole by one more call: the finished pretrain,
    # chain-influence and ReFiT cells are read back, nothing is computed again, and
    # --finished-only names what is missing instead of computing it.
    import backbone_scan

    from refit_gym.training.pretrain import PretrainResult

    calls: list[tuple[str, float]] = []
    metrics = {"hr@10": 0.1, "hr@20": 0.15, "ndcg@20": 0.05}

    def fake_pretrain(spec, data, out_dir, *, seed, **kwargs):
        calls.append(("pretrain", spec.backbone["embedding_std"]))
        return PretrainResult(checkpoint=Path(out_dir) / "denoiser.pt", best_epoch=30, epochs=35,
                              valid=metrics, test=metrics, wall_time_s=1.0)

    def fake_influence(spec, data, checkpoint, setting, **kwargs):
        calls.append(("influence", spec.backbone["embedding_std"]))
        return [f"| influence of {setting} |"]

    def fake_finetune(spec, data, checkpoint, algo, out_dir, *, seed, env_kwargs=None,
                      **kwargs):
        calls.append(("refit", spec.backbone["embedding_std"], env_kwargs))
        pass_ = {"valid": metrics, "fixed_reward": -3.0}
        return {"start": {"valid": metrics, "test": metrics}, "valid": metrics, "test": metrics,
                "best_epoch": 0, "wall_time_s": 2.0, "history": [pass_, pass_]}

    monkeypatch.setattr(backbone_scan, "pretrain", fake_pretrain)
    monkeypatch.setattr(backbone_scan, "influence_rows", fake_influence)
    monkeypatch.setattr(backbone_scan, "finetune", fake_finetune)
    written: dict[str, list[str]] = {}
    monkeypatch.setattr(backbone_scan, "write_result",
                        lambda name, title, lines: written.update({name: lines}))

    def scan(values: str, *extra: str) -> list[str]:
        monkeypatch.setattr(sys, "argv", [
            "backbone_scan.py", "--env", "ReFiT-SeqSynthetic-Concat-v0", "--field",
            "embedding_std", "--values", values, "--finetune", "--out", str(tmp_path), *extra])
        backbone_scan.main()
        return written.popitem()[1]

    scan("0.1")
    scan("0.2")
    assert calls == [call for v in (0.1, 0.2)
                     for call in (("pretrain", v), ("influence", v), ("refit", v, None))]
    calls.clear()
    lines = scan("0.1,0.2,0.3", "--finished-only")
    assert calls == []
    assert "| influence of 0.1 |" in lines and "| influence of 0.2 |" in lines
    assert lines[-1] == "Not finished, so not in the tables: 0.3 seed 1."
    assert any(line.startswith("| 0.2 | 1 | 0.0500 -> 0.0500 |") for line in lines)
    with pytest.raises(SystemExit, match="no finished"):
        scan("0.3", "--finished-only")
    # Another reward temperature is another ReFiT cell on the same backbone.
    lines = scan("0.1", "--tau", "1")
    assert calls == [("refit", 0.1, {"reward_params": {"tau": 1.0}})]
    assert any("reward at tau 1," in line for line in lines)
    calls.clear()
    # --finished-only computes nothing, and names each missing cell.
    lines = scan("0.1", "--tau", "2", "--finished-only")
    assert lines[-1] == "Not finished, so not in the tables: 0.1 seed 1 (ReFiT)."
    (tmp_path / "embedding_std0.2-seed1" / "influence" / "metrics.json").unlink()
    lines = scan("0.1,0.2", "--finished-only")
    assert calls == [] and lines[-1] == "Not finished, so not in the tables: 0.2 seed 1."
    with pytest.raises(SystemExit, match="must be positive"):
        scan("0.1", "--tau", "0")
