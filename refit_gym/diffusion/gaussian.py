"""The Gaussian diffusion maths shared by every backbone: forward noising, the DDPM posterior,
the reverse step's mean and fixed std, classifier-free guidance and exact log-densities.

Indexing follows DiffRec and DreamRec: a chain step ``t`` is an integer in ``[0, K)``; the
forward process q(x_{t+1} | x_0) of the paper's step t+1 is ``q_sample(x0, t)``. A respaced chain
(K < T steps) maps its step ``t`` to the network timestep ``timesteps[t]`` the denoiser was
trained on (:meth:`GaussianDiffusion.network_t`); a chain that *stops* at network timestep s > 0
visits timesteps in [s, T) only and its last step jumps from x_s to the denoiser's x_0
prediction there. Schedule tensors are float64: DiffRec's noise is
tiny (ML-1M: per-step std ~ 8e-4) and the ratios of its terms matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from refit_gym.diffusion.schedules import (
    REVERSE_VARIANCES,
    DiffusionConfig,
    make_betas,
    respace_betas,
    spaced_timesteps,
)


class GaussianDiffusion:
    """A K-step chain over a schedule of T steps (K = T unless ``respaced_steps`` is given),
    stopping at network timestep ``stop_step`` (needs ``respaced_steps``, K <= T - stop_step).

    Holds no network: the backbone that owns the denoiser passes its x0 prediction in, so the
    same object serves pretraining, the environment (which must not own a policy) and agents.
    """

    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu",
                 respaced_steps: int | None = None, stop_step: int = 0) -> None:
        if config.reverse_variance not in REVERSE_VARIANCES:
            raise ValueError(f"unknown reverse_variance {config.reverse_variance!r}; choose one "
                             f"of {REVERSE_VARIANCES}")
        self.config = config
        self.device = torch.device(device)
        betas_np = make_betas(config)
        self.timesteps: Tensor | None = None  # network timestep of each chain step; None = same
        if stop_step and respaced_steps is None:
            raise ValueError("a chain that stops early is a respaced chain: pass respaced_steps "
                             f"(K <= T - stop_step = {config.steps - stop_step})")
        self.stop_step = stop_step
        if respaced_steps is not None and (respaced_steps != config.steps or stop_step):
            spaced = spaced_timesteps(config.steps, respaced_steps, stop_step)
            betas_np = respace_betas(betas_np, spaced)
            self.timesteps = torch.from_numpy(spaced).to(self.device)
        self.steps = len(betas_np)
        betas = torch.tensor(betas_np, dtype=torch.float64, device=self.device)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = betas
        self.alphas_cumprod = abar
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance of the last step (t = 0) is exactly 0; like DDPM and DiffRec we
        # use the next one there so that a stochastic policy has a finite log-density everywhere.
        self.posterior_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]
        ) if self.steps > 1 else betas.clone()
        if stop_step:  # its last step returns x_0 as the whole chain's does: the same stand-in,
            # not the variance of the large step before it (noise of the order of x_0 itself).
            whole = GaussianDiffusion(config, self.device).posterior_variance_clipped[:1]
            self.posterior_variance_clipped = torch.cat(
                [whole, self.posterior_variance_clipped[1:]])
        # DDPM's "fixed large" alternative: beta_t, with the same stand-in at the last step.
        self.reverse_variance = (
            self.posterior_variance_clipped if config.reverse_variance == "posterior"
            else torch.cat([self.posterior_variance_clipped[:1], betas[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

    def respaced(self, steps: int, stop_step: int = 0) -> GaussianDiffusion:
        """The ``steps``-step chain over this schedule's T training steps, stopping at network
        timestep ``stop_step`` (0: it runs to the end)."""
        return GaussianDiffusion(self.config, self.device, respaced_steps=steps,
                                 stop_step=stop_step)

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        k = self.steps if self.timesteps is not None else None
        return GaussianDiffusion(self.config, device, respaced_steps=k, stop_step=self.stop_step)

    def network_t(self, t: Tensor) -> Tensor:
        """The denoiser's timestep input of chain steps ``t`` (B,) long."""
        return t if self.timesteps is None else self.timesteps[t]

    def _at(self, schedule: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``schedule[t]`` as a column in ``like``'s dtype, broadcastable over the state."""
        return schedule[t].to(like.dtype).unsqueeze(-1)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Shapes (B, d), (B,), (B, d)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def posterior_mean(self, x0_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) with x_0 := ``x0_pred``: c1_t x0_pred + c2_t x_t."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0_pred + self._at(
            self.posterior_mean_coef2, t, x_t
        ) * x_t

    def reverse_std(self, t: Tensor) -> Tensor:
        """sigma_t, the fixed std of the reverse step at ``t`` (float64, shape (B,)): the
        posterior's, or sqrt(beta_t) under ``reverse_variance = "beta"``."""
        return self.reverse_variance[t].sqrt()

    def snr(self, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)

    def snr_weight(self, t: Tensor) -> Tensor:
        """DiffRec's loss weight SNR(t-1) - SNR(t) of steps ``t`` (B,); 1 at t = 0."""
        weight = self.snr((t - 1).clamp(min=0)) - self.snr(t)
        return torch.where(t == 0, torch.ones_like(weight), weight)


def classifier_free_guidance(x0_cond: Tensor, x0_null: Tensor, weight: float) -> Tensor:
    """(1 + w) f(x_t, c, t) - w f(x_t, null, t): the guided x0 prediction (Ho & Salimans)."""
    if weight == 0:
        return x0_cond
    return (1.0 + weight) * x0_cond - weight * x0_null


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Exact log N(x; mean, diag(std^2)) of each row, summed over the d dimensions (float64).

    Shapes: x, mean (B, d); std (B,) or (B, d) -> (B,). With std ~ 1e-3 over thousands of items
    the log-density is ~ +2e4 and one row's z-scores are O(1): float64 keeps differences of
    log-probabilities (policy-gradient ratios) exact to ~1e-9 where float32 would lose ~1e-2.
    """
    x64, mean64, std64 = x.double(), mean.double(), std.double()
    d = x.shape[-1]
    if std64.dim() == 1:  # one std a row: its d equal logs are d log(std), not B d logs
        z, log_det = (x64 - mean64) / std64.unsqueeze(-1), d * std64.log()
    else:
        z, log_det = (x64 - mean64) / std64, std64.log().sum(-1)
    return -0.5 * z.pow(2).sum(-1) - log_det - 0.5 * d * math.log(2 * math.pi)
