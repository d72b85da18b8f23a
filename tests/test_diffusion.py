from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refit_gym.backbones import DiffRec, DiffRecConfig, timestep_embedding
from refit_gym.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    classifier_free_guidance,
    gaussian_log_prob,
    make_betas,
    spaced_timesteps,
)
from refit_gym.specs import load_env_spec
from refit_gym.training.pretrain import LossAwareTimestepSampler

ML1M = load_env_spec("ReFiT-ML1M-v0").diffusion


def test_linear_var_schedule_matches_definition() -> None:
    d = GaussianDiffusion(ML1M)
    variance = np.linspace(0.005 * 0.005, 0.005 * 0.01, 40)
    abar = 1 - variance
    assert d.betas[0].item() == 1e-5
    np.testing.assert_allclose(d.betas[1:].numpy(), 1 - abar[1:] / abar[:-1], rtol=1e-12)
    # Pinning beta_1 rescales every later abar_t by the same factor: abar_t stays proportional
    # to 1 - var_t (the linear-var schedule), with ratio (1 - 1e-5) / (1 - var_1).
    ratio = d.alphas_cumprod.numpy() / abar
    np.testing.assert_allclose(ratio, (1 - 1e-5) / abar[0], rtol=1e-12)
    # On ML-1M the per-step posterior std is about 7.8e-4.
    assert 7e-4 < d.reverse_std(torch.arange(40)).median().item() < 8.5e-4
    assert d.posterior_variance[0].item() == 0.0
    assert d.reverse_std(torch.tensor([0])).item() == d.reverse_std(torch.tensor([1])).item()


def test_posterior_mean_is_the_gaussian_posterior() -> None:
    """Compare with Bayes' rule for q(x_{t-1} | x_0) q(x_t | x_{t-1}), written independently."""
    d = GaussianDiffusion(DiffusionConfig(steps=10, noise_scale=0.1, noise_min=0.01, noise_max=0.5))
    torch.manual_seed(0)
    x0, xt = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    for step in range(1, 10):
        t = torch.full((4,), step)
        abar_prev, alpha, beta = d.alphas_cumprod[step - 1], 1 - d.betas[step], d.betas[step]
        precision = 1 / (1 - abar_prev) + alpha / beta
        mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + alpha.sqrt() * xt / beta) / precision
        torch.testing.assert_close(d.posterior_mean(x0, xt, t), mean)
        torch.testing.assert_close(d.posterior_variance[step], 1 / precision)


def test_q_sample_moments() -> None:
    d = GaussianDiffusion(DiffusionConfig(steps=5, noise_scale=0.1, noise_min=0.1, noise_max=0.5))
    x0 = torch.ones(20000, 3)
    t = torch.full((20000,), 4)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    assert xt.mean().item() == pytest.approx(d.sqrt_alphas_cumprod[4].item(), abs=2e-3)
    assert xt.var().item() == pytest.approx(1 - d.alphas_cumprod[4].item(), rel=0.03)


def test_gaussian_log_prob_is_exact_and_stable() -> None:
    torch.manual_seed(0)
    n = 2810
    mean = torch.rand(3, n)
    std = torch.full((3,), 7.8e-4, dtype=torch.float64)
    x = (mean.double() + std[:, None] * torch.randn(3, n, dtype=torch.float64)).float()
    reference = torch.distributions.Normal(mean.double(), std[:, None]).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), reference, rtol=0, atol=1e-6)
    # Per-dimension std gives the same answer; a shifted mean changes it by the exact quadratic.
    torch.testing.assert_close(gaussian_log_prob(x, mean, std[:, None].expand(3, n)), reference)
    # A small shift of the (float32) mean changes the result by exactly the quadratic
    # difference of the z-scores: the ratio a policy gradient needs, with no float32 loss.
    shifted = mean + 1e-4
    delta = gaussian_log_prob(x, shifted, std) - gaussian_log_prob(x, mean, std)
    z_new = (x.double() - shifted.double()) / std[:, None]
    z_old = (x.double() - mean.double()) / std[:, None]
    exact = -0.5 * (z_new.pow(2) - z_old.pow(2)).sum(-1)
    torch.testing.assert_close(delta, exact, rtol=1e-9, atol=1e-7)


