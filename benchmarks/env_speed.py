"""Environment speed, as ratios in one run: ML-1M (and the reward's cost on Amazon-Book), or a
sequential id with ``--env``.

1. environment-only transitions per second (reset + K steps + terminal reward) at batch
   64 / 256 / 1024, on the torch path;
2. the environment's share of a full step: env step vs the backbone's policy mean (DiffRec:
   its forward plus posterior mean; DreamRec: the history encoded once per episode, then the
   guided prediction plus posterior mean per step) at batch 256, over whole episodes;
3. (CF) the SB3 VecEnv face against the torch path at batch 256 (numpy in and out, info dicts);
4. (CF) the reward's time at batch 256 for K = 1, 2, 3 hops, exact and rank-256 propagation;
5. (CF) the reward's cost per user on Amazon-Book against ML-1M (rank 256).

    REFIT_DATA_DIR=../shared/data python benchmarks/env_speed.py [--amazon]
    REFIT_DATA_DIR=../shared/data python benchmarks/env_speed.py --env ReFiT-Zhihu-v0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import best_of, untrained_episodes, write_result

from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import cached_dataset, make_core
from refit_gym.mdp.rewards import make_reward
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.specs import load_env_spec

ML1M = "ReFiT-ML1M-v0"


def episodes(core, batch: int, policy=None) -> tuple[float, float]:
    """Seconds spent in the environment and in the policy over one episode of all rows;
    ``policy(core, first)`` returns the action (``first``: the episode's first step)."""
    generator = torch.Generator().manual_seed(0)
    users = torch.arange(batch) % core.n_episodes
    start = time.perf_counter()
    core.reset_rows(torch.arange(batch), users, generator)
    env_time, policy_time = time.perf_counter() - start, 0.0
    action = core.x.clone()
    for step in range(core.steps):
        if policy is not None:
            start = time.perf_counter()
            with torch.no_grad():
                action = policy(core, step == 0)
            policy_time += time.perf_counter() - start
        start = time.perf_counter()
        core.step(action)
        env_time += time.perf_counter() - start
    return env_time, policy_time


def reward_seconds(env_id: str, params: dict, batch: int, repeats: int) -> float:
    """Relevance (at reset) plus terminal scoring for one batch, best of ``repeats``."""
    data = cached_dataset(env_id, None)
    reward = make_reward("collaborative", params, data)
    target = torch.from_numpy(data.train[np.arange(batch)].toarray().astype(np.float32))
    x0 = torch.rand_like(target)
    return best_of(lambda: reward(x0, reward.relevance(target, target), target), repeats)


def sequential_core(env_id: str, batch: int):
    """The core of a sequential id scored with an untrained backbone's E, and that backbone."""
    model, source, reward = untrained_episodes(load_env_spec(env_id),
                                               cached_dataset(env_id, None))
    return DenoisingMDP(source, reward, batch), model


def sequential(env_id: str, repeats: int) -> None:
    rows = ["| batch | transitions / s | seconds per episode |", "|---|---|---|"]
    for batch in (64, 256, 1024):
        core, _ = sequential_core(env_id, batch)
        seconds = min(episodes(core, batch)[0] for _ in range(repeats))
        rows.append(f"| {batch} | {batch * core.steps / seconds:,.0f} | {seconds:.3f} |")
    core, model = sequential_core(env_id, 256)
    condition = {}

    def policy(core, first):
        if first:  # the history is encoded once per episode
            condition["c"] = model.encode(core.backbone_batch())
        return model.reverse_mean(core.x, core.denoiser_timestep(), condition["c"], core.chain)

    env_s, policy_s = min((episodes(core, 256, policy) for _ in range(repeats)),
                          key=lambda pair: pair[0] + pair[1])
    write_result(f"env_speed_{env_id}", f"Environment speed ({env_id})", [
        f"Reward: {core.reward.name} (the spec's default); {core.steps}-step episodes, "
        f"{core.n_items} items, state dimension {core.state_dim}.", "",
        "## Environment-only transitions (torch path, CPU)", "", *rows, "",
        "## The environment's share of a full step (batch 256, whole episodes)", "",
        "Environment: reset (x_K draws, history gather, one-hot target), the steps and the "
        "terminal reward; policy: the history encoded once, then per step the guided "
        "x0 prediction (two denoiser passes) and the posterior mean.", "",
        "| environment s / episode | policy s / episode | share |", "|---|---|---|",
        f"| {env_s:.4f} | {policy_s:.3f} | {env_s / (env_s + policy_s):.1%} |"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default=ML1M)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amazon", action="store_true", help="also time Amazon-Book's reward")
    args = parser.parse_args()
    if load_env_spec(args.env).backbone_type != "diffrec":
        sequential(args.env, args.repeats)
        return
    lines = []

    rows = ["| batch | transitions / s | seconds per episode |", "|---|---|---|"]
    for batch in (64, 256, 1024):
        _, _, core = make_core(ML1M, batch)
        seconds = min(episodes(core, batch)[0] for _ in range(args.repeats))
        rows.append(f"| {batch} | {batch * core.steps / seconds:,.0f} | {seconds:.3f} |")
    lines += ["## Environment-only transitions (torch path, CPU)", "", *rows, ""]

    share_rows = ["| reward setting | environment s / episode | denoiser s / episode | share |",
                  "|---|---|---|---|"]
    settings = {
        "hit@20, 20% random holdout": {
            "reward": "hit", "holdout": "random", "holdout_fraction": 0.2,
            "reward_params": {"k": 20}},
        "collaborative a=0.5 rank 256, no holdout": {
            "reward": "collaborative", "holdout_fraction": 0.0,
            "reward_params": {"alphas": [0.5], "tau": 0.05, "rank": 256}},
    }
    for label, overrides in settings.items():
        spec, _, core = make_core(ML1M, 256, **overrides)
        torch.manual_seed(0)
        model = spec.build_backbone(core.n_items).eval()

        def policy(core, first, model=model):
            return model.reverse_mean(core.x, core.denoiser_timestep(), None, core.chain)

        env_s, policy_s = min((episodes(core, 256, policy) for _ in range(args.repeats)),
                              key=lambda pair: pair[0] + pair[1])
        share_rows.append(f"| {label} | {env_s:.4f} | {policy_s:.3f} | "
                          f"{env_s / (env_s + policy_s):.1%} |")
    lines += ["## The environment's share of a full step (batch 256, whole episodes)", "",
              f"Environment: reset, {core.steps} steps and the terminal reward; denoiser: one "
              "DiffRec forward plus posterior mean per step. Target <= 5%.", "",
              *share_rows, "",
              "The holdout draws one uniform number per interaction of the history (O(nnz), "
              "not O(batch x items)); the reward (top-20 of x_0 at the last step) is the "
              "largest single cost.", ""]

    vec = ReFiTVecEnv(ML1M, num_envs=256, seed=0)

    def sb3_episode() -> None:
        obs = vec.reset()
        for _ in range(vec.core.steps):
            obs, *_ = vec.step(obs["x"])

    t_sb3 = best_of(sb3_episode, args.repeats)
    t_torch = min(episodes(vec.core, 256)[0] for _ in range(args.repeats))  # the same MDP
    lines += ["## SB3 VecEnv face against the torch path (batch 256, one episode)", "",
              "| path | seconds | ratio |", "|---|---|---|",
              f"| torch (core) | {t_torch:.3f} | 1.00 |",
              f"| SB3 VecEnv (numpy, info dicts) | {t_sb3:.3f} | {t_sb3 / t_torch:.2f} |", ""]

    rows = ["| hops K | exact (s) | rank 256 (s) |", "|---|---|---|"]
    for hops in (1, 2, 3):
        alphas = [0.5] * hops
        exact = reward_seconds(ML1M, {"alphas": alphas, "propagation": "exact"}, 256,
                               args.repeats)
        lowrank = reward_seconds(ML1M, {"alphas": alphas, "rank": 256}, 256, args.repeats)
        rows.append(f"| {hops} | {exact:.4f} | {lowrank:.4f} |")
    lines += ["## Collaborative reward at batch 256 (propagation at reset + terminal score)",
              "", *rows, ""]

    if args.amazon:
        ml1m, book = cached_dataset(ML1M, None), cached_dataset("ReFiT-AmazonBook-v0", None)
        start = time.perf_counter()
        make_reward("collaborative", {"alphas": [0.5], "rank": 256}, book)
        svd_s = time.perf_counter() - start  # the cache makes later builds instant
        per_user = {}
        for env_id in (ML1M, "ReFiT-AmazonBook-v0"):
            # Sub-millisecond per user: the best of 20 keeps scheduler noise out of the ratio.
            per_user[env_id] = reward_seconds(env_id, {"alphas": [0.5], "rank": 256}, 256,
                                              max(args.repeats, 20)) / 256
        ratio = per_user["ReFiT-AmazonBook-v0"] / per_user[ML1M]
        lines += ["## Reward cost per user, Amazon-Book against ML-1M (K = 1, rank 256)", "",
                  "| dataset | items | ms per user | ratio |", "|---|---|---|---|",
                  f"| ML-1M | {ml1m.n_items} | {per_user[ML1M] * 1e3:.3f} | 1.00 |",
                  f"| Amazon-Book | {book.n_items} | "
                  f"{per_user['ReFiT-AmazonBook-v0'] * 1e3:.3f} | {ratio:.2f} |", "",
                  f"Items ratio {book.n_items / ml1m.n_items:.2f}. Per user the reward costs "
                  "O(n_items r) (two (1 x n) by (n x r) products and an O(n) score), "
                  "independent of the number of users. Building the rank-256 factors of "
                  f"Amazon-Book took {svd_s:.0f} s (from the cache if one was there).", ""]

    write_result("env_speed", "Environment speed (ReFiT-ML1M-v0)", lines)


if __name__ == "__main__":
    main()
