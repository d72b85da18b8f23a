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
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from chain_influence import influence_rows, table_header
from common import mean_std, write_result

from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import EnvSpec, load_env_spec
from refit_gym.training.finetune import finetune
from refit_gym.training.pretrain import pretrain


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ReFiT-SeqSynthetic-v1")
    parser.add_argument("--field", default="state_scale",
                        help="a [backbone] key of the spec, or pretrain.<key>")
    parser.add_argument("--values", default="0.001,0.1,1", help="comma-separated numbers")
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune each backbone with the id's ReFiT table")
    parser.add_argument("--out", default="runs/backbone-scan")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--trajectories", type=int, default=16)
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    if not spec.sequential:
        raise SystemExit(f"{args.env} is not a sequential id: chain influence is measured on "
                         "the next-item scenario's sampled chains")
    data = cached_dataset(args.env)
    metric = spec.pretrain.selection_metric
    quality = [f"| {args.field} | seed | best epoch | valid {metric} | valid ndcg@20 | "
               f"test {metric} | test ndcg@20 | wall s |", "|---|---|---|---|---|---|---|---|"]
    tuned = [f"| {args.field} | seed | valid ndcg@20 start -> ReFiT | test ndcg@20 start -> "
             "ReFiT | selected epoch | training s |", "|---|---|---|---|---|---|"]
    influence = table_header(args.field, extra=("seed",))
    summary = [f"| {args.field} | valid {metric} | valid ndcg@20 | best epochs | wall s (mean) |",
               "|---|---|---|---|---|"]
    seeds = [int(s) for s in args.seeds.split(",")]
    for value in (float(v) for v in args.values.split(",")):
        variant = with_value(spec, args.field, value)
        results = []
        for seed in seeds:
            folder = Path(args.out) / f"{args.field}{value:g}-seed{seed}"
            result = pretrain(variant, data, folder / "pretrain", seed=seed, progress=False)
            results.append(result)
            quality.append(
                f"| {value:g} | {seed} | {result.best_epoch} | {result.valid[metric]:.4f} | "
                f"{result.valid['ndcg@20']:.4f} | {result.test[metric]:.4f} | "
                f"{result.test['ndcg@20']:.4f} | {result.wall_time_s:.0f} |")
            influence += influence_rows(variant, data, result.checkpoint, f"{value:g}",
                                        rows=args.rows, trajectories=args.trajectories,
                                        extra=(str(seed),))
            if args.finetune:
                run = finetune(variant, data, result.checkpoint, "refit", folder / "refit",
                               seed=seed, progress=False)
                tuned.append(
                    f"| {value:g} | {seed} | {run['start']['valid']['ndcg@20']:.4f} -> "
                    f"{run['valid']['ndcg@20']:.4f} | {run['start']['test']['ndcg@20']:.4f} -> "
                    f"{run['test']['ndcg@20']:.4f} | {run['best_epoch']} | "
                    f"{run['wall_time_s']:.0f} |")
        summary.append(
            f"| {value:g} | {mean_std([r.valid[metric] for r in results])} | "
            f"{mean_std([r.valid['ndcg@20'] for r in results])} | "
            f"{', '.join(str(r.best_epoch) for r in results)} | "
            f"{statistics.mean(r.wall_time_s for r in results):.0f} |")
    lines = [f"Metrics of each pretraining's selected epoch under the backbone's own sampler "
             f"({spec.pretrain.final_sampling_seeds} sampling seeds).", "", *quality, "",
             f"Validation over seeds {args.seeds} (mean ± sample std):", "", *summary, "",
             "Chain influence (benchmarks/chain_influence.py's columns, the scanned "
             f"{args.field} in place of lambda):", "", *influence]
    if args.finetune:
        lines += ["", "ReFiT with the id's table (agents/refit.toml), selected on validation:",
                  "", *tuned]
    write_result(f"backbone_scan_{args.env}_{args.field.replace('.', '_')}",
                 f"{spec.backbone_type}'s {args.field} on {args.env}", lines)


if __name__ == "__main__":
    main()
