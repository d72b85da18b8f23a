"""What the pretrained actor and the group-relative reward bring to PPO, A2C and TRPO.

On ReFiT-Synthetic-v0, for each SB3 algorithm (agents/<algo>.toml defaults, same seed, same
number of episodes), the mean training episode reward per epoch of:

1. the pretrained diffusion actor with group copies and the group-relative reward (default);
2. the same with ``group_size = 1`` (every episode a different user; the critic is the only
   baseline);
3. SB3's own ``MultiInputPolicy`` trained from scratch (no pretraining), group-relative reward.

Test NDCG@20 before and after is reported for the pretrained actor (1. and 2.; the selection by
validation may keep the start). The from-scratch policy is no denoiser, so it has no chain to
rank with: its column is its reward only.

    python benchmarks/sb3_group_baseline.py [--checkpoint runs/.../denoiser.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result
from stable_baselines3.common.logger import Logger

from refit_gym.data import InteractionData
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.rl.sb3_agents import (
    SB3_ALGOS,
    EpisodeRewards,
    episodes_per_epoch,
    make_vec_env,
    split_hyperparams,
)
from refit_gym.specs import EnvSpec, load_agent_hyperparams, load_env_spec
from refit_gym.training.finetune import finetune
from refit_gym.training.pretrain import pretrain

ENV = "ReFiT-Synthetic-v0"


def scratch_rewards(algo: str, spec: EnvSpec, data: InteractionData, seed: int) -> list[float]:
    """Mean episode reward per epoch of SB3's MultiInputPolicy, same budget and driver."""
    driver, sb3_args = split_hyperparams(load_agent_hyperparams(algo, spec.id))
    sb3_args.pop("policy_kwargs", None)
    venv = make_vec_env(spec, EnvSettings.resolve(spec, {}), data, driver["n_envs"],
                        driver["group_size"], seed)
    model = SB3_ALGOS[algo]("MultiInputPolicy", venv, seed=seed, device="cpu", verbose=0,
                            **sb3_args)
    model.set_logger(Logger(folder=None, output_formats=[]))  # no SB3-<date> folder in /tmp
    callback, means = EpisodeRewards(), []
    for _ in range(driver["epochs"]):
        model.learn(episodes_per_epoch(driver, data.n_users) * spec.diffusion.steps,
                    callback=callback, reset_num_timesteps=False)
        means.append(sum(callback.rewards) / len(callback.rewards))
        callback.rewards = []
    return means


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Top row: the pretrained actor's runs; bottom row: from scratch (a far lower scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(4.2 * len(curves), 6.4), sharey="row")
    for column, (algo, runs) in enumerate(curves.items()):
        for label, rewards in runs.items():
            ax = axes[1 if "scratch" in label else 0, column]
            ax.plot(range(1, len(rewards) + 1), rewards, marker="o", label=label,
                    color="C2" if "scratch" in label else None)
        axes[0, column].set(title=algo.upper())
        axes[1, column].set(xlabel="epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for row in range(2):
        axes[row, 0].set_ylabel("mean training episode reward")
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, help="default: pretrain seed 1 into --out")
    parser.add_argument("--out", default="runs/sb3_group_baseline")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    spec, data, out = load_env_spec(ENV), cached_dataset(ENV, None), Path(args.out)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = pretrain(spec, data, out / "pretrain", seed=args.seed,
                              progress=False).checkpoint
    rows, curves = [], {}
    for algo in sorted(SB3_ALGOS):
        curves[algo] = {}
        for label, group in (("pretrained actor, group-relative", None),
                             ("pretrained actor, group_size 1", 1)):
            # Ungrouped: as many episodes per epoch, each of a freshly drawn user.
            default_group = load_agent_hyperparams(algo, ENV)["group_size"]
            hyper = {} if group is None else {"group_size": 1,
                                              "users_per_epoch": data.n_users * default_group}
            cell = out / f"{algo}-group{group or 'default'}"
            result = finetune(spec, data, checkpoint, algo, cell, seed=args.seed,
                              hyperparams=hyper, progress=False)
            rewards = [h["train_reward"] for h in result["history"][1:]]
            curves[algo][label] = rewards
            rows.append(f"| {algo} | {label} | {rewards[0]:.3f} → {rewards[-1]:.3f} | "
                        f"{result['start']['test']['ndcg@20']:.4f} → "
                        f"{result['test']['ndcg@20']:.4f} (epoch {result['best_epoch']}) | "
                        f"{result['wall_time_s']:.0f} |")
            print(rows[-1], flush=True)
        rewards = scratch_rewards(algo, spec, data, args.seed)
        curves[algo]["SB3 MultiInputPolicy, from scratch"] = rewards
        rows.append(f"| {algo} | SB3 MultiInputPolicy, from scratch | {rewards[0]:.3f} → "
                    f"{rewards[-1]:.3f} | (no chain) | |")
        print(rows[-1], flush=True)
    settings = EnvSettings.resolve(spec, {})
    figure = Path(__file__).resolve().parent / "results" / "sb3_group_baseline.png"
    plot(curves, figure)
    write_result("sb3_group_baseline", f"SB3 agents on {ENV}: pretrained actor, group-relative "
                 "reward, from scratch", [
        f"agents/<algo>.toml defaults for {ENV}, seed {args.seed}, the same number of episodes "
        f"for every row; backbone `{checkpoint}`. Reward: the spec default ({settings.reward} "
        f"{settings.reward_params}, holdout {settings.holdout} {settings.holdout_fraction}). "
        "Columns: mean training episode reward of the "
        "first → last epoch (the environment's reward, before centring); test NDCG@20 of the "
        "start → the model selected by validation NDCG@20; training seconds.", "",
        "| algo | actor | train reward | test ndcg@20 | s |", "|---|---|---|---|---|", *rows,
        "", f"Reward curves: `{figure.name}`.",
    ])


if __name__ == "__main__":
    main()
