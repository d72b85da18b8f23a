"""One ReFiT epoch on the GPU beside the same work on this machine's CPU (ML-1M and Zhihu),
timed over ``--batches`` batches and scaled to an epoch of agents/refit.toml; ratios in one run.

    REFIT_DATA_DIR=../shared/data python benchmarks/gpu_timing.py --batches 5
"""

from __future__ import annotations

import argparse

import torch
from common import write_result
from finetune_speed import CF_REWARD, refit_seconds

from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.rl.refit_agent import ReFiTConfig
from refit_gym.specs import load_agent_hyperparams, load_env_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_timing: no GPU found; nothing to compare")
    rows = []
    for env_id in ("ReFiT-ML1M-v0", "ReFiT-Zhihu-v0"):
        spec = load_env_spec(env_id)
        data = cached_dataset(env_id, None)
        config = ReFiTConfig(**load_agent_hyperparams("refit", env_id))
        env_kwargs = {} if spec.sequential else CF_REWARD
        n_batches = -(-(config.users_per_epoch or data.n_train_rows) // config.users_per_batch)
        epoch = {}
        for device in ("cpu", "cuda"):
            refit_seconds(data, spec, config, 1, env_kwargs, device)  # warm-up
            seconds, done = refit_seconds(data, spec, config, args.batches, env_kwargs, device)
            epoch[device] = seconds / done * n_batches
        rows.append(f"| {env_id} | {n_batches} | {epoch['cpu']:.1f} | {epoch['cuda']:.1f} | "
                    f"{epoch['cpu'] / epoch['cuda']:.1f} |")
    write_result("gpu_check", f"GPU check: {torch.cuda.get_device_name()}", [
        f"One ReFiT epoch (agents/refit.toml), {args.batches} batches timed and scaled; CPU: "
        f"{torch.get_num_threads()} threads of this machine.", "",
        "| id | batches per epoch | CPU s | GPU s | speed-up |", "|---|---|---|---|---|",
        *rows])


if __name__ == "__main__":
    main()
