"""PPO, A2C (Stable-Baselines3) and TRPO (sb3-contrib) with the pretrained diffusion actor.

Hyperparameters come from agents/<algo>.toml in SB3's own argument names, plus three driver
keys: ``n_envs`` (parallel episodes), ``epochs`` and ``users_per_epoch`` (training length, in
episodes: one epoch is ``users_per_epoch`` episodes, i.e. that many times T environment steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from refit_gym.denoiser import MLPDenoiser
from refit_gym.sb3_policy import DiffusionActorCriticPolicy
from refit_gym.sb3_vec_env import ReFiTVecEnv
from refit_gym.specs import EnvSpec

SB3_ALGOS: dict[str, type[OnPolicyAlgorithm]] = {"ppo": PPO, "a2c": A2C, "trpo": TRPO}
DRIVER_KEYS = ("n_envs", "epochs", "users_per_epoch")


def split_hyperparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(driver settings, SB3 constructor arguments)."""
    driver = {k: params[k] for k in DRIVER_KEYS if k in params}
    return driver, {k: v for k, v in params.items() if k not in DRIVER_KEYS}


def make_model(algo: str, spec: EnvSpec, venv: ReFiTVecEnv, pretrained: MLPDenoiser,
               sb3_args: dict[str, Any], seed: int, device: str) -> OnPolicyAlgorithm:
    """An SB3 model whose actor starts as ``pretrained``; unknown arguments raise TypeError."""
    sb3_args = dict(sb3_args)
    policy_kwargs = {
        "denoiser_config": dataclasses.asdict(pretrained.config),
        "diffusion_config": dataclasses.asdict(spec.diffusion),
        **sb3_args.pop("policy_kwargs", {}),
    }
    model = SB3_ALGOS[algo](DiffusionActorCriticPolicy, venv, policy_kwargs=policy_kwargs,
                            seed=seed, device=device, verbose=0, **sb3_args)
    model.policy.denoiser.load_state_dict(pretrained.state_dict())
    return model


class EpisodeRewards(BaseCallback):
    """Collects the terminal reward of every finished episode during ``learn``."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[float] = []

    def _on_step(self) -> bool:
        dones = np.asarray(self.locals["dones"])
        if dones.any():
            self.rewards.extend(np.asarray(self.locals["rewards"])[dones].tolist())
        return True
