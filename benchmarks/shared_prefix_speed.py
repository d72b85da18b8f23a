"""One ReFiT batch on ML-1M with the lever of cf_levers_ReFiT-ML1M-v0.md (exploration on the
last 5 of 40 steps), with a group's shared mean prefix computed once per user (the agent's
rollout) and for every row (``groups_identical`` forced False); ratios in one run.

    REFIT_DATA_DIR=../shared/data python benchmarks/shared_prefix_speed.py
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
from common import untrained_episodes, write_result

from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.rl import refit_agent
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig
from refit_gym.specs import load_env_spec

ENV_ID = "ReFiT-ML1M-v0"


def batch_seconds(agent: ReFiTAgent, core: DenoisingMDP, users: torch.Tensor,
                  repeats: int) -> tuple[float, float]:
    """Fastest (rollout, update) seconds of ``repeats`` batches."""
    rollout_s, update_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = agent.rollout(core, users, torch.Generator().manual_seed(0))
        middle = time.perf_counter()
        agent.update([rollout], len(users) * agent.config.group_size)
        rollout_s.append(middle - start)
        update_s.append(time.perf_counter() - middle)
    return min(rollout_s), min(update_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    spec, data = load_env_spec(ENV_ID), cached_dataset(ENV_ID, None)
    model, source, reward = untrained_episodes(spec, data)
    rows = ["| users x group | path | rollout s | update s | batch s | speed-up |",
            "|---|---|---|---|---|---|"]
    for users, group in ((64, 8), (128, 32)):
        config = ReFiTConfig(users_per_batch=users, group_size=group, explore_all_steps=False,
                             train_steps=5, kappa=30.0)
        agent = ReFiTAgent(model, spec.build_backbone(data.n_items), config)
        core = DenoisingMDP(source, reward, users * group)
        ids = torch.arange(users)
        with mock.patch.object(refit_agent, "groups_identical", return_value=False):
            per_row = batch_seconds(agent, core, ids, args.repeats)
        shared = batch_seconds(agent, core, ids, args.repeats)
        for path, (rollout_s, update_s) in (("per row", per_row), ("shared prefix", shared)):
            rows.append(f"| {users} x {group} | {path} | {rollout_s:.2f} | {update_s:.2f} | "
                        f"{rollout_s + update_s:.2f} | "
                        f"{sum(per_row) / (rollout_s + update_s):.2f} |")
    write_result("shared_prefix_speed", f"ReFiT batch on {ENV_ID}: the shared mean prefix", [
        f"Untrained backbone of the spec (speed does not depend on the weights), lever settings "
        f"(train_steps 5, kappa 30, explore_all_steps false) and the id's default reward; the "
        f"fastest of {args.repeats} batches per path.", "", *rows, "",
        "The update (forward and backward on the 5 trained steps of every trajectory) is the "
        "same on both paths; the rollout's first 35 steps run once per user instead of once "
        "per trajectory."])


if __name__ == "__main__":
    main()
