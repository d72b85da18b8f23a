"""How much of a sequential backbone's ranking is lost to its chain's randomness: validation
metrics when items are ranked by one sampled x_0 (the backbone's own inference) and by the mean
of ``--trajectories`` sampled x_0 of the same row.

Scores are linear in x_0 (x_0 E^T), so the mean's scores are the trajectories' mean scores: a
Monte Carlo estimate of the expected score under the chain. A chain that decides nothing gains
nothing from it; where it decides, the gap says how much ranking one trajectory gives up and
the mean says what the backbone's expected x_0 ranks at. For each ``--run ID=CHECKPOINT``, every
validation row, ``--sampling-seeds`` runs of each ranking (sampling seed s of the mean averages
the draws of seeds s K, ..., s K + K - 1 of the single ranking, so seed 0's mean starts with
seed 0's single draw). From benchmarks/:

    REFIT_DATA_DIR=../shared/data python trajectory_mean.py \\
        --run ReFiT-Beauty-Concat-v0=../runs/bench/seed1/pretrain/denoiser.pt \\
        --run ReFiT-Beauty-Concat-v0=../runs/bench/seed1/refit/finetuned.pt
"""

from __future__ import annotations

import argparse

import torch
from common import sequential_id, write_result
from torch import Tensor

from refit_gym.backbones import Backbone, load_backbone
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.training.metrics import eval_mode, evaluate_sequential

METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


class TrajectoryMean:
    """A ranker scoring the mean of ``trajectories`` x_0 of the backbone's own sampler; the
    draws of sampling seed s are those of seeds s * trajectories + k, k < trajectories."""

    def __init__(self, backbone: Backbone, trajectories: int) -> None:
        self.backbone, self.trajectories = backbone, trajectories

    def rank_scores(self, batch: dict[str, Tensor], chain: GaussianDiffusion | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        if generator is None:
            raise ValueError("TrajectoryMean draws keyed by row: pass a seeded generator")
        first = generator.initial_seed() * self.trajectories
        x0 = sum(self.backbone.generate(batch, chain, torch.Generator(generator.device)
                                        .manual_seed(first + k))
                 for k in range(self.trajectories))
        return self.backbone.scores(x0 / self.trajectories)


def validation_rows(env_id: str, checkpoint: str, trajectories: int, seeds: int) -> list[str]:
    """Table rows of one checkpoint: one trajectory, then the mean of ``trajectories``."""
    spec, data = sequential_id(env_id)
    model, _ = load_backbone(checkpoint, data.n_items)
    lines = []
    with eval_mode(model):
        for k, ranker in ((1, model), (trajectories, TrajectoryMean(model, trajectories))):
            metrics = evaluate_sequential(ranker, data, ks=(10, 20), splits=("valid",),
                                          batch_size=spec.pretrain.eval_batch_size,
                                          sampling_seeds=range(seeds))
            cells = [f"{metrics['valid'][m]:.4f}"
                     + (f" ± {metrics['valid_std'][m]:.4f}" if seeds > 1 else "")
                     for m in METRICS]
            lines.append(f"| {checkpoint} | {k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="ID=CHECKPOINT")
    parser.add_argument("--trajectories", type=int, default=16, help="x_0 draws averaged")
    parser.add_argument("--sampling-seeds", type=int, default=1)
    parser.add_argument("--name", default="trajectory_mean")
    args = parser.parse_args()
    if args.trajectories < 2 or args.sampling_seeds < 1:
        parser.error("--trajectories must be at least 2 and --sampling-seeds at least 1")
    lines = ["| run | trajectories ranked | " + " | ".join(f"valid {m}" for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for run in args.run:
        env_id, _, checkpoint = run.partition("=")
        lines += validation_rows(env_id, checkpoint, args.trajectories, args.sampling_seeds)
    lines += ["", f"Every validation row; *1*: the backbone's own inference (one sampled x_0), "
              f"*{args.trajectories}*: items ranked by the mean of that many sampled x_0 of the "
              f"row; " + (f"mean ± sample std over {args.sampling_seeds} sampling seeds."
                          if args.sampling_seeds > 1 else "one sampling seed.")]
    write_result(args.name, "Ranking by one trajectory or by the mean of several", lines)


if __name__ == "__main__":
    main()
