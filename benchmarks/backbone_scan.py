"""One backbone or pretraining setting scanned: ranking quality, chain influence and
(``--finetune``) what ReFiT makes of each value, all on validation (test is reported, never used
to choose).

A sequential backbone is fit for RL only if its chain's randomness moves the outcome; the
settings that decide that (ADRec's lambda ``state_scale``, ADRec-Concat's item-table scale
``embedding_std``) also move ranking quality, so each value is pretrained from scratch with the
id's protocol, measured on the id's chain, and optionally fine-tuned with the id's ReFiT table:

    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_scan.py \\
        --env ReFiT-SeqSynthetic-v1 --field state_scale --values 0.001,0.1,1 --out /tmp/scan
    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_scan.py \\
        --env ReFiT-SeqSynthetic-Concat-v0 --field embedding_std --values 0.1,0.2,0.3,0.4,0.6,1 \\
        --seeds 1,2,3 --finetune --out /tmp/scan
    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_scan.py \\
        --env ReFiT-SeqSynthetic-v0 --field pretrain.lr --values 0.005,0.002,0.001,0.0005 \\
        --seeds 1,2,3 --out /tmp/scan

A field ``pretrain.<key>`` is a key of the spec's [pretrain] table, any other a [backbone] key.

Every (value, seed) is a folder of cells under ``--out`` (pretrain, chain influence, ReFiT),
each recording its identity as ``refit-gym bench``'s cells do: a finished cell is reused, an
interrupted one resumes, so a scan run one (value, seed) at a time is reported whole by one
more call over all of them, and ``--finished-only`` reports the finished cells and computes
nothing. (A scan folder written before cells were recorded has no metrics.json: it is
finished again, which rewrites its denoiser.pt, and its old ReFiT state is then refused.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chain_influence import influence_rows, table_header
from common import mean_std, write_result

from refit_gym.data import Dataset
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import EnvSpec, load_agent_hyperparams, load_env_spec
from refit_gym.training.bench import (
    common_identity,
    finetune_identity,
    pretrain_identity,
    record_cell,
    reuse_cell,
)
from refit_gym.training.finetune import finetune
from refit_gym.training.pretrain import pretrain

DEVICE = "cpu"


def with_value(spec: EnvSpec, field: str, value: float) -> EnvSpec:
    """``spec`` with ``field`` (a [backbone] key, or ``pretrain.<key>``) set to ``value``."""
    section, _, key = field.rpartition(".")
    if section == "pretrain":
        if not hasattr(spec.pretrain, key):
            raise SystemExit(f"{field}: [pretrain] has no key {key!r}")
        return dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain,
                                                                      **{key: value}))
    if section:
        raise SystemExit(f"{field}: scan a [backbone] key or pretrain.<key>")
    return dataclasses.replace(spec, backbone={**spec.backbone, field: value})


@dataclass
class ScanCell:
    """One (value, seed): its pretrained backbone, chain-influence rows and ReFiT run."""

    value: float
    seed: int
    pretrained: dict[str, Any]  # the pretrain cell's metrics.json
    influence: list[str]  # chain_influence.py's table rows
    tuned: dict[str, Any] | None  # the ReFiT cell's metrics.json; None if not run


def tau_tag(args: argparse.Namespace, prefix: str) -> str:
    """What names a ``--tau`` run's ReFiT cell and report ("" at the id's own tau)."""
    return "" if args.tau is None else f"{prefix}{args.tau:g}"


def run_cell(variant: EnvSpec, data: Dataset, folder: Path, value: float, seed: int,
             args: argparse.Namespace) -> ScanCell | None:
    """The cells of one (value, seed), each reused when finished; with ``--finished-only``,
    None when the backbone or its chain influence is not finished, and no ReFiT run when
    that is not."""
    backbone = pretrain_identity(variant, data, seed, None, DEVICE)
    cell = folder / "pretrain"
    pretrained = reuse_cell(cell, backbone, variant)
    if pretrained is None:
        if args.finished_only:
            return None
        result = pretrain(variant, data, cell, seed=seed, device=DEVICE, progress=False)
        pretrained = record_cell(cell, result.to_json(variant.id, seed), backbone, DEVICE)
    # The chain's length and the reward's tau are the spec's [env]: its whole digest counts.
    measured = {"algo": "chain_influence", "rows": args.rows,
                "trajectories": args.trajectories, "pretrain": backbone,
                **common_identity(variant, data)}
    checkpoint = cell / "denoiser.pt"  # not the recorded path: --out may move
    cell = folder / "influence"
    if (influence := reuse_cell(cell, measured, variant)) is None:
        if args.finished_only:
            return None
        rows = influence_rows(variant, data, checkpoint, f"{value:g}",
                              rows=args.rows, trajectories=args.trajectories,
                              extra=(str(seed),))
        influence = record_cell(cell, {"rows": rows}, measured, DEVICE)
    tuned = None
    if args.finetune:
        env_kwargs = None if args.tau is None else {"reward_params": {"tau": args.tau}}
        identity = finetune_identity("refit", seed, load_agent_hyperparams(
            "refit", variant.id, DEVICE), env_kwargs, backbone, common_identity(variant, data))
        cell = folder / f"refit{tau_tag(args, '-tau')}"
        tuned = reuse_cell(cell, identity, variant)
        if tuned is None and not args.finished_only:
            run = finetune(variant, data, checkpoint, "refit", cell, seed=seed,
                           device=DEVICE, env_kwargs=env_kwargs, progress=False)
            tuned = record_cell(cell, run, identity, DEVICE)
    return ScanCell(value, seed, pretrained, influence["rows"], tuned)


def report(args: argparse.Namespace, spec: EnvSpec, cells: list[ScanCell],
           missing: list[str]) -> list[str]:
    metric = spec.pretrain.selection_metric
    quality = [f"| {args.field} | seed | best epoch | valid {metric} | valid ndcg@20 | "
               f"test {metric} | test ndcg@20 | wall s |", "|---|---|---|---|---|---|---|---|"]
    influence = table_header(args.field, extra=("seed",))
    tuned = [f"| {args.field} | seed | valid ndcg@20 start -> ReFiT | test ndcg@20 start -> "
             "ReFiT | selected epoch | training s |", "|---|---|---|---|---|---|"]
    passes = [f"| {args.field} | seed | valid ndcg@20 per pass | fixed reward, start -> last |",
              "|---|---|---|---|"]
    for c in cells:
        p = c.pretrained
        quality.append(f"| {c.value:g} | {c.seed} | {p['best_epoch']} | {p['valid'][metric]:.4f} | "
                       f"{p['valid']['ndcg@20']:.4f} | {p['test'][metric]:.4f} | "
                       f"{p['test']['ndcg@20']:.4f} | {p['wall_time_s']:.0f} |")
        influence += c.influence
        if (run := c.tuned) is not None:
            tuned.append(f"| {c.value:g} | {c.seed} | {run['start']['valid']['ndcg@20']:.4f} -> "
                         f"{run['valid']['ndcg@20']:.4f} | {run['start']['test']['ndcg@20']:.4f}"
                         f" -> {run['test']['ndcg@20']:.4f} | {run['best_epoch']} | "
                         f"{run['wall_time_s']:.0f} |")
            history = run["history"]
            curve = ", ".join(f"{h['valid']['ndcg@20']:.4f}" for h in history)
            passes.append(f"| {c.value:g} | {c.seed} | {curve} | "
                          f"{history[0]['fixed_reward']:.1f} -> "
                          f"{history[-1]['fixed_reward']:.1f} |")
    summary = [f"| {args.field} | seeds | valid {metric} | valid ndcg@20 | best epochs | "
               "wall s (mean) |", "|---|---|---|---|---|---|"]
    for value in dict.fromkeys(c.value for c in cells):
        runs = [c.pretrained for c in cells if c.value == value]
        summary.append(
            f"| {value:g} | {', '.join(str(c.seed) for c in cells if c.value == value)} | "
            f"{mean_std([r['valid'][metric] for r in runs])} | "
            f"{mean_std([r['valid']['ndcg@20'] for r in runs])} | "
            f"{', '.join(str(r['best_epoch']) for r in runs)} | "
            f"{statistics.mean(r['wall_time_s'] for r in runs):.0f} |")
    lines = [f"Metrics of each pretraining's selected epoch under the backbone's own sampler "
             f"({spec.pretrain.final_sampling_seeds} sampling seeds).", "", *quality, "",
             "Validation (mean ± sample std over the seeds run):", "", *summary, "",
             "Chain influence (benchmarks/chain_influence.py's columns, the scanned "
             f"{args.field} in place of lambda; {args.rows} validation rows x "
             f"{args.trajectories} trajectories):", "", *influence]
    if args.finetune:
        reward = f"the reward at tau {args.tau:g}" if args.tau is not None else "the id's reward"
        lines += ["", f"ReFiT with the id's table (agents/refit.toml) and {reward}, selected "
                  "on validation "
                  "NDCG@20 (the start is epoch 0); test reported, never used:", "", *tuned, "",
                  "Validation NDCG@20 of every selection pass (one sampling seed; the first is "
                  "the start) and the fixed-episode reward (the optimiser's own objective on 256 "
                  "fixed episodes of the MDP: training rows, or held-out rows with "
                  "--hold-out-latest):", "", *passes]
    if missing:
        lines += ["", f"Not finished, so not in the tables: {', '.join(missing)}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ReFiT-SeqSynthetic-v1")
    parser.add_argument("--field", default="state_scale",
                        help="a [backbone] key of the spec, or pretrain.<key>")
    parser.add_argument("--values", default="0.001,0.1,1", help="comma-separated numbers")
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune each backbone with the id's ReFiT table")
    parser.add_argument("--hold-out-latest", action="store_true",
                        help="hold each training sequence's latest row out of pretraining and "
                             "fine-tune on those rows (SequenceData.hold_out_latest)")
    parser.add_argument("--tau", type=float, default=None,
                        help="ReFiT's reward temperature instead of the id's (its own cells)")
    parser.add_argument("--finished-only", action="store_true",
                        help="report the finished cells under --out; compute nothing")
    parser.add_argument("--out", default="runs/backbone-scan")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--trajectories", type=int, default=16)
    args = parser.parse_args()
    if args.tau is not None and not args.tau > 0:
        raise SystemExit(f"--tau {args.tau}: the reward's temperature must be positive")
    spec = load_env_spec(args.env)
    if not spec.sequential:
        raise SystemExit(f"{args.env} is not a sequential id: chain influence is measured on "
                         "the next-item scenario's sampled chains")
    data, suffix = cached_dataset(args.env), ""
    if args.hold_out_latest:
        data, suffix = data.hold_out_latest(), "_holdout_latest"
    cells, missing = [], []
    for value in (float(v) for v in args.values.split(",")):
        variant = with_value(spec, args.field, value)
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = Path(args.out) / f"{args.field}{value:g}{suffix}-seed{seed}"
            if (cell := run_cell(variant, data, folder, value, seed, args)) is None:
                missing.append(f"{value:g} seed {seed}")
                continue
            cells.append(cell)
            if args.finetune and cell.tuned is None:
                missing.append(f"{value:g} seed {seed} (ReFiT)")
    if not cells:
        raise SystemExit(f"no finished (value, seed) under {args.out}: run without "
                         "--finished-only to compute them")
    held = ", each training sequence's latest row held out" if args.hold_out_latest else ""
    write_result(f"backbone_scan_{args.env}_{args.field.replace('.', '_')}{suffix}"
                 f"{tau_tag(args, '_tau')}",
                 f"{spec.backbone_type}'s {args.field} on {args.env}{held}",
                 report(args, spec, cells, missing))


if __name__ == "__main__":
    main()
