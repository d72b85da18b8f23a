"""benchmarks/pretrain_seeds.py: the validation curve a cap is judged by, and a reused run made
under another cap refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretrain_seeds

from refit_gym.specs import load_env_spec
from refit_gym.training.identity import spec_digest


def _run(best: int, passes: dict[int, float]) -> dict:
    return {"best_epoch": best, "history": [
        {"epoch": e, "valid": {"hr@10": v, "ndcg@20": v / 2}} for e, v in passes.items()]}


def test_curve_has_a_row_per_pass_a_column_per_seed_and_the_selected_in_bold() -> None:
    results = [_run(10, {5: 0.1, 10: 0.3, 15: 0.2}), _run(5, {5: 0.4, 10: 0.35})]
    lines = pretrain_seeds.selection_curve(results, [1, 2], "hr@10")
    rows = [line for line in lines if line.startswith("| 5") or line.startswith("| 1")]
    assert rows == ["| 5 | 0.1000 / 0.0500 | **0.4000 / 0.2000** |",
                    "| 10 | **0.3000 / 0.1500** | 0.3500 / 0.1750 |",
                    "| 15 | 0.2000 / 0.1000 |  |"]  # seed 2 stopped earlier


def test_the_cap_a_run_was_made_under_comes_from_its_identity() -> None:
    spec = load_env_spec("ReFiT-SeqSynthetic-v1")
    now = spec_digest(spec, without=("env",))
    assert pretrain_seeds.cap_of({"identity": {"max_epochs": 7, "spec": "old"}}, spec) == 7
    for digest in (now, spec_digest(spec)):  # the spec's own cap, recorded as None
        assert pretrain_seeds.cap_of({"identity": {"max_epochs": None, "spec": digest}},
                                     spec) == spec.pretrain.max_epochs
    # None under another version of the spec: its cap then is not known.
    assert pretrain_seeds.cap_of({"identity": {"max_epochs": None, "spec": "old"}}, spec) is None
    assert pretrain_seeds.cap_of({}, spec) is None


def test_a_run_made_under_another_cap_is_refused(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ReFiT-SeqSynthetic-v1-seed1"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"identity": {"max_epochs": 7}}))
    monkeypatch.setattr(sys, "argv", ["pretrain_seeds.py", "--env", "ReFiT-SeqSynthetic-v1",
                                      "--seeds", "1", "--out", str(tmp_path),
                                      "--max-epochs", "9"])
    with pytest.raises(SystemExit, match="pretrained with at most 7 epochs, not 9: pass "
                                         "--max-epochs 7"):
        pretrain_seeds.main()
