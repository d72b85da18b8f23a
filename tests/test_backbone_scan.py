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
