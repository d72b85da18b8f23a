"""benchmarks/cf_batch_study.py: the pick and `continue`'s equal-time budget from the records."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cf_batch_study

PICK, OTHER = "batch 512, group 32, lr 3e-5", "batch 512, lr 1e-5"
XEON, EPYC = "CPU: Intel(R) Xeon(R) Processor @ 2.50GHz", "CPU: AMD EPYC"


def record(config: str, seed: int, device: str, valid: float, seconds: float) -> dict:
    history = [{"epoch": 0, "elapsed": 0.0, "valid ndcg@20": 0.098},
               {"epoch": 1, "elapsed": seconds, "valid ndcg@20": valid}]
    return {"config": config, "seed": seed, "device": device, "best_epoch": 1,
            "history": history}


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
    assert cf_batch_study.continue_budget(RUNS, "NVIDIA H100 80GB HBM3") == (
        PICK, 123.0, "NVIDIA H100 80GB HBM3")
    assert cf_batch_study.continue_budget(RUNS, XEON) == (PICK, 7800.0, XEON)


def test_another_gpu_borrows_a_gpus_seconds_but_another_cpu_gets_none() -> None:
    assert cf_batch_study.continue_budget(RUNS, "NVIDIA H200") == (
        PICK, 123.0, "NVIDIA H100 80GB HBM3")
    assert cf_batch_study.continue_budget(RUNS, EPYC) is None
    assert cf_batch_study.continue_budget([], "NVIDIA H200") is None
