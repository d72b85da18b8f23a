"""Stopping the chain: benchmarks/chain_stop.py (a backbone evaluated on chains that stop at
several steps) and bench's ``stop`` baseline (refit_gym.training.chain_stop); the stop chosen on
validation only, and stops the id's chain cannot take refused before any work."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chain_stop import parse_stops, report, study

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.specs import all_env_specs, load_env_spec
from refit_gym.training import chain_stop
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
    with pytest.raises(SystemExit, match=r"--stops: .*stop step must be in \[0, T\) = \[0, 100\)"):
        study(spec, data, [("1", str(pretrained_seq_synthetic))], [0, 100])
    # The id's K = 20, at most the T - s = 10 steps above s = 90; every_step: T - s.
    for stop, every_step, steps in ((90, False, "10"), (40, False, "20"), (40, True, "60")):
        result = study(spec, data, [("1", str(pretrained_seq_synthetic))], [stop], rows=8,
                       trajectories=2, every_step=every_step)
        assert result.rows[0].split(" | ")[1:3] == [str(stop), steps] and result.chosen == stop
    with pytest.raises(SystemExit, match="comma-separated integers"):
        parse_stops("0,a")


def test_the_stop_baseline_keeps_the_best_stop_on_validation(pretrained_seq_synthetic: Path,
                                                              monkeypatch) -> None:
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    monkeypatch.setattr(chain_stop, "stop_grid", lambda spec: [0, 40, 90])
    cell = chain_stop.tune_stop(spec, data, pretrained_seq_synthetic, seed=1)
    scores = {g["params"]["stop_step"]: g["valid"] for g in cell["grid"]}
    assert list(scores) == [0, 40, 90]
    chosen = max(scores, key=lambda s: (scores[s], -s))  # ties: the smallest stop
    # K is the id's 20 steps, at most the T - s = 10 left above s = 90.
    assert cell["params"] == {"stop_step": chosen, "steps": 10 if chosen == 90 else 20}
    model, _ = load_backbone(pretrained_seq_synthetic, data.n_items)
    settings = EnvSettings.resolve(spec, {"stop_step": chosen, "steps": cell["params"]["steps"]})
    with eval_mode(model):
        expected = evaluate(model, data, spec.pretrain, chain=settings.chain(spec))
        whole = evaluate(model, data, spec.pretrain, chain=EnvSettings.resolve(spec, {}).chain(
            spec), splits=("valid",))
    assert scores[0] == whole["valid"]["ndcg@20"]  # s = 0: the environment's own chain
    for split in ("valid", "test", "test_seen", "test_unseen", "valid_std"):
        assert cell[split] == expected[split]
    assert cell["valid"]["ndcg@20"] == scores[chosen] and cell["history"] == []


def test_the_stop_is_chosen_on_validation_alone_the_smallest_of_ties(
        pretrained_seq_synthetic: Path, monkeypatch) -> None:
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    valid = {0: 0.1, 40: 0.3, 60: 0.3, 90: 0.2}
    calls = []

    def scripted(model, data, config, *, device, chain, splits):
        calls.append((chain.stop_step, chain.steps, tuple(splits)))
        # Test ranks the stops the other way round: choosing on it would pick s = 0.
        score = valid[chain.stop_step] if splits == ("valid",) else 1 - valid[chain.stop_step]
        return {splits[0]: {"ndcg@20": score}}

    monkeypatch.setattr(chain_stop, "stop_grid", lambda spec: list(valid))
    monkeypatch.setattr(chain_stop, "evaluate", scripted)
    cell = chain_stop.tune_stop(spec, data, pretrained_seq_synthetic, seed=1)
    assert cell["params"] == {"stop_step": 40, "steps": 20}
    assert cell["valid"] == {"ndcg@20": 0.3} and cell["test"] == {"ndcg@20": 0.7}
    assert calls == [(0, 20, ("valid",)), (40, 20, ("valid",)), (60, 20, ("valid",)),
                     (90, 10, ("valid",)), (40, 20, ("test",))]  # test once, at the choice


def test_the_stop_baseline_refuses_what_it_cannot_stop(pretrained_seq_synthetic: Path,
                                                       monkeypatch) -> None:
    spec, data = load_env_spec(SEQ), cached_dataset(SEQ)
    with pytest.raises(ValueError, match="ReFiT-Synthetic-v0 is a collaborative-filtering id"):
        chain_stop.stopped_chains(load_env_spec("ReFiT-Synthetic-v0"))
    with pytest.raises(ValueError, match="drop stop_step from --env-kwargs"):
        chain_stop.tune_stop(spec, data, pretrained_seq_synthetic, 1,
                             env_kwargs={"stop_step": 10})
    with pytest.raises(ValueError, match=r"'stop' at stop_step 12 with --env-kwargs "
                                         r"\{'steps': 1\}: .*1-step chain"):
        chain_stop.stopped_chains(spec, {"steps": 1})
    for bad in ({"fractions": [0.5, 0.2]}, {"fractions": [0, 1.5]}, {"fractions": []},
                {"fractions": [True]}, {"stop_step": [0, 4]}, {"fractions": 0.5}):
        monkeypatch.setattr(chain_stop, "load_agent_hyperparams",
                            lambda algo, env_id, bad=bad: bad)
        with pytest.raises(ValueError, match=rf"agents/stop.toml \[{SEQ}\]: one key, fractions"):
            chain_stop.stopped_chains(spec)


def test_every_shipped_stop_grid_spans_its_chain() -> None:
    sequential = [spec for spec in all_env_specs().values() if spec.backbone_type != "diffrec"]
    assert len(sequential) >= 9
    for spec in sequential:
        steps = spec.diffusion.steps
        stops = chain_stop.stop_grid(spec)
        assert stops[0] == 0 and stops[-1] == steps - 1 and stops == sorted(set(stops))
        assert [stop for stop, _ in chain_stop.stopped_chains(spec)] == stops
    assert chain_stop.stop_grid(load_env_spec("ReFiT-Beauty-Concat-v0")) == [
        0, 4, 8, 12, 16, 20, 24, 28, 31]  # chain_stop.py's scan
    assert chain_stop.stop_grid(load_env_spec(SEQ)) == [0, 12, 25, 38, 50, 62, 75, 88, 99]
