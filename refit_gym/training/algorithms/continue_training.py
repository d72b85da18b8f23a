"""``continue``, the baseline, as a plug-in of the driver: more epochs of the backbone's own
pretraining loss under the spec's [pretrain] protocol, for a budget of training seconds (match
the RL run's ``wall_time_s`` for equal compute)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from refit_gym.distributed import current
from refit_gym.rl.algorithm import EpochContext, EpochStats, Extent
from refit_gym.training.algorithms.base import Setup
from refit_gym.training.pretrain import make_timestep_sampler, rank_generator, train_epoch
from refit_gym.training.resume import gather_random_states, restore_random_states

# What `continue` may change of the spec's [pretrain] protocol (``--set``): the optimiser's steps
# and how often validation interrupts a long run; the rest defines the backbone's own training.
CONTINUE_SETTINGS = ("lr", "weight_decay", "batch_size", "importance_sampling", "eval_every")


class Continue:
    """Epochs of :func:`~refit_gym.training.pretrain.train_epoch` until the budget is spent,
    validated every ``eval_every`` epochs (and after the last)."""

    name = "continue"

    def __init__(self, setup: Setup) -> None:
        if setup.budget_seconds is None:
            raise ValueError("--algo continue needs a wall-time budget, --budget-seconds S: the "
                             "training seconds of the RL run it is compared with (wall_time_s "
                             "in that run's metrics.json; `refit-gym bench` passes ReFiT's)")
        if unknown := sorted(set(setup.params) - set(CONTINUE_SETTINGS)):
            raise ValueError(f"continue has no setting {unknown}: it trains with the spec's "
                             f"[pretrain] protocol, of which --set may change "
                             f"{list(CONTINUE_SETTINGS)}")
        self.budget = setup.budget_seconds
        self.config: dict[str, Any] = {"budget_seconds": self.budget, **setup.params}
        self.settings = dataclasses.replace(setup.spec.pretrain, **setup.params)
        self.policy, self.data, self.device = setup.model, setup.data, setup.device
        self.dist = current()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        self.sampler = make_timestep_sampler(self.settings, self.policy.diffusion.steps)
        self.generator = torch.Generator().manual_seed(setup.seed)
        self.noise = rank_generator(setup.seed, self.dist)
        self.epochs = 0

    def progress(self, epochs: int, seconds: float) -> Extent:
        return Extent(seconds, self.budget, "s")

    def run_epoch(self, ctx: EpochContext) -> EpochStats:
        train_epoch(self.policy, self.data, self.optimizer, self.sampler, self.settings,
                    self.generator, self.device, self.noise)
        self.epochs += 1
        return EpochStats(evaluate=self.epochs % self.settings.eval_every == 0)

    def state_dict(self) -> dict[str, Any]:
        # Every rank's global RNG (dropout) and noise generator: a collective, which the driver
        # calls on every rank.
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "sampler": self.sampler.state_dict(), "epochs": self.epochs,
                "random": gather_random_states(self.dist, self.noise)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.epochs = state["epochs"]
        restore_random_states(state["random"], self.dist, self.noise)
