"""refit-gym: fine-tuning diffusion recommenders with reinforcement learning (ReFiT)."""

from refit_gym.data import InteractionData, load_dataset
from refit_gym.specs import EnvSpec, load_env_spec

__all__ = ["EnvSpec", "InteractionData", "load_dataset", "load_env_spec"]
__version__ = "0.1.0"
