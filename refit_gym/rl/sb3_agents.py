"""PPO, A2C (Stable-Baselines3) and TRPO (sb3-contrib) with the pretrained diffusion actor.

Hyperparameters come from agents/<algo>.toml in SB3's own argument names, plus four driver
keys: ``n_envs`` (parallel episodes), ``group_size`` (episodes per drawn user; > 1 turns on the
group-relative reward, :class:`GroupRelativeReward`), ``epochs`` and ``users_per_epoch`` (0 =
all users): one epoch is users_per_epoch x group_size episodes of T environment steps, the same
count of trajectories as a ReFiT epoch with the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from torch.nn.attention import SDPBackend, sdpa_kernel

from refit_gym.backbones import Backbone, backbone_configs
from refit_gym.data import Dataset
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.rl.sb3_policy import DiffusionActorCriticPolicy
from refit_gym.specs import EnvSpec


class TwiceDifferentiableTRPO(TRPO):
    """sb3-contrib's TRPO with attention on PyTorch's math kernel in its update: the KL's
    Hessian-vector product differentiates the policy twice, and the fused attention kernels
    (ADRec's encoder) have no second derivative."""

    def train(self) -> None:
        with sdpa_kernel(SDPBackend.MATH):
            super().train()


SB3_ALGOS: dict[str, type[OnPolicyAlgorithm]] = {"ppo": PPO, "a2c": A2C,
                                                 "trpo": TwiceDifferentiableTRPO}
DRIVER_KEYS = ("n_envs", "group_size", "epochs", "users_per_epoch")


def split_hyperparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(driver settings, SB3 constructor arguments)."""
    driver = {k: params[k] for k in DRIVER_KEYS if k in params}
    return driver, {k: v for k, v in params.items() if k not in DRIVER_KEYS}


def episodes_per_epoch(driver: dict[str, Any], n_episodes: int) -> int:
    """users_per_epoch (0: all ``n_episodes`` users or training rows) x group_size."""
    return (driver.get("users_per_epoch") or n_episodes) * driver["group_size"]


def make_vec_env(spec: EnvSpec, settings: EnvSettings, data: Dataset, n_envs: int,
                 group_size: int, seed: int) -> VecEnv:
    """The SB3 face of ``spec`` over ``data``'s training split; wrapped in
    :class:`GroupRelativeReward` when group_size > 1."""
    venv = ReFiTVecEnv(spec.id, num_envs=n_envs, seed=seed, group_size=group_size, data=data,
                       **dataclasses.asdict(settings))
    return GroupRelativeReward(venv) if group_size > 1 else venv


def make_model(algo: str, venv: VecEnv, pretrained: Backbone, sb3_args: dict[str, Any],
               seed: int, device: str) -> OnPolicyAlgorithm:
    """An SB3 model whose actor starts as ``pretrained``; unknown arguments raise TypeError."""
    sb3_args = dict(sb3_args)
    core = venv.get_attr("core")[0]
    policy_kwargs = {"backbone_configs": backbone_configs(pretrained),
                     "chain_steps": core.steps, "stop_step": core.chain.stop_step,
                     **sb3_args.pop("policy_kwargs", {})}
    model = SB3_ALGOS[algo](DiffusionActorCriticPolicy, venv, policy_kwargs=policy_kwargs,
                            seed=seed, device=device, verbose=0, **sb3_args)
    model.policy.backbone.load_state_dict(pretrained.state_dict())
    return model


class GroupRelativeReward(VecEnvWrapper):
    """Replaces each terminal reward by its advantage over the other episodes of its group.

    ``venv`` plays each user in ``group_size`` = G consecutive rows that start and end together
    (:class:`ReFiTVecEnv`). The reward of episode i becomes r_i - mean_{j != i} r_j over its
    group (leave-one-out): the baseline does not depend on episode i's actions, so the policy
    gradient stays unbiased, while the between-user spread of rewards, which a critic on
    (x_t, t) would have to learn user by user, cancels. Terminal rewards only, so with
    gamma = 1 every step of the episode sees the same centred return. The environment's own
    reward is kept in ``info["raw_reward"]``.
    """

    def __init__(self, venv: ReFiTVecEnv) -> None:
        if venv.group_size < 2:
            raise ValueError("GroupRelativeReward needs a ReFiTVecEnv with group_size >= 2")
        super().__init__(venv)

    @property
    def group_size(self) -> int:
        return self.venv.group_size

    def reset(self) -> dict[str, np.ndarray]:
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        if dones.any():
            grouped_done = dones.reshape(-1, self.group_size)
            if not (grouped_done.all(1) | ~grouped_done.any(1)).all():
                raise RuntimeError("episodes of one group ended at different steps")
            # Rows still running have reward 0, as do their group-mates: they stay 0.
            group = rewards.reshape(-1, self.group_size).astype(np.float64)
            others = (group.sum(1, keepdims=True) - group) / (self.group_size - 1)
            for row in np.flatnonzero(dones):
                infos[row]["raw_reward"] = float(rewards[row])
            rewards = (group - others).reshape(-1).astype(np.float32)
        return obs, rewards, dones, infos


class EpisodeRewards(BaseCallback):
    """Collects the environment's terminal reward of every finished episode during ``learn``
    (the raw one, before :class:`GroupRelativeReward`)."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[float] = []

    def _on_step(self) -> bool:
        dones = np.asarray(self.locals["dones"])
        rewards = np.asarray(self.locals["rewards"])
        infos = self.locals["infos"]
        self.rewards.extend(infos[row].get("raw_reward", float(rewards[row]))
                            for row in np.flatnonzero(dones))
        return True
