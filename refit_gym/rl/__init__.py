"""The RL layer: the ReFiT agent (group-baseline policy gradient on exact Gaussian
log-likelihoods), DDPO's update on the same policy, Stable-Baselines3 / sb3-contrib algorithms
whose actor is the backbone, and the protocol an algorithm implements to run under the
fine-tuning driver (:mod:`refit_gym.rl.algorithm`)."""

from refit_gym.rl.algorithm import Algorithm, EpochContext, EpochStats, Extent
from refit_gym.rl.ddpo import DDPOAgent, DDPOConfig, ddpo_loss
from refit_gym.rl.refit_agent import (
    ReFiTAgent,
    ReFiTConfig,
    Rollout,
    group_advantages,
    policy_step,
)
from refit_gym.rl.sb3_agents import SB3_ALGOS, GroupRelativeReward, make_model, make_vec_env
from refit_gym.rl.sb3_policy import DiffusionActorCriticPolicy

__all__ = ["SB3_ALGOS", "Algorithm", "DDPOAgent", "DDPOConfig", "DiffusionActorCriticPolicy",
           "EpochContext", "EpochStats", "Extent", "GroupRelativeReward", "ReFiTAgent",
           "ReFiTConfig", "Rollout", "ddpo_loss", "group_advantages", "make_model",
           "make_vec_env", "policy_step"]
