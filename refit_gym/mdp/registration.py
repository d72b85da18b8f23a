"""Register the spec ids whose MDP exists with Gymnasium (done on ``import refit_gym``)."""

from __future__ import annotations

import gymnasium as gym

from refit_gym.specs import all_env_specs

# The denoising MDP is built for these backbones; a sequential (DreamRec) id can be pretrained
# and evaluated, and is registered as an environment once its MDP exists.
MDP_BACKBONES = ("diffrec",)


def register_envs() -> None:
    for env_id, spec in all_env_specs().items():
        if env_id in gym.registry or spec.backbone_type not in MDP_BACKBONES:
            continue
        gym.register(
            id=env_id,
            entry_point="refit_gym.mdp.gym_env:ReFiTEnv",
            vector_entry_point="refit_gym.mdp.gym_env:ReFiTVectorEnv",
            kwargs={"env_id": env_id},
        )
