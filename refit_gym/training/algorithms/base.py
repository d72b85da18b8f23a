"""What the driver gives a built-in algorithm to build itself from (:class:`Setup`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refit_gym.backbones import Backbone
from refit_gym.data import Dataset
from refit_gym.mdp.episodes import EpisodeSource
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.mdp.rewards import Reward
from refit_gym.specs import EnvSpec


@dataclass
class Setup:
    """A fine-tuning run as the driver resolved it, before training starts."""

    spec: EnvSpec
    data: Dataset
    settings: EnvSettings  # the MDP's options (the spec's, as env_kwargs changed them)
    source: EpisodeSource  # the training episodes on the chain the agents tune
    reward: Reward
    model: Backbone  # the pretrained start: the policy to tune
    reference: Backbone  # a frozen copy of the start (a KL anchor, the env's item table)
    params: dict[str, Any]  # agents/<algo>.toml's table for the id and device, then overrides
    seed: int
    device: str
    out_dir: Path
    budget_seconds: float | None  # training wall time (continue's), else None

    def refuse_budget(self, name: str) -> None:
        """A wall-time budget is continue's; an epoch-counted algorithm refuses one."""
        if self.budget_seconds is not None:
            raise ValueError(f"a wall-time budget (--budget-seconds) is continue's; {name} "
                             "runs the epochs of its hyperparameters (--set epochs=N)")
