"""benchmarks/cf_batch_study.py: the pick and `continue`'s equal-time budget from the records."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cf_batch_study
from cf_batch_study import Budget

PICK, OTHER = "batch 512, group 32, lr 3e-5", "batch 512, lr 1e-5"
XEON, EPYC = "CPU: Intel(R) Xeon(R) Processor @ 2.50GHz", "CPU: AMD EPYC"


def record(config: str, seed: int, device: str, valid: float, seconds: float,
           users: int = 5949) -> dict:
    """One epoch of ``users`` users: 12 updates of 512 users for the full 5,949."""
    history = [{"epoch": 0, "elapsed": 0.0, "valid ndcg@20": 0.098},
               {"epoch": 1, "elapsed": seconds, "valid ndcg@20": valid}]
    return {"config": config, "seed": seed, "device": device, "best_epoch": 1,
            "history": history, "users_per_epoch": users}


RUNS = [record(PICK, 1, "NVIDIA H100 80GB HBM3", 0.105, 120.0),
        record(PICK, 2, "NVIDIA H100 80GB HBM3", 0.107, 126.0),
        record(PICK, 3, XEON, 0.106, 7800.0),
        record(OTHER, 1, "NVIDIA H100 80GB HBM3", 0.101, 100.0),
        record(OTHER, 2, "NVIDIA H100 80GB HBM3", 0.102, 80.0),
        record(OTHER, 3, "NVIDIA H100 80GB HBM3", 0.100, 85.0)]


def test_the_pick_is_the_best_mean_validation_over_the_most_seeds() -> None:
    assert cf_batch_study.choose(RUNS) == PICK
    # With fewer seeds, a row cannot win on a lucky one.
    assert cf_batch_study.choose([*RUNS[:1], *RUNS[3:]]) == OTHER


def test_continue_gets_the_picks_seconds_on_the_same_device_model() -> None:
    assert cf_batch_study.continue_budget(RUNS, "NVIDIA H100 80GB HBM3") == Budget(
        PICK, 123.0, "NVIDIA H100 80GB HBM3")
    assert cf_batch_study.continue_budget(RUNS, XEON) == Budget(PICK, 7800.0, XEON)


def test_another_gpu_borrows_a_gpus_seconds_but_another_cpu_gets_none() -> None:
    assert cf_batch_study.continue_budget(RUNS, "NVIDIA H200") == Budget(
        PICK, 123.0, "NVIDIA H100 80GB HBM3")
    assert cf_batch_study.continue_budget(RUNS, EPYC) is None
    assert cf_batch_study.continue_budget([], "NVIDIA H200") is None


def test_a_probe_gives_another_cpu_the_picks_updates_at_its_measured_rate() -> None:
    probe = record(PICK + cf_batch_study.PROBE, 1, EPYC, 0.099, 150.0, users=1024)
    assert cf_batch_study.updates(probe) == 2 and cf_batch_study.updates(RUNS[0]) == 12
    budget = cf_batch_study.continue_budget([*RUNS, probe], EPYC)
    assert budget[:3] == (PICK, 12 * 75.0, EPYC)
    assert "12 updates at 75.0 s each" in budget.basis
    # A probe neither counts for the pick nor stands in for another device's seconds.
    assert cf_batch_study.choose([*RUNS, probe]) == PICK
    assert cf_batch_study.continue_budget([*RUNS, probe], XEON) == Budget(PICK, 7800.0, XEON)
    assert cf_batch_study.continue_budget([*RUNS, {**probe, "device": XEON}], EPYC) is None


def test_records_are_appended_whole_and_a_broken_line_is_named(tmp_path: Path,
                                                               monkeypatch) -> None:
    import json

    import pytest

    records = tmp_path / "runs.jsonl"
    records.touch()
    cf_batch_study.append_record(records, RUNS[0])
    cf_batch_study.append_record(records, RUNS[1])
    assert cf_batch_study.load(records) == RUNS[:2]

    def killed(*args, **kwargs):  # the process dies while the new file is being written
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", killed)
    with pytest.raises(KeyboardInterrupt):
        cf_batch_study.append_record(records, RUNS[2])
    monkeypatch.undo()
    assert cf_batch_study.load(records) == RUNS[:2]  # the old records, whole
    assert list(tmp_path.iterdir()) == [records]  # no temporary file left behind
    records.write_text(records.read_text() + '{"config": "half')
    with pytest.raises(SystemExit, match="runs.jsonl line 3 is not a JSON record"):
        cf_batch_study.load(records)


def test_a_run_records_test_on_every_epoch_of_its_history(tmp_path: Path,
                                                           monkeypatch) -> None:
    import argparse
    import json
    import subprocess
    import time

    from refit_gym.cli import build_parser

    def fake_run(command: list[str], **kwargs) -> None:
        """The driver's history: test on every epoch only under --test-curve."""
        args = build_parser().parse_args(command[3:])  # the real CLI accepts the command
        metrics = {m: 0.1 for m in cf_batch_study.METRICS}
        history = [{"epoch": e, "elapsed": 10.0 * e, "fixed_reward": None, "valid": metrics,
                    **({"test": metrics} if args.test_curve or e == 0 else {})}
                   for e in range(3)]
        Path(args.out).mkdir(parents=True)
        (Path(args.out) / "metrics.json").write_text(
            json.dumps({"best_epoch": 2, "history": history}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = argparse.Namespace(
        work=tmp_path, users_per_epoch=None, max_epochs=2, probe_updates=2,
        continue_eval_every=1, device="cpu", threads=1, device_name=XEON, parallel=1,
        train_users=5949, digests=["abc"])
    for config, budget in ((OTHER, None), (cf_batch_study.CONTINUE, Budget(PICK, 60.0, XEON))):
        record = cf_batch_study.run_finetune(config, 1, tmp_path / "ck.pt", args,
                                             time.monotonic() + 3600, budget)
        assert [h["test ndcg@20"] for h in record["history"]] == [0.1, 0.1, 0.1]
        assert cf_batch_study.selected(record)["test recall@20"] == 0.1
