"""Scale-out: ReFiT fine-tuning throughput under torchrun with 1 and 2 processes (one thread
each), and the share of a training step rank 0 spends in collectives.

Each run is the real command, ``torchrun --nproc_per_node N -m refit_gym.cli finetune --algo
refit``, on one epoch of ``--users`` users (rows) in batches of ``--batch`` split into chunks
of ``--batch / 2`` for both process counts, so the work (and the result) is the same. Training
seconds and collective seconds come from the run's metrics.json (evaluation excluded). The
checkpoint is a 1-epoch pretraining (speed does not depend on the weights).

    REFIT_DATA_DIR=../shared/data python benchmarks/scale_out.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

from refit_gym.backbones import load_backbone
from refit_gym.specs import load_agent_hyperparams

ENVS = ("ReFiT-ML1M-v0", "ReFiT-Zhihu-v0")


def _cli(args: list[str], nproc: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "refit_gym.cli", *args, "--quiet"], cwd=cwd, env=env,
                   check=True)


def measure(env_id: str, users: int, batch: int, work: Path) -> dict:
    checkpoint = work / env_id / "pretrain" / "denoiser.pt"
    if not checkpoint.is_file():
        _cli(["pretrain", "--env", env_id, "--max-epochs", "1", "--out",
              str(checkpoint.parent)], 1, work)
    model, _ = load_backbone(checkpoint)
    model.freeze_for_finetuning()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runs = {}
    for nproc in (1, 2):
        out = work / env_id / f"refit-{nproc}"
        _cli(["finetune", "--env", env_id, "--algo", "refit", "--checkpoint", str(checkpoint),
              "--out", str(out), "--set", "epochs=1", "--set", f"users_per_epoch={users}",
              "--set", f"users_per_batch={batch}", "--set", f"users_per_chunk={batch // 2}"],
             nproc, work)
        runs[nproc] = json.loads((out / "metrics.json").read_text())
    group = load_agent_hyperparams("refit", env_id).get("group_size", 8)
    return {"env": env_id, "users": users, "batch": batch, "group": group,
            "trained_parameters": trained, "runs": runs}


def report(results: list[dict]) -> list[str]:
    lines = [
        "Every process with 1 thread (OMP_NUM_THREADS=1). One epoch of ReFiT fine-tuning "
        "through the real CLI (`torchrun --nproc_per_node N -m refit_gym.cli finetune --algo "
        "refit`), the same global batches split into the same chunks for 1 and 2 processes, so "
        "both compute the same update. Training seconds exclude evaluation; collective seconds "
        "are rank 0's time inside all-reduces (the gradient sum and the batch's statistics), "
        "waiting for the other rank included.",
        "",
        "| id | processes | users (rows) x group | trained floats (gradient per step) | "
        "training s | episodes / s | speed-up | collectives s | share of a step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["runs"][1]["wall_time_s"]
        for nproc, run in r["runs"].items():
            wall, comm = run["wall_time_s"], run["communication_s"]
            lines.append(
                f"| {r['env']} | {nproc} | {r['users']} x {r['group']} | "
                f"{r['trained_parameters']:,} | {wall:.1f} | "
                f"{r['users'] * r['group'] / wall:.1f} | {base / wall:.2f}x | {comm:.2f} | "
                f"{comm / wall:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", default=None, help="folder for checkpoints and runs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="scale_out_"))
    results = [measure(env_id, args.users, args.batch, work)
               for env_id in args.envs.split(",")]
    write_result("scale_out", "Scale-out: ReFiT fine-tuning under torchrun (gloo, CPU)",
                 report(results))
    (work / "scale_out.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
