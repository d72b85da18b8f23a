"""benchmarks/chain_stop.py: a backbone evaluated on chains that stop at several steps, the stop
chosen on validation only, and stops the id's chain cannot take refused before any work."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chain_stop import parse_stops, report, study

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training.metrics import eval_mode, evaluate

SEQ = "ReFiT-SeqSynthetic-v0"  # T = 100, the episode's chain K = 20 steps


def test_stops_are_chosen_on_validation(pretrained_seq_synthetic: Path) -> None:
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    runs = [("1", str(pretrained_seq_synthetic))]
    result = study(spec, data, runs, [0, 40, 80], rows=8, trajectories=2)
    model, _ = load_backbone(pretrained_seq_synthetic, data.n_items)
    with eval_mode(model):
        whole = evaluate(model, data, spec.pretrain,
                         chain=EnvSettings.resolve(spec, {}).chain(spec))
    # s = 0 is the environment's own chain: the numbers fine-tuning's selection passes give.
    assert result.valid[0] == [whole["valid"]["ndcg@20"]]
    assert result.tests[0][1]["test"] == whole["test"]
    means = {stop: statistics.mean(v) for stop, v in result.valid.items()}
    assert result.chosen == max(means, key=lambda s: (means[s], -s))
    assert len(set(means.values())) > 1  # the stop changes what is ranked
    lines = report(spec, runs, [0, 40, 80], result, 8, 2)
    assert f"Chosen on validation: s = {result.chosen}." in "\n".join(lines)
    assert sum(line.startswith("| 1 | ") for line in lines) == 3 + 1  # 3 stops, 1 test row


def test_stops_the_chain_cannot_take_are_refused(pretrained_seq_synthetic: Path) -> None:
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    with pytest.raises(SystemExit, match="K <= T - stop = 10.*pass steps <= T - s"):
        study(spec, data, [("1", str(pretrained_seq_synthetic))], [0, 90])
    every = study(spec, data, [("1", str(pretrained_seq_synthetic))], [90], rows=8,
                  trajectories=2, every_step=True)  # K = T - s = 10 steps
    assert every.rows[0].split(" | ")[1:3] == ["90", "10"] and every.chosen == 90
    with pytest.raises(SystemExit, match="comma-separated integers"):
        parse_stops("0,a")
