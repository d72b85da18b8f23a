"""ReFiT fine-tuning cost: an ML-1M epoch against a pretraining epoch, the SB3 rollout path
against the ReFiT agent's torch path at equal batch, and how an epoch's time grows with users
and with items (synthetic data, three sizes each, log-log slope).

The ML-1M ReFiT epoch is timed over ``--batches`` batches and scaled to all users (stated as
such in the table); the scaling runs time whole epochs.

    REFIT_DATA_DIR=../shared/data python benchmarks/finetune_speed.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import best_of, fresh_training, write_result

from refit_gym.data.synthetic import make_synthetic
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.mdp.rewards import make_reward
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, policy_step, user_batches
from refit_gym.rl.sb3_agents import make_model
from refit_gym.specs import load_agent_hyperparams, load_env_spec
from refit_gym.training.pretrain import train_epoch

REWARD = {"alphas": [0.5], "tau": 0.05, "rank": 64}


def refit_seconds(data, spec, config: ReFiTConfig, max_batches: int | None) -> tuple[float, int]:
    """Seconds for ``max_batches`` (or all) ReFiT batches, and how many batches that was."""
    torch.manual_seed(0)
    model = spec.build_backbone(data.n_items)
    agent = ReFiTAgent(model, spec.build_backbone(data.n_items), config)
    reward = make_reward("collaborative", REWARD, data.train)
    generator = torch.Generator().manual_seed(0)
    batches = user_batches(data.n_users, config.users_per_batch, generator)[:max_batches]
    cores = {}
    start = time.perf_counter()
    for users in batches:
        rows = len(users) * config.group_size
        if rows not in cores:
            cores[rows] = DenoisingMDP(data.train, model.diffusion, reward, rows)
        agent.train_batch(cores[rows], users, generator)
    return time.perf_counter() - start, len(batches)


def rollout_paths(spec, data, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds for one T-step rollout of ``batch`` episodes: SB3's ``collect_rollouts`` (PPO,
    pretrained actor, numpy VecEnv) and the ReFiT agent's torch path (policy_step + core)."""
    torch.manual_seed(0)
    backbone = spec.build_backbone(data.n_items).eval()
    venv = ReFiTVecEnv(spec.id, num_envs=batch, seed=0)
    steps = spec.diffusion.steps
    model = make_model("ppo", venv, backbone, {"n_steps": steps, "batch_size": batch},
                       seed=0, device="cpu")

    def sb3_rollout() -> None:
        _, callback = model._setup_learn(steps * batch)
        model.collect_rollouts(model.env, callback, model.rollout_buffer, steps)

    core = venv.core
    generator = torch.Generator().manual_seed(0)

    def torch_rollout() -> None:
        core.reset_rows(torch.arange(batch), torch.arange(batch), generator)
        with torch.no_grad():
            for _ in range(steps):
                action, _, _ = policy_step(backbone, core.x, core.denoiser_timestep(), None,
                                           10.0, generator=generator)
                core.step(action)

    return best_of(sb3_rollout, repeats), best_of(torch_rollout, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    spec = load_env_spec("ReFiT-ML1M-v0")
    data = cached_dataset(spec.id, None)
    config = ReFiTConfig(**load_agent_hyperparams("refit", spec.id))
    seconds, done = refit_seconds(data, spec, config, args.batches)
    n_batches = -(-data.n_users // config.users_per_batch)
    refit_epoch = seconds / done * n_batches
    model, optimizer, sampler, generator = fresh_training(spec, data.n_items)
    pretrain_epoch = best_of(lambda: train_epoch(model, data, optimizer, sampler, spec.pretrain,
                                                 generator), 3)
    lines = [
        "## One ReFiT epoch over all ML-1M users against one pretraining epoch", "",
        f"ReFiT settings from agents/refit.toml ({config.users_per_batch} users x "
        f"{config.group_size} trajectories per batch, {spec.diffusion.steps} steps, gradients "
        f"on the last {config.train_steps}); collaborative reward, rank 64.", "",
        "| measurement | seconds | ratio |", "|---|---|---|",
        f"| pretraining epoch (DiffRec loss, batch {spec.pretrain.batch_size}) | "
        f"{pretrain_epoch:.2f} | 1 |",
        f"| ReFiT epoch, {done} of {n_batches} batches timed, scaled to all | "
        f"{refit_epoch:.0f} | {refit_epoch / pretrain_epoch:.0f} |", "",
        "A ReFiT epoch runs group_size x T = 320 denoiser forwards per user (plus backward on "
        "the trained steps) where pretraining runs one forward and backward per user.", ""]

    rows = ["| batch | SB3 collect_rollouts (s) | ReFiT torch path (s) | ratio |",
            "|---|---|---|---|"]
    for batch in (64, 256):
        sb3_s, torch_s = rollout_paths(spec, data, batch, 3)
        rows.append(f"| {batch} | {sb3_s:.3f} | {torch_s:.3f} | {sb3_s / torch_s:.2f} |")
    lines += ["## One 40-step rollout: SB3 path against the ReFiT agent's torch path (ML-1M)", "",
              "Same pretrained-shaped actor and exploration (kappa 10), no updates; SB3 adds "
              "value estimates, numpy round trips, action clipping and its rollout buffer.", "",
              *rows, ""]

    syn = load_env_spec("ReFiT-Synthetic-v0")
    syn_config = ReFiTConfig(users_per_batch=64, group_size=8, train_steps=10)
    for label, sizes in (("users", [(1000, 1000), (2000, 1000), (4000, 1000)]),
                         ("items", [(2000, 500), (2000, 1000), (2000, 2000)])):
        rows, times = [], []
        for n_users, n_items in sizes:
            synthetic = make_synthetic(n_users=n_users, n_items=n_items, mean_interactions=40,
                                       seed=0)
            seconds, _ = refit_seconds(synthetic, syn, syn_config, None)
            times.append(seconds)
            rows.append(f"| {n_users} | {n_items} | {seconds:.2f} |")
        x = [s[0] if label == "users" else s[1] for s in sizes]
        slope = np.polyfit(np.log(x), np.log(times), 1)[0]
        lines += [f"## Scaling with {label} (synthetic, one ReFiT epoch over all users)", "",
                  "| users | items | seconds |", "|---|---|---|", *rows, "",
                  f"log-log slope: {slope:.2f} (1 = linear)", ""]
    lines.append(f"Synthetic backbone: dims {list(syn.backbone['dims'])}, "
                 f"T = {syn.diffusion.steps}; "
                 "its parameters grow linearly with the items.")
    write_result("finetune_speed", "ReFiT fine-tuning speed and scaling", lines)


if __name__ == "__main__":
    main()
