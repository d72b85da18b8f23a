"""refit-gym: fine-tuning diffusion recommenders with reinforcement learning (ReFiT).

Importing the package registers ReFiT-ML1M-v0, ReFiT-AmazonBook-v0 and ReFiT-Synthetic-v0 with
Gymnasium; ``gym.make("refit_gym:ReFiT-ML1M-v0")`` imports it on demand.
"""

from refit_gym.data import InteractionData, load_dataset
from refit_gym.registration import register_envs
from refit_gym.specs import EnvSpec, load_env_spec

register_envs()

__all__ = ["EnvSpec", "InteractionData", "load_dataset", "load_env_spec"]
__version__ = "0.1.0"
