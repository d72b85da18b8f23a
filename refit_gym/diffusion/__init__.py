"""The diffusion layer: noise schedules, respacing, the DDPM posterior, classifier-free guidance
and exact Gaussian log-densities. No networks, no data: every backbone and agent shares it."""

from refit_gym.diffusion.gaussian import (
    GaussianDiffusion,
    classifier_free_guidance,
    gaussian_log_prob,
)
from refit_gym.diffusion.schedules import (
    REVERSE_VARIANCES,
    SCHEDULES,
    DiffusionConfig,
    make_betas,
    respace_betas,
    spaced_timesteps,
)

__all__ = ["REVERSE_VARIANCES", "SCHEDULES", "DiffusionConfig", "GaussianDiffusion",
           "classifier_free_guidance", "gaussian_log_prob", "make_betas", "respace_betas",
           "spaced_timesteps"]