def test_training_loss_reweighting() -> None:
    torch.manual_seed(0)
    plain_model = DiffRec(DiffRecConfig(n_items=6, dims=(4,), reweight=False), ML1M).eval()
    weighted_model = DiffRec(DiffRecConfig(n_items=6, dims=(4,), reweight=True), ML1M).eval()
    weighted_model.load_state_dict(plain_model.state_dict())
    batch = {"history": torch.bernoulli(torch.full((3, 6), 0.5))}
    t = torch.tensor([0, 5, 39])
    plain = plain_model.training_loss(batch, t, torch.Generator().manual_seed(1))
    weighted = weighted_model.training_loss(batch, t, torch.Generator().manual_seed(1))
    assert weighted[0].item() == pytest.approx(plain[0].item())
    snr = plain_model.diffusion.alphas_cumprod / (1 - plain_model.diffusion.alphas_cumprod)
    for i, step in enumerate([5, 39]):
        weight = (snr[step - 1] - snr[step]).item()
        assert weighted[i + 1].item() == pytest.approx(weight * plain[i + 1].item(), rel=1e-5)


def test_diffrec_generate_runs_t_steps_along_the_mean() -> None:
    config = DiffusionConfig(steps=4, noise_scale=0.1, noise_min=0.1, noise_max=0.5)
    calls = []

    class Identity(DiffRec):
        def predict_x0(self, x_t, t, condition):
            calls.append(int(t[0]))
            return x_t

    model = Identity(DiffRecConfig(n_items=5, dims=(3,)), config)
    d = model.diffusion
    history = torch.rand(2, 5)
    out = model.generate({"history": history})
    assert calls == [3, 2, 1, 0]
    expected = history
    for step in (3, 2, 1, 0):  # with x0_pred = x_t the mean is (c1 + c2) x_t
        expected = (d.posterior_mean_coef1[step] + d.posterior_mean_coef2[step]).float() * expected
    torch.testing.assert_close(out, expected)


def test_denoiser_architecture_and_embedding() -> None:
    model = DiffRec(DiffRecConfig(n_items=2810, dims=(200, 600)), ML1M)
    shapes = [tuple(layer.weight.shape) for layer in [*model.encoder, *model.decoder]]
    assert shapes == [(600, 2820), (200, 600), (600, 200), (2810, 600)]
    out = model.eval()(torch.rand(3, 2810), torch.tensor([0, 1, 39]))
    assert out.shape == (3, 2810)
    emb = timestep_embedding(torch.tensor([0, 3]), 10)
    assert emb.shape == (2, 10)
    assert emb[0, :5].tolist() == [1.0] * 5 and emb[0, 5:].tolist() == [0.0] * 5
    assert emb[1, 0].item() == pytest.approx(math.cos(3.0))


def test_dreamrec_schedules_match_their_formulas() -> None:
    """DDPM's linear, the cosine and DreamRec's exp schedule, each written out directly."""
    T = 50
    linear = make_betas(DiffusionConfig(steps=T, schedule="linear", beta_start=1e-4,
                                        beta_end=0.02))
    np.testing.assert_allclose(linear, [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)])
    cosine = make_betas(DiffusionConfig(steps=T, schedule="cosine"))

    def f(i: int) -> float:
        return math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2

    np.testing.assert_allclose(cosine, [min(max(1 - f(i + 1) / f(i), 1e-4), 0.9999)
                                        for i in range(T)], rtol=1e-12)
    exp = make_betas(DiffusionConfig(steps=T, schedule="exp"))
    x = [1 + 2 * T * i / (T - 1) for i in range(T)]
    np.testing.assert_allclose(exp, [1 - math.exp(-0.1 / T - xi * 0.5 * 9.9 / T**2) for xi in x],
                               rtol=1e-12)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas(DiffusionConfig(steps=T, schedule="sigmoid"))
    with pytest.raises(ValueError, match="outside"):
        make_betas(DiffusionConfig(steps=T, schedule="linear", beta_start=0.5, beta_end=1.5))


