"""`refit-gym bench`: outputs, the continue budget, and reuse of finished cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import refit_gym.training.bench as bench
from refit_gym.cli import main
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training import chain_stop

SYN = "ReFiT-Synthetic-v0"
SEQ = "ReFiT-SeqSynthetic-v0"


def test_bench_writes_table_json_plots_and_reuses_cells(tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--env", SYN, "--algos", "pretrained,refit,continue,pop,ease",
            "--seeds", "1,2",
            "--out", str(out), "--pretrain-max-epochs", "5", "--quiet",
            "--set", "refit.epochs=1", "--set", "refit.users_per_epoch=64"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["algos"] == ["pretrained", "refit", "continue", "ease", "pop"]
    ease = results["cells"]["ease"][0]
    assert ease["params"]["l2"] in (100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
    assert ease["test"] == results["cells"]["ease"][1]["test"]  # deterministic: seeds agree
    for seed_index, seed in enumerate((1, 2)):
        refit_cell = results["cells"]["refit"][seed_index]
        continue_cell = results["cells"]["continue"][seed_index]
        assert refit_cell["seed"] == seed
        assert continue_cell["wall_time_s"] >= refit_cell["wall_time_s"]  # the same budget
    mean, _ = results["summary"]["pretrained"]["test/ndcg@20"]
    pre = [c["test"]["ndcg@20"] for c in results["cells"]["pretrained"]]
    assert mean == pytest.approx(sum(pre) / 2)
    table = (out / "results.md").read_text()
    assert "| refit |" in table and "| ease |" in table and "test/ndcg@20" in table
    for name in ("learning_curves.png", "metrics.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    def no_more_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(bench, "finetune", no_more_training)
    monkeypatch.setattr(bench, "pretrain", no_more_training)
    monkeypatch.setattr(bench, "tune_peer", no_more_training)
    assert main(args) == 0  # everything reused
    # A --set on the same folder is refused, naming the key, instead of reporting old cells.
    capsys.readouterr()  # only the refusal's output (a cold cache's first run announces its work)
    assert main([*args[:-1], "refit.users_per_epoch=32"]) == 2
    error = capsys.readouterr().err.strip()
    assert "seed1/refit was computed with hyperparams.users_per_epoch = 64, this run gives " \
        "32" in error and len(error.splitlines()) == 1


def test_bench_rejects_bad_algorithm_lists(tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    with pytest.raises(ValueError, match="unknown algorithms"):
        bench.run_bench(spec, data, ["pretrained", "dqn"], [1], tmp_path)
    with pytest.raises(ValueError, match="include refit"):
        bench.run_bench(spec, data, ["continue"], [1], tmp_path)
    with pytest.raises(ValueError, match="ReFiT-Synthetic-v0 is a collaborative-filtering id"):
        bench.run_bench(spec, data, ["pretrained", "stop"], [1], tmp_path)  # before pretraining
    assert not any(tmp_path.iterdir())
    for stray in ("ppo", "ease", "stop"):  # not run; a peer or the stop, whose grid is its toml
        with pytest.raises(ValueError, match=rf"--set names \['{stray}'\]"):
            bench.run_bench(spec, data, ["refit", "ease", *(["stop"] if stray == "stop" else [])],
                            [1], tmp_path, hyperparams={stray: {"epochs": 1}})


def test_bench_orders_every_algorithm_it_accepts() -> None:
    from refit_gym.training.finetune import ALGOS
    from refit_gym.training.peers import PEER_NAMES

    # Every name the validation accepts has a place in the table (ddpo crashed the sort).
    assert set(bench.ORDER) == {"pretrained", "stop", *ALGOS, *PEER_NAMES}
    assert bench.order_algos(["ddpo", "ppo", "refit", "stop", "pretrained"]) == [
        "pretrained", "stop", "refit", "ddpo", "ppo"]
    with pytest.raises(ValueError, match=r"unknown algorithms \['dqn'\]"):
        bench.order_algos(["ddpo", "dqn"])


def test_bench_stops_the_pretrained_chain_where_validation_says(
        tmp_path: Path, pretrained_seq_synthetic: Path, monkeypatch) -> None:
    # The fixture's pretrain folder is the bench's seed-1 cell: the same identity (5 epochs).
    shutil.copytree(pretrained_seq_synthetic.parent, tmp_path / "seed1" / "pretrain")
    monkeypatch.setattr(bench, "pretrain", lambda *a, **k: pytest.fail("pretrained again"))
    monkeypatch.setattr(chain_stop, "stop_grid", lambda spec: [0, 50, 99])
    args = ["bench", "--env", SEQ, "--algos", "stop,pretrained", "--seeds", "1", "--out",
            str(tmp_path), "--pretrain-max-epochs", "5", "--quiet"]
    assert main(args) == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    stop, pretrained = cells["stop"][0], cells["pretrained"][0]
    assert stop["checkpoint"] == pretrained["checkpoint"]
    best = max(stop["grid"], key=lambda g: g["valid"])
    assert stop["params"]["stop_step"] == best["params"]["stop_step"]
    assert stop["valid"]["ndcg@20"] == best["valid"] and "test_unseen" in stop
    assert stop["identity"]["hyperparams"] == {"stop_step": [0, 50, 99]}
    assert "| stop |" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(bench, "tune_stop", lambda *a, **k: pytest.fail("scanned again"))
    assert main(args) == 0  # the finished cell is reused
    # Another grid or other env kwargs are another cell: refused, naming the key, before work.
    monkeypatch.setattr(chain_stop, "stop_grid", lambda spec: [0, 50])
    with pytest.raises(bench.CellMismatch, match="seed1/stop was computed with "
                                                 "hyperparams.stop_step"):
        bench.run_bench(load_env_spec(SEQ), cached_dataset(SEQ), ["stop"], [1], tmp_path,
                        pretrain_max_epochs=5)
    with pytest.raises(ValueError, match="drop stop_step from --env-kwargs"):
        bench.run_bench(load_env_spec(SEQ), cached_dataset(SEQ), ["stop"], [1],
                        tmp_path / "new", env_kwargs={"stop_step": 50})
    assert not (tmp_path / "new").exists()


def test_sequential_tables_split_test_by_target() -> None:
    def run(hr: float, seen: float, unseen: float) -> dict:
        metrics = {"hr@20": hr, "ndcg@20": hr / 2}
        return {"valid": metrics, "test": metrics, "wall_time_s": 1.0,
                "test_seen": {"hr@20": seen, "ndcg@20": seen / 2, "rows": 90},
                "test_unseen": {"hr@20": unseen, "ndcg@20": unseen / 2, "rows": 10}}

    cells = {"pretrained": [run(0.1, 0.0, 1.0), run(0.3, 0.2, 1.0)],
             "refit": [run(0.2, 0.1, 1.0), run(0.2, 0.1, 1.0)]}
    summary = bench.summarise(cells)
    # Sample std (n - 1): seeds 0.0 and 0.2 spread 0.2 / sqrt(2), not 0.1.
    assert summary["pretrained"]["test_seen/hr@20"] == pytest.approx((0.1, 0.2 / 2**0.5))
    table = bench.markdown_table("X-v0", summary, [1, 2], bench.split_rows(cells))
    assert "| pretrained | trained | 90 | 0.1000 ± 0.1414 | 0.0500 ± 0.0707 |" in table
    assert "| refit | never trained | 10 | 1.0000 ± 0.0000 | 0.5000 ± 0.0000 |" in table
    # The main table keeps to valid and test; a CF id (no splits) gets no split table.
    assert "test_seen" not in table
    cf = {a: [{k: v for k, v in r.items() if not k.startswith("test_")} for r in runs]
          for a, runs in cells.items()}
    assert "targets" not in bench.markdown_table("X-v0", bench.summarise(cf), [1, 2],
                                                 bench.split_rows(cf))


def test_one_seed_prints_no_spread() -> None:
    metrics = {"hr@20": 0.25, "ndcg@20": 0.125}
    cells = {"pretrained": [{"valid": metrics, "test": metrics, "wall_time_s": 3.0}]}
    table = bench.markdown_table("X-v0", bench.summarise(cells), [7])
    assert "± " not in table.split("\n", 1)[1]
    assert table.startswith("# X-v0: seed 7")
    assert "| pretrained | 0.2500 | 0.1250 | 0.2500 | 0.1250 | 3 |" in table


def test_every_algorithm_keeps_its_own_plot_colour() -> None:
    # A colour per algorithm, none shared, and the ones before the stop keep the shades they had
    # before the stop joined (the committed plots' colours).
    colours = [bench._colour(algo) for algo in bench.ORDER]
    assert len(set(colours)) == len(bench.ORDER)
    assert sorted(bench.COLOUR_ORDER) == sorted(bench.ORDER)
    earlier = [algo for algo in bench.ORDER if algo != bench.STOP]
    assert list(bench.COLOUR_ORDER[:len(earlier)]) == earlier
