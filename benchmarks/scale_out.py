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

import torch
from common import write_result

from refit_gym.backbones import load_backbone
from refit_gym.specs import load_env_spec

ENVS = ("ReFiT-ML1M-v0", "ReFiT-Zhihu-v0")

# The projection's assumptions (not measured here: no GPU has run this code yet).
GPU_TFLOPS = 25.0  # sustained fp32 per H100-class GPU, ~40% of its ~67 TFLOP/s peak
NVLINK_GBPS, PCIE_GBPS = 300.0, 20.0  # NCCL all-reduce bus bandwidth, NVLink vs PCIe
# Amazon-Book's size and its measured CPU time, from amazon_book_memory.md; its backbone's size
# and chain come from its spec.
AMAZON_BOOK = {"id": "ReFiT-AmazonBook-v0", "users": 70_679, "items": 24_915,
               "measured_cpu_s_per_512_users": 116.0}


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
    chain_steps = runs[1]["env_kwargs"]["steps"] or model.diffusion.steps
    return {"env": env_id, "users": users, "batch": batch,
            "group": runs[1]["config"]["group_size"],
            "trained_parameters": trained, "chain_steps": chain_steps,
            "train_steps": runs[1]["config"]["train_steps"], "runs": runs}


def episode_flops(parameters: int, chain_steps: int, train_steps: int) -> float:
    """A DiffRec episode's floating-point operations: an MLP's forward costs 2 per weight and
    row; the rollout runs every step forward, the update reruns the trained steps forward and
    backward (backward ~ 2 forwards)."""
    trained = min(train_steps, chain_steps)
    return 2.0 * parameters * (chain_steps + 3 * trained)


def projection(results: list[dict]) -> list[str]:
    """Amazon-Book on 8 GPUs from the CPU measurements and the stated assumptions."""
    cf = next((r for r in results if r["env"] == "ReFiT-ML1M-v0"), None)
    if cf is None:
        return []
    one, two = cf["runs"][1], cf["runs"][2]
    episodes = cf["users"] * cf["group"]
    cpu_rate = episode_flops(cf["trained_parameters"], cf["chain_steps"],
                             cf["train_steps"]) * episodes / one["wall_time_s"]
    steps_measured = -(-cf["users"] // cf["batch"])
    per_step_comm = two["communication_s"] / steps_measured
    book = AMAZON_BOOK
    spec = load_env_spec(book["id"])
    parameters = sum(p.numel() for p in spec.build_backbone(book["items"]).parameters())
    chain_steps = spec.env.get("steps") or spec.diffusion.steps
    flops = episode_flops(parameters, chain_steps, cf["train_steps"])
    book_episodes = book["users"] * cf["group"]
    book_steps = -(-book["users"] // cf["batch"])
    cpu_epoch = book["measured_cpu_s_per_512_users"] * book["users"] / 512
    compute = flops * book_episodes / (8 * GPU_TFLOPS * 1e12)
    ring_bytes = 2 * 7 / 8 * 4 * parameters
    lines = [
        "",
        "## Projection: Amazon-Book on 8 GPUs (a projection, not a measurement)",
        "",
        f"Measured above (ML-1M, {cf['trained_parameters']:,} trained floats): 1 process "
        f"sustains {cpu_rate / 1e9:.0f} GFLOP/s by the FLOP count of `episode_flops` (2 per "
        f"weight and row forward, backward twice that); 2 processes run "
        f"{one['wall_time_s'] / two['wall_time_s']:.2f}x faster and spend "
        f"{per_step_comm * 1e3:.0f} ms per step in collectives (a "
        f"{4 * cf['trained_parameters'] / 1e6:.0f} MB gradient over gloo on loopback, waiting "
        "for the slower rank included).",
        "",
        f"Amazon-Book (DiffRec, {parameters / 1e6:.1f} M floats, {chain_steps}-step "
        f"chain, every step trained): {flops / 1e9:.1f} GFLOP per episode, {book_episodes:,} "
        f"episodes ({book['users']:,} users x group {cf['group']}) and {book_steps:,} "
        f"all-reduces of {4 * parameters / 1e6:.0f} MB per epoch at "
        f"{cf['batch']} users per batch. Measured on 2 CPU cores (amazon_book_memory.md): "
        f"{book['measured_cpu_s_per_512_users']:.0f} s per 512 users (while another run "
        f"shared the cores), so about {cpu_epoch / 3600:.1f} h per epoch; the FLOP count at "
        f"the rate above predicts {flops * 512 * cf['group'] / (2 * cpu_rate):.0f} s for "
        f"those 512 users on 2 cores ({book['measured_cpu_s_per_512_users']:.0f} s measured "
        "with the cores shared): the count is of the right size.",
        "",
        f"Assumed for 8 GPUs: {GPU_TFLOPS:.0f} TFLOP/s sustained fp32 each; NCCL ring "
        "all-reduce moving 2 (W-1)/W of the gradient at a bus bandwidth of "
        f"{NVLINK_GBPS:.0f} GB/s (NVLink) or {PCIE_GBPS:.0f} GB/s (PCIe).",
        "",
        "| interconnect | compute s / epoch | all-reduce s / epoch | epoch s | collectives "
        "share | vs 2 CPU cores |",
        "|---|---|---|---|---|---|",
    ]
    for name, bandwidth in (("NVLink", NVLINK_GBPS), ("PCIe", PCIE_GBPS)):
        comm = book_steps * ring_bytes / (bandwidth * 1e9)
        total = compute + comm
        lines.append(f"| {name} | {compute:.1f} | {comm:.1f} | {total:.1f} | "
                     f"{comm / total:.0%} | {cpu_epoch / total:,.0f}x |")
    lines += [
        "",
        f"At {cf['batch']} users per batch each GPU holds only {cf['batch'] * cf['group'] // 8} "
        "trajectories per step, too few to keep it busy (kernel launches, not FLOPs, would "
        "dominate) and every step pays a full gradient all-reduce: on 8 GPUs raise "
        "`users_per_batch` (e.g. 512, with `users_per_chunk` 64), which divides the all-reduce "
        "time per epoch by 8 at the same compute. `benchmarks/gpu_check.sh` measures the "
        "one-GPU epoch this projection assumes.",
    ]
    return lines


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
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the scale_out.json an earlier run left in "
                             "--work, measuring nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the measured processes: this one only loads checkpoints
    work = Path(args.work or tempfile.mkdtemp(prefix="scale_out_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((work / "scale_out.json").read_text())
        for r in results:
            r["runs"] = {int(k): v for k, v in r["runs"].items()}
    else:
        results = [measure(env_id, args.users, args.batch, work)
                   for env_id in args.envs.split(",")]
    write_result("scale_out", "Scale-out: ReFiT fine-tuning under torchrun (gloo, CPU)",
                 report(results) + projection(results))
    (work / "scale_out.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
