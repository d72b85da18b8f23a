"""ADRec's lambda (``state_scale``): how strongly its decoder reads the noisy state x_t, against
ranking quality (validation) and chain influence. ADRec's 0.001 makes the final state almost a
function of the history; a larger lambda is the project's own variant. Each scale is pretrained
from scratch with the id's protocol (validation selects the epoch; test is reported, never used)
and measured on the id's chain:

    REFIT_DATA_DIR=../shared/data python benchmarks/adrec_state_scale.py \\
        --env ReFiT-SeqSynthetic-v1 --scales 0.001,0.1,1 --seed 1 --out /tmp/adrec-scale
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from chain_influence import COLUMNS, _row
from common import write_result

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training.chain_influence import chain_influence_report
from refit_gym.training.pretrain import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="ReFiT-SeqSynthetic-v1")
    parser.add_argument("--scales", default="0.001,0.1,1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/adrec-state-scale")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--trajectories", type=int, default=16)
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    if spec.backbone_type != "adrec":
        raise SystemExit(f"{args.env} runs {spec.backbone_type}, not adrec")
    data = cached_dataset(args.env)
    metric = spec.pretrain.selection_metric
    quality = [f"| lambda | best epoch | valid {metric} | valid ndcg@20 | test {metric} | "
               "test ndcg@20 | wall s |", "|---|---|---|---|---|---|---|"]
    influence = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for scale in (float(s) for s in args.scales.split(",")):
        variant = dataclasses.replace(spec, backbone={**spec.backbone, "state_scale": scale})
        result = pretrain(variant, data, Path(args.out) / f"lambda{scale:g}-seed{args.seed}",
                          seed=args.seed, progress=False)
        quality.append(f"| {scale:g} | {result.best_epoch} | {result.valid[metric]:.4f} | "
                       f"{result.valid['ndcg@20']:.4f} | {result.test[metric]:.4f} | "
                       f"{result.test['ndcg@20']:.4f} | {result.wall_time_s:.0f} |")
        model, _ = load_backbone(result.checkpoint, data.n_items)
        settings = EnvSettings.resolve(variant, {"checkpoint": str(result.checkpoint),
                                                 "device": "cpu"})
        chain = settings.chain(variant)
        tau = float(settings.reward_params.get("tau", 1.0))
        for ci in chain_influence_report(model, data, chain, rows=args.rows,
                                         trajectories=args.trajectories, tau=tau):
            influence.append(_row(args.env, model.name, f"{scale:g}", chain.steps, ci))
    lines = [f"Seed {args.seed}; metrics of the selected epoch under the backbone's own sampler "
             f"({spec.pretrain.final_sampling_seeds} sampling seeds).", "", *quality, "",
             "Chain influence (benchmarks/chain_influence.py's columns):", "", *influence]
    write_result(f"adrec_state_scale_{args.env}", f"ADRec's lambda on {args.env}", lines)


if __name__ == "__main__":
    main()
