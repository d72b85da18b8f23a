"""The CF agent on ML-1M with the batches a GPU affords (issue 15, part 3).

The gradient check (gradient_check_ReFiT-ML1M-v0_collaborative.md) found one batch of 64 users
x 8 trajectories nearly orthogonal to the exact gradient (cosine <= 0.09): on 2 CPU cores the
agent could not afford the batches that would average that noise away. This study runs the
validation-chosen lever of cf_levers_ReFiT-ML1M-v0.md (exploration on the last 5 steps only,
kappa 30) over every training user (5,949) per epoch, with 8x larger batches, more trajectories per
user and larger steps, on seeds 1-3 of the backbone, through the real CLI:

    refit-gym finetune --env ReFiT-ML1M-v0 --algo refit --checkpoint CK --seed S --test-curve \\
        --set ...

Selection is by validation only: each run keeps its best epoch by validation NDCG@20 (the start
included), and the configuration with the highest mean validation NDCG@20 over the seeds is the
study's pick; test is reported for every row and never used. `continue` runs with the pick's
mean training seconds as its budget (equal wall time), first: it is what a short GPU lease must
not lose to the grid.

    REFIT_DATA_DIR=../shared/data python benchmarks/cf_batch_study.py --device cuda \\
        --checkpoints s1/denoiser.pt s2/denoiser.pt s3/denoiser.pt --work /tmp/cf-study
    python benchmarks/cf_batch_study.py --records results/cf_batch_study_ReFiT-ML1M-v0.jsonl \\
        --report-only   # rewrite the .md from the committed records

``--rows`` and ``--seeds`` run single cells (e.g. one seed on a CPU, ``--device cpu --parallel 1
--threads 2``: a group-32 run takes over two hours on 2 cores); ``--continue-only`` runs just
`continue`. Equal wall time needs the pick's seconds on the same device model: a CPU's model
(CPUs differ: ML-1M's pretraining took 74 s on one 2-core Xeon and 130 s on a 2-core EPYC), or
any GPU's when this GPU's model has none (the GPU seconds were measured with five runs sharing
one H100, so a `continue` alone on an H100 or H200 gets at least the pick's compute). On a CPU
model where the pick never ran, ``--probe-updates N`` first times N of the pick's updates there,
and `continue` gets the pick's updates at that rate: the pick's training time is nothing but
its updates, all of one size. `continue` resumes where it stopped when the study is rerun.

Each record names its backbone by a digest of its weights. Another CPU's kernels round
differently, so a checkpoint pretrained there differs in its last bits; it is accepted when its
validation and test metrics match the records' start within START_TOLERANCE, and refused
otherwise.

With ``--records`` pointing at the committed records, a run adds only what they lack. The
report is written beside the records (``X.jsonl`` -> ``X.md``): a smoke run with its own
records leaves the committed report alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from common import cpu_model, write_result

from refit_gym.backbones import load_backbone
from refit_gym.data import atomic_path
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_agent_hyperparams, load_env_spec
from refit_gym.training.metrics import evaluate, sample_std

ENV_ID = "ReFiT-ML1M-v0"
# cf_levers_ReFiT-ML1M-v0.md's validation-chosen lever; every row below adds to it.
LEVER = {"explore_all_steps": "false", "train_steps": 5, "kappa": 30}
# Each row sets every key of agents/refit.toml's ML-1M tables (with LEVER): on a GPU the id's
# cuda table, this study's pick, would otherwise fill in what a row leaves out.
GRID: dict[str, dict[str, object]] = {
    "batch 64, lr 1e-5 (the CPU lever, full epochs)": {"users_per_batch": 64, "group_size": 8,
                                                        "lr": 1e-5, "epochs": 4},
    "batch 512, lr 1e-5": {"users_per_batch": 512, "group_size": 8, "lr": 1e-5, "epochs": 16},
    "batch 512, lr 3e-5": {"users_per_batch": 512, "group_size": 8, "lr": 3e-5, "epochs": 16},
    "batch 512, lr 1e-4": {"users_per_batch": 512, "group_size": 8, "lr": 1e-4, "epochs": 16},
    "batch 512, group 32, lr 3e-5": {"users_per_batch": 512, "group_size": 32, "lr": 3e-5,
                                     "epochs": 16},
    # Added after the first GPU run: the row above still rose at its last epoch on validation.
    "batch 512, group 32, lr 3e-5, 32 epochs": {"users_per_batch": 512, "group_size": 32,
                                                "lr": 3e-5, "epochs": 32},
}
CONTINUE = "continue (the pick's training seconds)"
# A few updates of a row on another device model: its seconds per update there.
PROBE = " (rate probe)"
METRICS = ("ndcg@20", "recall@20")
# The same backbone up to floating point: seed 3 pretrained on an AMD EPYC differs from the
# Intel Xeon's weights and moves its start's validation NDCG@20 by 1e-6 (test: not at all);
# seeds differ by 1e-3.
START_TOLERANCE = 1e-4


class Budget(NamedTuple):
    """`continue`'s equal wall time: the pick's mean training seconds on ``device``, measured
    there or (``basis``) its updates at the rate a probe measured there."""

    pick: str
    seconds: float
    device: str
    basis: str = ""


def run_name(config: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in config.split(" (")[0]).strip("-")
    return f"{slug}{'-probe' * config.endswith(PROBE)}-seed{seed}"


def updates(record: dict) -> int:
    """The number of policy updates a grid row's (or probe's) run made."""
    per_epoch = -(-record["users_per_epoch"] // GRID[record["config"].removesuffix(PROBE)][
        "users_per_batch"])
    return (len(record["history"]) - 1) * per_epoch


def weights_digest(checkpoint: Path) -> str:
    """sha256 of a checkpoint's weights (not of its file, whose metadata may differ between
    identical pretraining runs)."""
    model, _ = load_backbone(checkpoint)
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def device_name(device: str) -> str:
    """What a run's seconds were measured on: the GPU's model, or the CPU's."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}"


