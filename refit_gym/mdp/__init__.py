"""The MDP layer: the batched denoising core, its terminal rewards, its three faces (a
``gymnasium.Env``, a natively batched ``gymnasium.vector.VectorEnv`` and a Stable-Baselines3
``VecEnv``) and the registration of every id with Gymnasium."""

from refit_gym.mdp.core import ACTION_BOUND, DenoisingMDP, StepResult
from refit_gym.mdp.episodes import (
    EpisodeSource,
    EpisodeStart,
    InteractionEpisodes,
    SequenceEpisodes,
)
from refit_gym.mdp.gym_env import EnvSettings, ReFiTEnv, ReFiTVectorEnv, cached_dataset, make_core
from refit_gym.mdp.registration import register_envs
from refit_gym.mdp.rewards import Propagator, Reward, TransitionPropagator, make_reward
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv

__all__ = ["ACTION_BOUND", "DenoisingMDP", "EnvSettings", "EpisodeSource", "EpisodeStart",
           "InteractionEpisodes", "Propagator", "ReFiTEnv", "ReFiTVecEnv", "ReFiTVectorEnv",
           "Reward", "SequenceEpisodes", "StepResult", "TransitionPropagator", "cached_dataset",
           "make_core", "make_reward", "register_envs"]
