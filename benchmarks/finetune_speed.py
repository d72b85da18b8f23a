"""ReFiT fine-tuning cost, for either scenario: an epoch against a pretraining epoch, (CF) the
SB3 rollout path against the ReFiT agent's torch path at equal batch, and how an epoch's time
grows with users or rows and with items (synthetic data, three sizes each, log-log slope).

The real-data ReFiT epoch is timed over ``--batches`` batches and scaled to all users or rows
(stated as such in the table); the scaling runs time whole epochs.

    REFIT_DATA_DIR=../shared/data python benchmarks/finetune_speed.py
    REFIT_DATA_DIR=../shared/data python benchmarks/finetune_speed.py --env ReFiT-Zhihu-v0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import best_of, fresh_training, untrained_episodes, write_result

from refit_gym.data import make_sequential_synthetic, make_synthetic
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, policy_step, user_batches
from refit_gym.rl.sb3_agents import make_model
from refit_gym.specs import load_agent_hyperparams, load_env_spec
from refit_gym.training.pretrain import train_epoch

CF_REWARD = {"reward": "collaborative",
             "reward_params": {"alphas": [0.5], "tau": 0.05, "rank": 64}}


def refit_seconds(data, spec, config: ReFiTConfig, max_batches: int | None,
                  env_kwargs: dict, device: str = "cpu") -> tuple[float, int]:
    """Seconds for ``max_batches`` (or all) ReFiT batches, and how many batches that was; an
    untrained backbone of ``spec`` (speed does not depend on the weights)."""
    model, source, reward = untrained_episodes(spec, data, {**env_kwargs, "device": device})
    agent = ReFiTAgent(model.to(device), spec.build_backbone(data.n_items).to(device), config)
    generator = torch.Generator(device).manual_seed(0)
    batches = user_batches(data.n_train_rows, config.users_per_batch, generator)[:max_batches]
    cores = {}
    start = time.perf_counter()
    for users in batches:
        rows = len(users) * config.group_size
        if rows not in cores:
            cores[rows] = DenoisingMDP(source, reward, rows)
        agent.train_batch(cores[rows], users.to(device), generator)
    if device != "cpu":
        torch.cuda.synchronize()
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
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    spec = load_env_spec(args.env)
    sequential = spec.sequential
    data = cached_dataset(spec.id, None)
    config = ReFiTConfig(**load_agent_hyperparams("refit", spec.id))
    env_kwargs = {} if sequential else CF_REWARD
    seconds, done = refit_seconds(data, spec, config, args.batches, env_kwargs)
    n_batches = -(-data.n_train_rows // config.users_per_batch)
    refit_epoch = seconds / done * n_batches
    model, optimizer, sampler, generator = fresh_training(spec, data.n_items)
    pretrain_epoch = best_of(lambda: train_epoch(model, data, optimizer, sampler, spec.pretrain,
                                                 generator), 3)
    unit = "training rows" if sequential else "users"
    steps = EnvSettings.resolve(spec, {}).chain(spec).steps
    reward = spec.env["reward"] if sequential else "collaborative reward, rank 64"
    lines = [
        f"## One ReFiT epoch over all {spec.id} {unit} against one pretraining epoch", "",
        f"ReFiT settings from agents/refit.toml ({config.users_per_batch} {unit} x "
        f"{config.group_size} trajectories per batch, {steps} steps, gradients on the last "
        f"{config.train_steps}); {reward}.", "",
        "| measurement | seconds | ratio |", "|---|---|---|",
        f"| pretraining epoch ({spec.backbone_type} loss, batch {spec.pretrain.batch_size}) | "
        f"{pretrain_epoch:.2f} | 1 |",
        f"| ReFiT epoch, {done} of {n_batches} batches timed, scaled to all | "
        f"{refit_epoch:.0f} | {refit_epoch / pretrain_epoch:.0f} |", "",
        f"A ReFiT epoch runs group_size x K = {config.group_size * steps} reverse steps per "
        f"{unit[:-1]} (plus backward on the trained steps) where pretraining runs one forward "
        "and backward.", ""]

    if not sequential:
        rows = ["| batch | SB3 collect_rollouts (s) | ReFiT torch path (s) | ratio |",
                "|---|---|---|---|"]
        for batch in (64, 256):
            sb3_s, torch_s = rollout_paths(spec, data, batch, 3)
            rows.append(f"| {batch} | {sb3_s:.3f} | {torch_s:.3f} | {sb3_s / torch_s:.2f} |")
        lines += ["## One 40-step rollout: SB3 path against the ReFiT agent's torch path "
                  "(ML-1M)", "",
                  "Same pretrained-shaped actor and exploration (kappa 10), no updates; SB3 "
                  "adds value estimates, numpy round trips, action clipping and its rollout "
                  "buffer.", "", *rows, ""]

    lines += scaling(sequential)
    write_result("finetune_speed" + ("_sequential" if sequential else ""),
                 f"ReFiT fine-tuning speed and scaling, {spec.id}", lines)


def scaling(sequential: bool) -> list[str]:
    """One ReFiT epoch over all rows of synthetic data at three sizes of each dimension."""
    if sequential:
        syn = load_env_spec("ReFiT-SeqSynthetic-v0")
        config = ReFiTConfig(users_per_batch=64, group_size=8, train_steps=20, kappa=1.0)
        grid = (("rows", [(500, 300), (1000, 300), (2000, 300)]),
                ("items", [(1000, 300), (1000, 600), (1000, 1200)]))

        def dataset(size: int, n_items: int):
            return make_sequential_synthetic(n_items=n_items, n_sessions=size, seed=0)
    else:
        syn = load_env_spec("ReFiT-Synthetic-v0")
        config = ReFiTConfig(users_per_batch=64, group_size=8, train_steps=10)
        grid = (("users", [(1000, 1000), (2000, 1000), (4000, 1000)]),
                ("items", [(2000, 500), (2000, 1000), (2000, 2000)]))

        def dataset(size: int, n_items: int):
            return make_synthetic(n_users=size, n_items=n_items, mean_interactions=40, seed=0)
    lines = []
    for label, sizes in grid:
        rows, times, counts = [], [], []
        for size, n_items in sizes:
            data = dataset(size, n_items)
            seconds, _ = refit_seconds(data, syn, config, None,
                                       {} if sequential else CF_REWARD)
            times.append(seconds)
            counts.append(data.n_train_rows)
            rows.append(f"| {data.n_train_rows} | {n_items} | {seconds:.2f} |")
        x = counts if label != "items" else [s[1] for s in sizes]
        slope = np.polyfit(np.log(x), np.log(times), 1)[0]
        lines += [f"## Scaling with {label} ({syn.id}, one ReFiT epoch over all rows)", "",
                  "| training rows (users) | items | seconds |", "|---|---|---|", *rows, "",
                  f"log-log slope: {slope:.2f} (1 = linear)", ""]
    return lines


if __name__ == "__main__":
    main()
