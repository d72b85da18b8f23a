"""Benchmarks report a spread over seeds with the project's one rule: the sample std (n - 1)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import mean_std


def test_benchmarks_report_the_sample_std_over_seeds() -> None:
    # n - 1: std 1 over (1, 2, 3); the population rule gave 0.8165.
    assert mean_std([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    assert mean_std([0.25]) == "0.2500"  # one seed: no spread to print
