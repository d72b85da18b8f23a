"""refit-gym: fine-tuning diffusion recommenders with reinforcement learning (ReFiT).

Layers, bottom to top (each imports only those below it): ``data``, ``diffusion`` and
``distributed`` (the torchrun group); ``backbones`` (DiffRec, DreamRec); ``specs``
(envs/*.toml); ``mdp`` (the denoising MDP and its Gymnasium and SB3 faces); ``rl`` (the ReFiT
agent, SB3 policy and algorithms); ``training`` (metrics, pretraining, fine-tuning,
benchmarks); ``cli``.

Importing the package registers every id whose MDP exists with Gymnasium;
``gym.make("refit_gym:ReFiT-ML1M-v0")`` imports it on demand.
"""

from refit_gym.backbones import Backbone, load_backbone, save_backbone
from refit_gym.data import InteractionData, SequenceData, load_dataset
from refit_gym.mdp.registration import register_envs, register_spec
from refit_gym.specs import EnvSpec, load_env_spec

register_envs()

__all__ = ["Backbone", "EnvSpec", "InteractionData", "SequenceData", "load_backbone",
           "load_dataset", "load_env_spec", "register_spec", "save_backbone"]
__version__ = "0.1.0"
