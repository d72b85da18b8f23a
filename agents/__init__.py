"""Agent hyperparameters per algorithm, keyed by environment id, shipped as ``refit_gym.agents``."""
