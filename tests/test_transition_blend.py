"""benchmarks/transition_blend.py: weight 0 ranks as the backbone alone and weight 1 as the
Markov peer alone, every weight on the same sampled x_0."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from transition_blend import SampledFinalStates, TransitionBlend

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.training.metrics import eval_mode, evaluate_sequential
from refit_gym.training.peers import Markov

SEQ = "ReFiT-SeqSynthetic-v0"


def test_blend_ends_are_the_backbone_and_the_peer(pretrained_seq_synthetic: Path) -> None:
    data = cached_dataset(SEQ)
    model, _ = load_backbone(pretrained_seq_synthetic, data.n_items)
    markov = Markov().fit(data, seed=0)
    settings = dict(ks=(10, 20), splits=("valid",), sampling_seeds=(0, 1), batch_size=512)
    final_states = SampledFinalStates(model)
    with eval_mode(model):
        alone = evaluate_sequential(model, data, **settings)["valid"]
        blends = {w: evaluate_sequential(TransitionBlend(final_states, markov, w, tau=1.0), data,
                                         **settings)["valid"] for w in (0.0, 0.3, 1.0)}
    cached = len(final_states.cache)
    assert cached == 2 * -(-len(data.targets["valid"]) // 512)  # one draw per seed and batch
    peer = evaluate_sequential(markov, data, **settings)["valid"]
    for metric in ("hr@10", "ndcg@20"):
        assert blends[0.0][metric] == pytest.approx(alone[metric], abs=1e-12)
        assert blends[1.0][metric] == pytest.approx(peer[metric], abs=1e-12)
    assert blends[0.3] != blends[0.0] and blends[0.3] != blends[1.0]
