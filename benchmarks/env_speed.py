"""Environment speed on ML-1M (and the reward's cost on Amazon-Book), as ratios in one run.

1. environment-only transitions per second (reset + T steps + terminal reward) at batch
   64 / 256 / 1024, on the torch path;
2. the environment's share of a full step: env step vs one forward of the DiffRec denoiser
   (plus its posterior mean) at batch 256, over whole episodes;
3. the SB3 VecEnv face against the torch path at batch 256 (numpy in and out, info dicts);
4. the reward's time at batch 256 for K = 1, 2, 3 hops, exact and rank-256 propagation;
5. the reward's cost per user on Amazon-Book against ML-1M (rank 256).

    REFIT_DATA_DIR=../shared/data python benchmarks/env_speed.py [--amazon]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import best_of, write_result

from refit_gym.mdp.gym_env import cached_dataset, make_core
from refit_gym.mdp.rewards import make_reward
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv

ML1M = "ReFiT-ML1M-v0"


def episodes(core, batch: int, policy=None) -> tuple[float, float]:
    """Seconds spent in the environment and in the policy over one episode of all rows."""
    generator = torch.Generator().manual_seed(0)
    users = torch.arange(batch) % core.n_users
    start = time.perf_counter()
    core.reset_rows(torch.arange(batch), users, generator)
    env_time, policy_time = time.perf_counter() - start, 0.0
    action = core.x.clone()
    for _ in range(core.steps):
        if policy is not None:
            start = time.perf_counter()
            with torch.no_grad():
                action = policy(core.x, core.denoiser_timestep())
            policy_time += time.perf_counter() - start
        start = time.perf_counter()
        core.step(action)
        env_time += time.perf_counter() - start
    return env_time, policy_time


def reward_seconds(env_id: str, params: dict, batch: int, repeats: int) -> float:
    """Relevance (at reset) plus terminal scoring for one batch, best of ``repeats``."""
    data = cached_dataset(env_id, None)
    reward = make_reward("collaborative", params, data.train)
    target = torch.from_numpy(data.train[np.arange(batch)].toarray().astype(np.float32))
    x0 = torch.rand_like(target)
    return best_of(lambda: reward(x0, reward.relevance(target, target), target), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amazon", action="store_true", help="also time Amazon-Book's reward")
    args = parser.parse_args()
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

        def policy(x, t, model=model):
            return model.reverse_mean(x, t, None)

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
        make_reward("collaborative", {"alphas": [0.5], "rank": 256}, book.train)
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