def check_backbones(checkpoints: list[Path], runs: list[dict], device: str) -> list[str]:
    """The checkpoints' weight digests, after checking them against the recorded runs': the
    records must only ever hold runs of the same backbones (up to floating point)."""
    digests = [weights_digest(c) for c in checkpoints]
    for seed, (checkpoint, digest) in enumerate(zip(checkpoints, digests), start=1):
        recorded = [r for r in runs if r["seed"] == seed]
        if recorded and digest not in {r["backbone_sha256"] for r in recorded}:
            check_same_start(checkpoint, recorded[0], device)
    return digests


def check_same_start(checkpoint: Path, record: dict, device: str) -> None:
    """Refuse ``checkpoint`` unless its validation and test metrics are ``record``'s start's
    within START_TOLERANCE."""
    spec, data = load_env_spec(ENV_ID), cached_dataset(ENV_ID, None)
    model, _ = load_backbone(checkpoint, data.n_items, device)
    metrics = evaluate(model, data, spec.pretrain, device=device)
    start = record["history"][0]
    gap = max(abs(metrics[split][m] - start[f"{split} {m}"])
              for split in ("valid", "test") for m in METRICS)
    seed = record["seed"]
    if gap > START_TOLERANCE:
        raise SystemExit(
            f"cf_batch_study: {checkpoint} is not the seed-{seed} backbone the records were "
            f"measured on (weights sha256 {record['backbone_sha256'][:12]}..., and its metrics "
            f"differ from that start's by up to {gap:.2g}); pretrain it with `refit-gym pretrain "
            f"--env {ENV_ID} --seed {seed}`, or start a new --records file")
    print(f"cf_batch_study: {checkpoint} differs in its last bits from the seed-{seed} backbone "
          f"of the records (another CPU's rounding); its metrics match that start within "
          f"{gap:.1g}: accepted", flush=True)


def check_rows_set_every_default() -> None:
    """Refuse a row that would take a hyperparameter from agents/refit.toml: which table fills
    it in depends on the device."""
    defaults = {key for device in ("cpu", "cuda")
                for key in load_agent_hyperparams("refit", ENV_ID, device)}
    for config, row in GRID.items():
        if missing := defaults - {*LEVER, *row}:
            raise SystemExit(f"cf_batch_study: row {config!r} leaves {sorted(missing)} to the "
                             "device's defaults; set them in GRID")


