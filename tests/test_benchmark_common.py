"""benchmarks/common.py: result files are written whole or not at all; the chain studies refuse
a collaborative-filtering id."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common


def test_an_interrupted_result_write_leaves_the_old_file_whole(tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    path = common.write_result("study", "A study", ["| a | 1 |"], folder=tmp_path)
    old = path.read_text()
    assert old.startswith("# A study\n") and "| a | 1 |" in old

    def killed(self: Path, text: str, *args, **kwargs) -> int:
        """The process dies halfway through writing the file."""
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        common.write_result("study", "A study, rerun", ["| a | 2 |"], folder=tmp_path)
    monkeypatch.undo()
    assert path.read_text() == old
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_bench_details_lists_each_fine_tuned_cells_passes_and_selection() -> None:
    import bench_details

    def run(passes: list[float], selected: int) -> dict:
        history = [{"epoch": i, "elapsed": 10.0 * i, "fixed_reward": -5.0 + i,
                    "valid": {"ndcg@20": v}} for i, v in enumerate(passes)]
        return {"history": history, "selection": {"best_epoch": selected},
                "test": {"hr@20": 0.25, "ndcg@20": 0.125}}

    results = {"seeds": [1, 2], "cells": {
        "pretrained": [{"history": [], "test": {"hr@20": 0.2, "ndcg@20": 0.1}}] * 2,
        "refit": [run([0.1, 0.2], 1), run([0.3, 0.2, 0.1], 0)]}}
    lines = bench_details.details(results)
    assert lines[0].endswith("| test hr@20 / ndcg@20 |") and len(lines) == 4  # no pretrained
    assert lines[2] == ("| 1 | refit | 1 (10) | 0.10000, 0.20000 | -5.000 -> -4.000 | 1 | "
                        "0.2500 / 0.12500 |")
    assert lines[3].startswith("| 2 | refit | 2 (20) | 0.30000, 0.20000, 0.10000 |")
    # Zhihu's negative MSE rewards are about 1e-4: four significant digits, not "-0.000".
    small = run([0.1, 0.2], 1)
    for step, reward in zip(small["history"], (-6.14e-4, -5.98e-4)):
        step["fixed_reward"] = reward
    line = bench_details.details({"seeds": [1], "cells": {"refit": [small]}})[2]
    assert "| -0.0006140 -> -0.0005980 |" in line
    assert bench_details.reward_text(-109.56) == "-109.560"  # Beauty's keep three decimals


def test_bench_details_takes_finetune_results_beside_a_bench_and_names_each_source() -> None:
    import bench_details

    history = [{"epoch": i, "elapsed": 5.0 * i, "fixed_reward": -2.0 + i,
                "valid": {"ndcg@20": 0.1 * (i + 1)}} for i in range(3)]
    probe = {"seed": 3, "algo": "refit", "history": history,
             "selection": {"best_epoch": 2}, "test": {"recall@20": 0.5, "ndcg@20": 0.25}}
    bench = {"seeds": [1], "cells": {"refit": [{**probe, "seed": 1}]}}
    lines = bench_details.details([("bench.json", bench), ("probe.json", probe)])
    assert lines[0].startswith("| source | seed | algo |") and lines[1].count("|---") == 8
    assert lines[2].startswith("| bench.json | 1 | refit | 2 (10) |")
    assert lines[3] == ("| probe.json | 3 | refit | 2 (10) | 0.10000, 0.20000, 0.30000 | "
                        "-2.000 -> 0.000 | 2 | 0.5000 / 0.25000 |")
    assert bench_details.details(probe)[2] == lines[3].removeprefix("| probe.json ")


def test_bench_details_tabulates_each_seeds_stop_scan() -> None:
    import bench_details

    cell = {"grid": [{"params": {"stop_step": 0}, "valid": 0.02},
                     {"params": {"stop_step": 24}, "valid": 0.045}],
            "params": {"stop_step": 24, "steps": 8}, "valid": {"ndcg@20": 0.045},
            "test": {"hr@10": 0.05, "hr@20": 0.07, "ndcg@20": 0.0335}, "wall_time_s": 348.4,
            "history": []}
    results = {"seeds": [3], "cells": {"stop": [cell]}}
    assert bench_details.details(results)[2:] == []  # no selection passes
    assert bench_details.stop_details(results)[2] == (
        "| 3 | 0: 0.0200, 24: 0.0450 | 24 (8) | 0.0450 | 0.0500 / 0.0335 | 348 |")
    assert bench_details.stop_details({"seeds": [1], "cells": {"refit": []}}) == []


def test_the_chain_studies_take_sequential_ids_only() -> None:
    from refit_gym.data import SequenceData

    spec, data = common.sequential_id("ReFiT-SeqSynthetic-v0")
    assert spec.id == "ReFiT-SeqSynthetic-v0" and isinstance(data, SequenceData)
    with pytest.raises(SystemExit, match="ReFiT-Synthetic-v0 is not a sequential id"):
        common.sequential_id("ReFiT-Synthetic-v0")
