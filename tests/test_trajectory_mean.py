"""benchmarks/trajectory_mean.py: ranking by the mean of K sampled x_0 averages the sampler's
draws (its scores vary about K times less between sampling seeds) and its first draw is the
backbone's own single-trajectory inference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trajectory_mean import TrajectoryMean, validation_rows

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import cached_dataset

SEQ = "ReFiT-SeqSynthetic-v0"


def test_mean_of_trajectories_averages_the_draws(pretrained_seq_synthetic: Path) -> None:
    data = cached_dataset(SEQ)
    model, _ = load_backbone(pretrained_seq_synthetic, data.n_items)
    model.eval()
    batch = data.batch("valid", np.arange(64))
    batch["row"] = torch.arange(64)

    def scores(ranker: object, seed: int) -> torch.Tensor:
        return ranker.rank_scores(batch, None, torch.Generator().manual_seed(seed))

    k = 8
    mean = TrajectoryMean(model, k)
    draws = torch.stack([scores(model, seed) for seed in range(k)])  # sampling seed 0's draws
    torch.testing.assert_close(scores(mean, 0), draws.mean(0), rtol=1e-5, atol=1e-5)
    single_spread = (scores(model, 0) - scores(model, 1)).var()
    mean_spread = (scores(mean, 0) - scores(mean, 1)).var()
    assert single_spread > 0
    assert mean_spread < 0.5 * single_spread  # about 1/k of it
    with pytest.raises(ValueError, match="seeded generator"):
        mean.rank_scores(batch)


def test_report_rows_name_one_and_k_trajectories(pretrained_seq_synthetic: Path) -> None:
    rows = validation_rows(SEQ, str(pretrained_seq_synthetic), trajectories=2, seeds=2)
    assert [row.split(" | ")[1] for row in rows] == ["1", "2"]
    assert all(row.count("±") == 4 for row in rows)  # a spread over the two sampling seeds
    one_seed = validation_rows(SEQ, str(pretrained_seq_synthetic), trajectories=2, seeds=1)
    assert all("±" not in row for row in one_seed)  # one seed has no spread to report
