"""DDPO as a plug-in of the driver: ReFiT's epochs of user batches and rollouts, DDPO's update
(:mod:`refit_gym.rl.ddpo`), its sample order seeded by the batch's place in the run so a
resumed run shuffles as the uninterrupted one did."""

from __future__ import annotations

from refit_gym.rl.ddpo import DDPOAgent, DDPOConfig
from refit_gym.rl.refit_agent import BatchStats, Rollout
from refit_gym.training.algorithms.refit import ReFiT
from refit_gym.training.resume import seed_for


class DDPO(ReFiT):
    name = "ddpo"
    agent_class = DDPOAgent
    config_class = DDPOConfig

    def update(self, rollouts: list[Rollout], rows: int) -> BatchStats:
        self.agent.shuffle.manual_seed(seed_for(self.seed, self.epoch, self.batch))
        return super().update(rollouts, rows)
