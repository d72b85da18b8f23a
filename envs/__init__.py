"""Environment specs (one TOML per registered id), shipped as ``refit_gym.envs``."""
