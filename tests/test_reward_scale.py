"""benchmarks/reward_scale.py: the training rows' log-likelihood over tau is seeded, a
log-probability (at most 0), and tends to the flat softmax's -log(n_items) as tau grows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reward_scale import TAUS, log_likelihoods

from refit_gym.mdp.gym_env import cached_dataset

SEQ = "ReFiT-SeqSynthetic-v0"


def test_log_likelihood_over_tau(pretrained_seq_synthetic: Path) -> None:
    means, tau, x_norm, e_norm = log_likelihoods(SEQ, str(pretrained_seq_synthetic), rows=128)
    assert (means, tau, x_norm, e_norm) == log_likelihoods(SEQ, str(pretrained_seq_synthetic),
                                                           rows=128)
    assert len(means) == len(TAUS) and all(m <= 0 for m in means)
    assert x_norm > 0 and e_norm > 0
    flat = -math.log(cached_dataset(SEQ).n_items)
    # |s| <= |x_0| |E_i|, so at tau the log-likelihood is within 2 |x_0| |E_i| / tau of flat.
    assert abs(means[-1] - flat) <= abs(means[0] - flat)