def test_respacing_keeps_abar_and_exact_posteriors() -> None:
    config = DiffusionConfig(steps=500, schedule="linear")
    full = GaussianDiffusion(config)
    assert full.respaced(500).timesteps is None  # K = T is the chain itself
    chain = full.respaced(20)
    steps = spaced_timesteps(500, 20)
    assert chain.steps == 20 and steps[0] == 0 and steps[-1] == 499
    assert np.all(np.diff(steps) > 0)
    # abar along the chain is the full schedule's abar at the visited timesteps.
    torch.testing.assert_close(chain.alphas_cumprod, full.alphas_cumprod[torch.from_numpy(steps)])
    # Its posterior variance is Bayes' rule for the chain's own (larger) steps.
    for k in range(1, 20):
        abar, abar_prev = chain.alphas_cumprod[k], chain.alphas_cumprod[k - 1]
        beta = 1 - abar / abar_prev
        torch.testing.assert_close(chain.posterior_variance[k],
                                   beta * (1 - abar_prev) / (1 - abar))
    torch.testing.assert_close(chain.network_t(torch.tensor([0, 19])),
                               torch.tensor([0, 499]))
    with pytest.raises(ValueError, match="K <= T"):
        full.respaced(501)


def test_a_chain_that_stops_ends_at_the_x0_prediction() -> None:
    full = GaussianDiffusion(DiffusionConfig(steps=32, schedule="linear", beta_start=0.01,
                                             beta_end=0.6, reverse_variance="beta"))
    chain = full.respaced(20, stop_step=12)
    assert chain.steps == 20 and chain.stop_step == 12
    np.testing.assert_array_equal(chain.network_t(torch.arange(20)).numpy(), np.arange(12, 32))
    torch.testing.assert_close(chain.alphas_cumprod, full.alphas_cumprod[12:])
    # Its last step jumps from x_12 to x_0: the posterior mean is the x_0 prediction itself.
    x0_pred, x_t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    last = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(chain.posterior_mean(x0_pred, x_t, last), x0_pred)
    # The agents' last-step std is the whole chain's stand-in, not the variance of the large
    # step before the jump; every other step keeps the chain's own.
    torch.testing.assert_close(chain.reverse_variance[:1], full.reverse_variance[:1])
    torch.testing.assert_close(chain.reverse_variance[1:], chain.betas[1:])
    assert chain.posterior_variance[1] > 10 * full.reverse_variance[0]
    assert chain.to("cpu").stop_step == 12 and full.respaced(3, stop_step=12).steps == 3
    assert full.respaced(1, stop_step=31).network_t(torch.tensor([0])).item() == 31
    np.testing.assert_array_equal(spaced_timesteps(32, 3, 12), [12, 22, 31])
    with pytest.raises(ValueError, match="stop step must be in"):
        full.respaced(1, stop_step=32)
    with pytest.raises(ValueError, match="K <= T - stop = 20"):
        full.respaced(21, stop_step=12)
    with pytest.raises(ValueError, match="cannot stop at 12"):
        full.respaced(1, stop_step=12)
    with pytest.raises(ValueError, match="pass respaced_steps"):
        GaussianDiffusion(full.config, stop_step=12)


def test_classifier_free_guidance() -> None:
    cond, null = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(classifier_free_guidance(cond, null, 4.0),
                               5 * cond - 4 * null)
    assert classifier_free_guidance(cond, null, 0.0) is cond


def test_sampler_history_matches_diffrec_loop_and_samples_by_loss() -> None:
    sampler = LossAwareTimestepSampler(steps=3, history=4)
    reference = {s: [] for s in range(3)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        t = torch.randint(0, 3, (7,), generator=gen)
        losses = torch.rand(7, generator=gen)
        sampler.record(t, losses)
        for step, loss in zip(t.tolist(), losses.tolist()):  # DiffRec's per-element update
            reference[step] = (reference[step] + [loss])[-4:]
    for step in range(3):
        count = sampler.counts[step].item()
        assert sampler.losses[step, :count].tolist() == pytest.approx(reference[step])
    assert bool((sampler.counts == 4).all())
    sampler.losses[:] = torch.tensor([[1.0], [0.0], [0.0]])  # all the loss sits at step 0
    t, pt = sampler.sample(1000, gen)
    assert (t == 0).float().mean() > 0.99
    assert pt[t == 0].mean().item() == pytest.approx(3 * (0.999 + 0.001 / 3))
    empty = LossAwareTimestepSampler(steps=3)
    t, pt = empty.sample(5, gen)
    assert pt.tolist() == [1.0] * 5
