"""ReFiT as a plug-in of the driver: epochs of user batches, each rolled out (in chunks, split
over the ranks of a ``torchrun`` group) and turned into one policy-gradient update by
:class:`~refit_gym.rl.refit_agent.ReFiTAgent`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from refit_gym.distributed import Distributed, current
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.rl.algorithm import EpochContext, EpochStats, Extent
from refit_gym.rl.refit_agent import (
    BatchStats,
    ReFiTAgent,
    ReFiTConfig,
    Rollout,
    user_batches,
)
from refit_gym.training.algorithms.base import Setup
from refit_gym.training.resume import seed_for


class ReFiT:
    """ReFiT (``agent_class`` and ``config_class`` name the agent a subclass runs instead:
    DDPO reuses this loop). The position in the run (epoch, batch of the epoch, the
    generator's state) is its state, so a run resumes inside an epoch."""

    name = "refit"
    agent_class: type[ReFiTAgent] = ReFiTAgent
    config_class: type[ReFiTConfig] = ReFiTConfig

    def __init__(self, setup: Setup) -> None:
        setup.refuse_budget(self.name)
        self.settings = self.config_class(**setup.params)
        self.config: dict[str, Any] = self.settings.identity()
        self.source, self.reward, self.seed = setup.source, setup.reward, setup.seed
        self.n_episodes = setup.source.n_episodes
        self.dist = current()
        self.policy = setup.model
        self.agent = self.agent_class(setup.model, setup.reference, self.settings, self.dist)
        self.generator = torch.Generator(setup.device)
        self.device = setup.device
        self.epoch, self.batch = 1, 0  # the epoch under way, the next batch of it
        self.rewards: list[float] = []  # the epoch's batch rewards so far
        self._resumed_generator: Tensor | None = None
        self._cores: dict[int, DenoisingMDP] = {}
        cfg = self.settings
        # user_batches takes at most every episode, however many an epoch asks for.
        episodes = min(cfg.users_per_epoch or self.n_episodes, self.n_episodes)
        self.per_epoch = -(-episodes // cfg.users_per_batch)
        self.chunk = cfg.users_per_chunk or (-(-cfg.users_per_batch // self.dist.world_size)
                                             if self.dist.active else 0)

    def progress(self, epochs: int, seconds: float) -> Extent:
        return Extent(epochs * self.per_epoch + self.batch, self.settings.epochs * self.per_epoch,
                      "batch")

    def run_epoch(self, ctx: EpochContext) -> EpochStats:
        cfg = self.settings
        self.generator.manual_seed(seed_for(self.seed, self.epoch))
        batches = user_batches(self.n_episodes, cfg.users_per_batch, self.generator,
                               cfg.users_per_epoch)
        if self._resumed_generator is not None:  # inside the epoch: draw on from there
            self.generator.set_state(self._resumed_generator)
            self._resumed_generator = None
        while self.batch < len(batches):
            users = batches[self.batch].to(self.device)
            rollouts = self.rollouts(users)
            stats = self.update(rollouts, len(users) * cfg.group_size)
            self.rewards.append(stats.reward)
            self.batch += 1
            step = (self.epoch - 1) * self.per_epoch + self.batch
            for key, value in dataclasses.asdict(stats).items():  # by batch; train/ is by epoch
                ctx.log(f"batch/{key}", value, step)
            ctx.advance(1)
            if self.batch % cfg.checkpoint_every == 0 and self.batch < len(batches):
                ctx.checkpoint()
        rewards, self.rewards = self.rewards, []
        self.epoch, self.batch = self.epoch + 1, 0
        return EpochStats(rewards=rewards)

    def update(self, rollouts: list[Rollout], rows: int) -> BatchStats:
        """The agent's update from the batch's ``rollouts`` of ``rows`` trajectories."""
        return self.agent.update(rollouts, rows)

    def rollouts(self, users: Tensor) -> list[Rollout]:
        """This rank's rollouts of the batch ``users``: each chunk seeded by its place in the
        run, so it draws the same on whichever rank rolls it out."""
        rollouts = []
        for index, chunk_users in _my_chunks(users, self.chunk, self.dist):
            if self.chunk:
                self.generator.manual_seed(seed_for(self.seed, self.epoch, self.batch, index))
            rows = len(chunk_users) * self.settings.group_size
            if rows not in self._cores:
                self._cores[rows] = DenoisingMDP(self.source, self.reward, rows)
            rollouts.append(self.agent.rollout(self._cores[rows], chunk_users, self.generator))
        return rollouts

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.agent.optimizer.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "rewards": list(self.rewards),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.rewards = state["epoch"], state["batch"], state["rewards"]
        # Mid-epoch, the epoch's order is redrawn from its seed and the generator then set to
        # where the batches had got; at an epoch's start the seed alone places it.
        self._resumed_generator = state["generator"] if self.batch else None


def _my_chunks(users: Tensor, chunk: int, dist: Distributed) -> list[tuple[int, Tensor]]:
    """This rank's chunks of a batch of ``users``, with their places in the batch: all of it
    (``chunk`` 0, one process), or every ``world_size``-th chunk of ``chunk`` users."""
    if not chunk:
        return [(0, users)]
    return list(dist.share(list(enumerate(users.split(chunk)))))
