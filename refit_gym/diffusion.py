"""DiffRec's Gaussian diffusion over interaction vectors (Wang et al., SIGIR 2023).

Indexing follows DiffRec: a network timestep ``t`` is an integer in ``[0, T)``; the forward
process q(x_{t+1} | x_0) of the paper's step t+1 is ``q_sample(x0, t)``. Schedule tensors are
float64 because the noise is tiny (ML-1M: per-step std ~ 8e-4) and their ratios matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int  # T, the number of diffusion (and denoising) steps
    noise_scale: float
    noise_min: float
    noise_max: float
    schedule: str = "linear-var"  # the forward variance 1 - abar_t rises linearly
    first_beta: float = 1e-5  # DiffRec's beta_fixed: beta_1 pinned to a small constant
    max_beta: float = 0.999


def linear_var_betas(config: DiffusionConfig) -> np.ndarray:
    """Betas whose cumulative variance 1 - abar_t is linear in t (float64, shape (T,))."""
    if config.schedule != "linear-var":
        raise ValueError(f"unknown noise schedule {config.schedule!r}; supported: 'linear-var'")
    if config.steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {config.steps}")
    variance = np.linspace(
        config.noise_scale * config.noise_min,
        config.noise_scale * config.noise_max,
        config.steps,
        dtype=np.float64,
    )
    alpha_bar = 1.0 - variance
    betas = np.empty(config.steps, dtype=np.float64)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], config.max_beta)
    betas[0] = config.first_beta
    return betas


class GaussianDiffusion:
    """The schedule, the forward noising, the DDPM posterior and DiffRec's ranking chain.

    Holds no network: the denoiser is passed in, so the same object serves pretraining, the
    environment (which must not own a policy) and every agent.
    """

    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.steps = config.steps
        self.device = torch.device(device)
        betas = torch.tensor(linear_var_betas(config), dtype=torch.float64, device=self.device)
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
        )
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

    def _at(self, schedule: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``schedule[t]`` as a column in ``like``'s dtype, broadcastable over items."""
        return schedule[t].to(like.dtype).unsqueeze(-1)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Shapes (B, n), (B,), (B, n)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def posterior_mean(self, x0_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) with x_0 := ``x0_pred``: c1_t x0_pred + c2_t x_t."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0_pred + self._at(
            self.posterior_mean_coef2, t, x_t
        ) * x_t

    def reverse_mean(self, denoiser: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
        """mu_theta(x_t, t), the deterministic reverse step. Shapes (B, n), (B,) -> (B, n)."""
        return self.posterior_mean(denoiser(x_t, t), x_t, t)

    def reverse_std(self, t: Tensor) -> Tensor:
        """sigma_t, the fixed posterior std of the reverse step at ``t`` (float64, shape (B,))."""
        return self.posterior_variance_clipped[t].sqrt()

    def snr(self, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)

    def training_loss(
        self, denoiser: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, reweight: bool
    ) -> Tensor:
        """DiffRec's per-row loss: MSE of the x0 prediction, weighted by SNR(t-1) - SNR(t).

        Shapes: x0 (B, n), t (B,) long, noise (B, n) -> (B,). The weight of t = 0 is 1.
        """
        mse = (denoiser(self.q_sample(x0, t, noise), t) - x0).pow(2).mean(dim=1)
        if not reweight:
            return mse
        weight = self.snr((t - 1).clamp(min=0)) - self.snr(t)
        weight = torch.where(t == 0, torch.ones_like(weight), weight)
        return weight.to(mse.dtype) * mse

    @torch.no_grad()
    def ranking_scores(
        self,
        denoiser: nn.Module,
        history: Tensor,
        sampling_steps: int = 0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DiffRec's inference: T reverse steps along the mean from the history (B, n) -> (B, n).

        With ``sampling_steps = k > 0`` the chain starts from a draw of q(x_k | history), as
        DiffRec's ``p_sample`` does; it still runs all T steps.
        """
        x = history
        if sampling_steps > 0:
            t = torch.full((x.shape[0],), sampling_steps - 1, device=x.device, dtype=torch.long)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.q_sample(x, t, noise)
        for step in reversed(range(self.steps)):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            x = self.reverse_mean(denoiser, x, t)
        return x


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Exact log N(x; mean, diag(std^2)) of each row, summed over the n dimensions (float64).

    Shapes: x, mean (B, n); std (B,) or (B, n) -> (B,). With std ~ 1e-3 over thousands of items
    the log-density is ~ +2e4 and one row's z-scores are O(1): float64 keeps differences of
    log-probabilities (policy-gradient ratios) exact to ~1e-9 where float32 would lose ~1e-2.
    """
    x64, mean64, std64 = x.double(), mean.double(), std.double()
    if std64.dim() == 1:
        std64 = std64.unsqueeze(-1).expand_as(x64)
    z = (x64 - mean64) / std64
    return -0.5 * z.pow(2).sum(-1) - std64.log().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
