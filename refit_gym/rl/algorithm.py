"""The algorithm protocol: what the fine-tuning driver (:func:`refit_gym.training.finetune`)
runs, and all it asks of an algorithm.

The driver owns everything around training: the start model's evaluation, one validation pass
after each epoch with selection of the best model by validation NDCG@20, the fixed-episode
check, TensorBoard, the run's resumable state and the final evaluation. An algorithm owns its
policy (the :class:`~refit_gym.backbones.Backbone` being tuned), its optimiser and whatever
else it needs, and trains one epoch at a time::

    finetune(spec, data, checkpoint, algo=MyAlgorithm(...), out_dir="runs/mine")

ReFiT, DDPO, ``continue`` and PPO / A2C / TRPO are plug-ins of this protocol
(:mod:`refit_gym.training.algorithms`); docs/own_agent.md has a worked example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from refit_gym.backbones import Backbone


class Extent(NamedTuple):
    """How far a run is: ``done`` of ``total`` in ``unit`` (e.g. "epoch", "batch", or "s" for
    training seconds). The driver stops when ``done >= total`` and draws its bar in ``unit``."""

    done: float
    total: float
    unit: str


@dataclass
class EpochContext:
    """What the driver hands an epoch."""

    epoch: int  # the epoch to run, 1-based (0 is the start model's evaluation)
    log: Callable[[str, float, int], None]  # a TensorBoard scalar: (tag, value, step)
    # Save the run now, with the algorithm's state_dict(): a point a killed run resumes from
    # inside a long epoch. The driver does not count its time as training.
    checkpoint: Callable[[], None]
    advance: Callable[[float], None]  # move the driver's bar by that many units of the Extent


@dataclass
class EpochStats:
    """What an epoch reports to the driver."""

    rewards: list[float] = field(default_factory=list)  # mean training reward of each batch
    # False: no validation pass after this epoch (``continue`` validates every eval_every
    # epochs); the driver always validates the last epoch of a run.
    evaluate: bool = True


@runtime_checkable
class Algorithm(Protocol):
    """A fine-tuning algorithm the driver can run, select, checkpoint and resume.

    ``state_dict`` / ``load_state_dict`` hold everything but the policy's weights (the driver
    saves those): optimiser, random generators, the position in the run. A run resumed from
    them must continue as the uninterrupted one would.
    """

    name: str  # names the run (its progress bar, its identity, metrics.json's "algo")
    policy: Backbone  # the model being tuned: evaluated, selected and saved by the driver
    config: dict[str, Any]  # JSON-able settings: part of the run's identity, in metrics.json

    def progress(self, epochs: int, seconds: float) -> Extent:
        """How far the run is after ``epochs`` finished epochs and ``seconds`` of training."""
        ...

    def run_epoch(self, ctx: EpochContext) -> EpochStats:
        """Train one epoch (from where the last state left it, after a resume)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def missing_members(obj: object) -> list[str]:
    """The members of :class:`Algorithm` that ``obj`` lacks (its attributes and methods)."""
    members = [*Algorithm.__annotations__,
               *(name for name, value in vars(Algorithm).items()
                 if callable(value) and not name.startswith("_"))]
    return [name for name in members if not hasattr(obj, name)]
