"""Noise schedules (betas, float64, shape (T,)) and respacing to a K-step subsequence.

DiffRec's "linear-var" makes the forward variance 1 - abar_t linear in t; DreamRec's "linear",
"cosine" and "exp" schedules are the usual DDPM ones, as its code defines them. Respacing keeps
every step an exact Gaussian: the K-step chain's betas are recomputed from abar along the chosen
subsequence (Nichol & Dhariwal, 2021), so its posterior variances are exact for that chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("linear-var", "linear", "cosine", "exp")
# The fixed variance of a reverse step: DDPM's "fixed small" posterior variance (DiffRec,
# DreamRec) or its "fixed large" beta_t (DiffuRec, ADRec), each clipped at the last step.
REVERSE_VARIANCES = ("posterior", "beta")


@dataclass(frozen=True)
class DiffusionConfig:
    """A schedule of ``steps`` (T) forward steps; which fields matter depends on ``schedule``."""

    steps: int
    schedule: str = "linear-var"
    # linear-var (DiffRec): 1 - abar_t from noise_scale*noise_min to noise_scale*noise_max
    noise_scale: float = 0.1
    noise_min: float = 0.0001
    noise_max: float = 0.02
    first_beta: float = 1e-5  # DiffRec's beta_fixed: beta_1 pinned to a small constant
    # linear (DreamRec, DDPM): beta_t from beta_start to beta_end
    beta_start: float = 1e-4
    beta_end: float = 0.02
    max_beta: float = 0.999
    reverse_variance: str = "posterior"  # one of REVERSE_VARIANCES


def linear_var_betas(config: DiffusionConfig) -> np.ndarray:
    """DiffRec: betas whose cumulative variance 1 - abar_t is linear in t."""
    variance = np.linspace(config.noise_scale * config.noise_min,
                           config.noise_scale * config.noise_max, config.steps, dtype=np.float64)
    alpha_bar = 1.0 - variance
    betas = np.empty(config.steps, dtype=np.float64)
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], config.max_beta)
    betas[0] = config.first_beta
    return betas


def linear_betas(config: DiffusionConfig) -> np.ndarray:
    """DDPM's linear betas, beta_start .. beta_end over T steps."""
    return np.linspace(config.beta_start, config.beta_end, config.steps, dtype=np.float64)


def cosine_betas(config: DiffusionConfig, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine abar, betas clipped to [1e-4, 0.9999] as DreamRec does."""
    x = np.linspace(0, config.steps, config.steps + 1, dtype=np.float64)
    alpha_bar = np.cos((x / config.steps + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 1e-4, 0.9999)


def exp_betas(config: DiffusionConfig, beta_min: float = 0.1, beta_max: float = 10.0) -> np.ndarray:
    """DreamRec's "exp" schedule: beta_t = 1 - exp(-beta_min/T - x_t (beta_max - beta_min) /
    (2 T^2)), x_t = linspace(1, 2T + 1, T) (a VP-SDE discretisation)."""
    steps = config.steps
    x = np.linspace(1, 2 * steps + 1, steps, dtype=np.float64)
    return 1 - np.exp(-beta_min / steps - x * 0.5 * (beta_max - beta_min) / (steps * steps))


def make_betas(config: DiffusionConfig) -> np.ndarray:
    """The betas (T,) float64 of ``config``; every value in (0, 1)."""
    if config.steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {config.steps}")
    builders = {"linear-var": linear_var_betas, "linear": linear_betas, "cosine": cosine_betas,
                "exp": exp_betas}
    if config.schedule not in builders:
        raise ValueError(f"unknown noise schedule {config.schedule!r}; supported: {SCHEDULES}")
    betas = builders[config.schedule](config)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"schedule {config.schedule!r} gives betas outside (0, 1): check its "
                         "parameters")
    return betas


def spaced_timesteps(steps: int, k: int, stop: int = 0) -> np.ndarray:
    """K network timesteps (ascending, distinct, first ``stop`` and last T-1) evenly spread over
    [stop, T). A chain over them ends with one jump from x_stop to x_0, whose posterior mean is
    the denoiser's x_0 prediction at timestep ``stop``: the chain stops there."""
    if not 0 <= stop < steps:
        raise ValueError(f"a chain's stop step must be in [0, T) = [0, {steps}), got {stop}")
    if not 1 <= k <= steps - stop:
        raise ValueError(f"a respaced chain needs 1 <= K <= T - stop = {steps - stop} steps "
                         f"(T = {steps}, stop = {stop}), got K = {k}")
    if k == 1:
        if stop not in (0, steps - 1):
            raise ValueError(f"a 1-step chain starts and ends at timestep T - 1 = {steps - 1}; "
                             f"it cannot stop at {stop} (use stop = {steps - 1}, or K >= 2)")
        return np.array([steps - 1])
    return np.round(np.linspace(stop, steps - 1, k)).astype(np.int64)


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Betas of the chain that visits only ``timesteps``: 1 - abar[s_k] / abar[s_{k-1}]."""
    alpha_bar = np.cumprod(1.0 - betas)[timesteps]
    previous = np.concatenate([[1.0], alpha_bar[:-1]])
    return 1.0 - alpha_bar / previous
