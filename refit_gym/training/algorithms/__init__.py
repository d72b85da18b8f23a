"""The built-in fine-tuning algorithms, each a plug-in of the driver's protocol
(:class:`~refit_gym.rl.algorithm.Algorithm`) in its own module, built by name from a
:class:`Setup`. A new algorithm is one module, an entry in :data:`BUILDERS` and its
agents/<name>.toml; an algorithm of your own needs neither (docs/own_agent.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from refit_gym.rl.algorithm import Algorithm
from refit_gym.rl.sb3_agents import SB3_ALGOS
from refit_gym.training.algorithms.base import Setup
from refit_gym.training.algorithms.continue_training import CONTINUE_SETTINGS, Continue
from refit_gym.training.algorithms.ddpo import DDPO
from refit_gym.training.algorithms.refit import ReFiT
from refit_gym.training.algorithms.sb3 import SB3Algorithm

BUILDERS: dict[str, Callable[[Setup], Algorithm]] = {
    "refit": ReFiT,
    "ddpo": DDPO,
    "continue": Continue,
    **{name: partial(SB3Algorithm, name) for name in SB3_ALGOS},
}
ALGOS = tuple(BUILDERS)


def build(name: str, setup: Setup) -> Algorithm:
    """The algorithm ``name`` for the run ``setup`` describes."""
    if name not in BUILDERS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {ALGOS}")
    return BUILDERS[name](setup)


__all__ = ["ALGOS", "BUILDERS", "CONTINUE_SETTINGS", "DDPO", "Continue", "ReFiT", "SB3Algorithm",
           "Setup", "build"]