def run_finetune(config: str, seed: int, checkpoint: Path, args: argparse.Namespace,
                 deadline: float, budget: Budget | None = None) -> dict | None:
    """One `refit-gym finetune` run (`continue` given its ``budget``); its compact record, or
    None when the deadline stopped it."""
    out = args.work / run_name(config, seed)
    users = args.users_per_epoch
    if config == CONTINUE:
        extra = ["--algo", "continue", "--budget-seconds", f"{budget.seconds:.1f}",
                 "--set", f"eval_every={args.continue_eval_every}"]
    else:
        row = GRID[config.removesuffix(PROBE)]
        epochs = min(row["epochs"], args.max_epochs)
        if config.endswith(PROBE):
            users, epochs = args.probe_updates * row["users_per_batch"], 1
        settings = {**LEVER, **row, "users_per_epoch": users, "epochs": epochs}
        extra = ["--algo", "refit",
                 *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    command = [sys.executable, "-m", "refit_gym.cli", "finetune", "--env", ENV_ID, "--checkpoint",
               str(checkpoint), "--seed", str(seed), "--out", str(out), "--device", args.device,
               # Each record keeps test for every epoch of its history, as the committed ones
               # do (the driver's default evaluates it for the start and the selected model).
               "--quiet", "--test-curve", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    left = deadline - time.monotonic()
    if left < 30:
        return None
    try:
        subprocess.run(command, env=env, check=True, timeout=left, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"cf_batch_study: {out.name} stopped at the deadline", flush=True)
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    history = [{"epoch": h["epoch"], "elapsed": h["elapsed"], "fixed": h.get("fixed_reward"),
                **{f"{split} {m}": h[split][m] for split in ("valid", "test") for m in METRICS}}
               for h in metrics["history"]]
    return {"config": config, "seed": seed, "best_epoch": metrics["best_epoch"],
            "command": " ".join(command[2:]), "history": history, "device": args.device_name,
            "parallel": args.parallel, "threads": args.threads,
            "users_per_epoch": users or args.train_users,
            "study": " ".join(["python", *sys.argv]),
            "backbone_sha256": args.digests[seed - 1],
            **({"budget": budget._asdict()} if budget else {})}


def continue_budget(runs: list[dict], name: str) -> Budget | None:
    """The pick's seconds on device model ``name``, else (on a GPU) on any GPU, else its
    updates at the seconds per update that a probe of it measured on ``name``; None when
    there is no pick or none of these."""
    pick = choose(runs)
    if pick is None:
        return None
    picked = [r for r in runs if r["config"] == pick]
    same = [r for r in picked if r["device"] == name]
    if not same and not name.startswith("CPU"):
        same = [r for r in picked if not r["device"].startswith("CPU")]
    if same:
        return Budget(pick, statistics.mean(r["history"][-1]["elapsed"] for r in same),
                      same[0]["device"])
    if not (probes := probes_of(runs, pick, name)):
        return None
    rate = statistics.mean(r["history"][-1]["elapsed"] / updates(r) for r in probes)
    made = statistics.mean(updates(r) for r in picked)
    return Budget(pick, made * rate, name,
                  f"its {made:.0f} updates at {rate:.1f} s each "
                  f"(timed over {sum(updates(r) for r in probes)} updates here)")


def probes_of(runs: list[dict], pick: str, name: str) -> list[dict]:
    """The rate probes of ``pick`` on device model ``name``."""
    return [r for r in runs if r["config"] == pick + PROBE and r["device"] == name]


def run_all(args: argparse.Namespace) -> None:
    args.device_name = device_name(args.device)
    check_rows_set_every_default()
    args.work.mkdir(parents=True, exist_ok=True)
    args.train_users = cached_dataset(ENV_ID, None).n_train_rows
    records = args.records
    records.touch()
    recorded = load(records)
    done = {(r["config"], r["seed"]) for r in recorded}
    args.digests = check_backbones(args.checkpoints, recorded, args.device)
    deadline = time.monotonic() + args.deadline_seconds
    lock = threading.Lock()

    def job(config: str, seed: int, budget: Budget | None = None) -> None:
        if (config, seed) in done:  # measured by an earlier run of the study
            return
        record = run_finetune(config, seed, args.checkpoints[seed - 1], args, deadline, budget)
        if record is not None:
            with lock:
                append_record(records, record)
            print(f"cf_batch_study: {config}, seed {seed}: valid ndcg@20 "
                  f"{record['history'][0]['valid ndcg@20']:.5f} -> "
                  f"{selected(record)['valid ndcg@20']:.5f} (epoch {record['best_epoch']})",
                  flush=True)

    seeds = args.seeds or range(1, len(args.checkpoints) + 1)
    if args.probe_updates:  # before `continue`, whose budget may rest on it
        if (pick := choose(recorded)) is None:
            raise SystemExit("cf_batch_study: --probe-updates needs a pick in the records")
        # Once a device model: another probe would move the rate, and so the budget of a
        # `continue` already under way, whose saved state would then be refused.
        if not probes_of(recorded, pick, args.device_name):
            job(pick + PROBE, seeds[0])
            recorded = load(records)
    if not args.rows:  # `continue` first: the grid's extra rows must not starve it again
        budget = continue_budget(recorded, args.device_name)
        if budget is None:
            print(f"cf_batch_study: no pick measured on {args.device_name} (nor, for a GPU, on "
                  "another GPU): `continue` has no equal-time budget here", flush=True)
        else:
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(lambda s: job(CONTINUE, s, budget), seeds))
    if args.continue_only:
        return
    rows = args.rows or list(GRID)
    with ThreadPoolExecutor(args.parallel) as pool:  # seed-major: every row gets seeds evenly
        list(pool.map(lambda cs: job(*cs), [(c, s) for s in seeds for c in rows]))


def append_record(records: Path, record: dict) -> None:
    """Add ``record`` as the last line of ``records`` by writing the whole file anew and
    renaming it into place: a kill leaves the old records or the new ones, never half a line."""
    with atomic_path(records) as tmp:
        tmp.write_text(records.read_text() + json.dumps(record) + "\n")


def load(records: Path) -> list[dict]:
    runs = []
    for number, line in enumerate(records.read_text().splitlines(), 1):
        if line.strip():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SystemExit(f"cf_batch_study: {records} line {number} is not a JSON record "
                                 f"({err}); remove or repair that line") from err
    return runs


def selected(record: dict) -> dict:
    return record["history"][record["best_epoch"]]


def choose(runs: list[dict]) -> str | None:
    """The grid row with the highest mean selected validation NDCG@20 over the most seeds."""
    by_config = {c: [r for r in runs if r["config"] == c] for c in GRID}
    most = max((len(v) for v in by_config.values()), default=0)
    complete = {c: v for c, v in by_config.items() if v and len(v) == most}
    if not complete:
        return None
    return max(complete, key=lambda c: statistics.mean(
        selected(r)["valid ndcg@20"] for r in complete[c]))


def spread(values: list[float]) -> str:
    """Mean ± sample std (n - 1), the project's one convention; a single value alone."""
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {sample_std(values):.4f}"


def seconds_by_device(runs: list[dict]) -> str:
    """Mean training seconds of ``runs``, one figure per device they ran on."""
    devices = dict.fromkeys(r["device"] for r in runs)
    return "; ".join(
        f"{statistics.mean(r['history'][-1]['elapsed'] for r in runs if r['device'] == d):,.0f}"
        + (f" ({d})" if len(devices) > 1 else "") for d in devices)


def report(args: argparse.Namespace) -> None:
    runs = load(args.records)
    pick = choose(runs)
    earlier = args.records.with_suffix(".md")
    reading = earlier.read_text().partition("\n## ")[2] if earlier.is_file() else ""
    reading = "## " + reading if reading else ""
    users = next(r for r in runs if r["config"] in GRID)["users_per_epoch"]
    lines = ["Runs (each row's training seconds are given per device; runs sharing a device slow "
             "each other):", ""]
    for study in dict.fromkeys(r["study"] for r in runs):
        ran = [r for r in runs if r["study"] == study]
        lines.append(f"- `{study}`: {len(ran)} run{'s' * (len(ran) > 1)} on {ran[0]['device']}, "
                     f"{ran[0]['parallel']} at a time, {ran[0]['threads']} CPU threads each")
    lines += ["",
              "Every row adds to the lever " + ", ".join(f"{k}={v}" for k, v in LEVER.items())
              + f", {users:,} training users per epoch. Per run: the best "
              "epoch by validation NDCG@20, start included. Mean ± std over the seeds done; "
              "test never used for any choice.", "",
              "| configuration | seeds | updates | valid ndcg@20 start -> selected | test ndcg@20 "
              "start -> selected | test recall@20 start -> selected | fixed reward epoch 0 -> "
              "last | training s |", "|---|---|---|---|---|---|---|---|"]
    for config in [*GRID, CONTINUE]:
        rows = [r for r in runs if r["config"] == config]
        if not rows:
            continue
        start, best = [r["history"][0] for r in rows], [selected(r) for r in rows]
        fixed = [(r["history"][0]["fixed"], r["history"][-1]["fixed"]) for r in rows
                 if r["history"][-1]["fixed"] is not None]
        made = "" if config == CONTINUE else str(updates(rows[0]))
        fixed_cell = (f"{statistics.mean(a for a, _ in fixed):.4f} -> "
                      f"{statistics.mean(b for _, b in fixed):.4f}" if fixed else "")
        mark = " **(pick)**" if config == pick else ""
        lines.append(
            f"| {config}{mark} | {','.join(str(r['seed']) for r in rows)} | {made} | "
            + " | ".join(f"{spread([h[f'{s} {m}'] for h in start])} -> "
                         f"{spread([h[f'{s} {m}'] for h in best])}"
                         for s, m in (("valid", "ndcg@20"), ("test", "ndcg@20"),
                                      ("test", "recall@20")))
            + f" | {fixed_cell} | {seconds_by_device(rows)} |")
    for b in dict.fromkeys(Budget(**r["budget"]) for r in runs if "budget" in r):
        measured = (f"{b.pick!r} on {b.device}: {b.basis}" if b.basis else
                    f"the mean training seconds of {b.pick!r} on {b.device}")
        lines += ["", f"`continue`'s budget: {b.seconds:,.0f} s, {measured}"
                  + ("" if b.pick == pick else f" (the pick has since become {pick!r})")]
    for probe in (r for r in runs if r["config"].endswith(PROBE)):
        lines += ["", f"Rate probe: {updates(probe)} updates of "
                  f"{probe['config'].removesuffix(PROBE)!r} (seed "
                  f"{probe['seed']}) on {probe['device']}, {probe['threads']} threads: "
                  f"{probe['history'][-1]['elapsed'] / updates(probe):.1f} s an update"]
    lines += ["", "Validation NDCG@20 by epoch (mean over the seeds done):", ""]
    for config in GRID:
        rows = [r for r in runs if r["config"] == config]
        if rows:
            curve = [statistics.mean(r["history"][e]["valid ndcg@20"] for r in rows)
                     for e in range(min(len(r["history"]) for r in rows))]
            lines.append(f"- {config}: " + " ".join(f"{v:.5f}" for v in curve))
    path = write_result(args.records.stem, f"The CF agent on {ENV_ID} with GPU-sized batches",
                        lines, folder=args.records.parent)
    if reading:  # the hand-written reading of an earlier report: kept, to be brought up to date
        with atomic_path(path) as tmp:
            tmp.write_text(path.read_text() + "\n" + reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=[],
                        help="pretrained denoiser.pt of seeds 1, 2, 3 (in that order)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cf-batch-study"),
                        help="the runs' output folders")
    parser.add_argument("--records", type=Path, default=None,
                        help="the runs' records, appended to; runs already there are not "
                             "repeated (default: WORK/runs.jsonl)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parallel", type=int, default=5, help="runs at a time")
    parser.add_argument("--threads", type=int, default=3, help="CPU threads per run")
    parser.add_argument("--deadline-seconds", type=float, default=1e9,
                        help="no run starts, and running ones stop, after this many seconds")
    parser.add_argument("--users-per-epoch", type=int, default=0,
                        help="training users per epoch (0: all); smaller for a CPU smoke run")
    parser.add_argument("--max-epochs", type=int, default=1000, help="caps every row's epochs")
    parser.add_argument("--rows", nargs="+", choices=list(GRID), default=None,
                        help="run only these grid rows (default: `continue`, then all)")
    parser.add_argument("--continue-only", action="store_true",
                        help="run only `continue`, at the pick's seconds on this device model")
    parser.add_argument("--continue-eval-every", type=int, default=5,
                        help="`continue`'s epochs between validation passes (DiffRec's own 5; "
                             "a CPU run of thousands of epochs can afford fewer)")
    parser.add_argument("--probe-updates", type=int, default=0,
                        help="first time this many updates of the pick on this device (on "
                             "the first of --seeds; once a device model): where no pick ran "
                             "on this device model, `continue`'s budget is the pick's updates "
                             "at this rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run only these backbone seeds (default: one per checkpoint)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.rows and args.continue_only:
        parser.error("--rows and --continue-only exclude each other")
    if args.seeds and not all(1 <= s <= len(args.checkpoints) for s in args.seeds):
        parser.error(f"--seeds {args.seeds}: each must be 1 to the number of --checkpoints "
                     f"({len(args.checkpoints)}; seed S runs on the S-th)")
    args.records = args.records or args.work / "runs.jsonl"
    if not args.report_only:
        if not args.checkpoints:
            parser.error("--checkpoints is required unless --report-only")
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
