"""Register every spec id with Gymnasium (done on ``import refit_gym``)."""

from __future__ import annotations

import gymnasium as gym

from refit_gym.specs import all_env_specs


def register_envs() -> None:
    for env_id in all_env_specs():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="refit_gym.mdp.gym_env:ReFiTEnv",
            vector_entry_point="refit_gym.mdp.gym_env:ReFiTVectorEnv",
            kwargs={"env_id": env_id},
        )
