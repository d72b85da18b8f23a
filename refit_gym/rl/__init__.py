"""The RL layer: the ReFiT agent (group-baseline policy gradient on exact Gaussian
log-likelihoods) and Stable-Baselines3 / sb3-contrib algorithms whose actor is the backbone."""

from refit_gym.rl.refit_agent import (
    ReFiTAgent,
    ReFiTConfig,
    Rollout,
    group_advantages,
    policy_step,
)
from refit_gym.rl.sb3_agents import SB3_ALGOS, GroupRelativeReward, make_model, make_vec_env
from refit_gym.rl.sb3_policy import DiffusionActorCriticPolicy

__all__ = ["SB3_ALGOS", "DiffusionActorCriticPolicy", "GroupRelativeReward", "ReFiTAgent",
           "ReFiTConfig", "Rollout", "group_advantages", "make_model", "make_vec_env",
           "policy_step"]
