"""Chain influence: zero where the condition fixes the outcome, positive where the draw moves it."""

from __future__ import annotations

import pytest
import torch

from refit_gym.backbones import DreamRec, DreamRecConfig
from refit_gym.diffusion import DiffusionConfig
from refit_gym.training.chain_influence import chain_influence

N, L, D = 30, 4, 8
SCHEDULE = DiffusionConfig(steps=10, schedule="linear", beta_start=0.01, beta_end=0.3)


def _model(ignore_state: bool) -> DreamRec:
    torch.manual_seed(0)
    model = DreamRec(DreamRecConfig(n_items=N, max_len=L, hidden=D, guidance=1.0), SCHEDULE)
    if ignore_state:  # f(x_t, c, t) no longer reads x_t: the last step's mean is f(c, 0)
        with torch.no_grad():
            model.denoiser.weight[:, :D] = 0.0
    return model


def _batch(rows: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"history": torch.randint(0, N, (rows, L), generator=generator),
            "target": torch.randint(0, N, (rows,), generator=generator)}


def test_a_chain_the_condition_fixes_has_no_influence() -> None:
    model = _model(ignore_state=True)
    result = chain_influence(model, _batch(), model.diffusion, trajectories=5, top_k=5)
    assert result.reward_within_std == 0.0
    assert result.within_share == 0.0
    assert result.overlap_within == 1.0
    assert result.hit_disagreement == 0.0
    assert result.reward_between_std > 0  # rows still differ from each other


def test_a_chain_that_reads_its_state_has_influence() -> None:
    model = _model(ignore_state=False)
    result = chain_influence(model, _batch(), model.diffusion, trajectories=5, top_k=5)
    assert result.reward_within_std > 0
    assert 0 < result.within_share < 1
    assert result.overlap_within < 1.0


def test_the_policy_sampler_draws_at_the_last_step_too() -> None:
    # The agents' Gaussian policy samples every step, so even a chain the condition fixes
    # varies at its last step: the two samplers measure different things.
    model = _model(ignore_state=True)
    result = chain_influence(model, _batch(), model.diffusion, trajectories=5, top_k=5,
                             sampler="policy")
    assert result.reward_within_std > 0


def test_reward_is_the_targets_log_likelihood_and_draws_are_seeded() -> None:
    model = _model(ignore_state=True)
    batch = _batch()
    result = chain_influence(model, batch, model.diffusion, trajectories=3, tau=0.5)
    x0 = model.eval().generate(batch, model.diffusion, torch.Generator().manual_seed(0))
    expected = torch.log_softmax(model.scores(x0).double() / 0.5, -1)
    expected = expected.gather(1, batch["target"][:, None]).mean()
    assert result.reward_mean == pytest.approx(expected.item(), rel=1e-6)
    again = chain_influence(_model(ignore_state=False), batch, model.diffusion, trajectories=3)
    assert again == chain_influence(_model(ignore_state=False), batch, model.diffusion,
                                    trajectories=3)


def test_too_few_rows_or_trajectories_are_refused() -> None:
    model = _model(ignore_state=False)
    with pytest.raises(ValueError, match="2 trajectories"):
        chain_influence(model, _batch(), model.diffusion, trajectories=1)
    with pytest.raises(ValueError, match="unknown sampler"):
        chain_influence(model, _batch(), model.diffusion, sampler="mean")
