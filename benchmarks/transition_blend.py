"""Does the item-transition graph hold what a sequential backbone misses? Validation metrics of
the backbone's own ranking blended, after the fact, with the first-order Markov peer.

Ranking by p = (1 - w) softmax(x_0 E^T / tau) + w q, where q is the Markov peer's next-item
distribution given the row's last item (its transition row plus its popularity smoothing,
normalised), for each weight w of ``--weights``; w = 0 is the backbone alone and w = 1 the peer
alone. No training: an upper reference for what a reward built on the transition graph could
teach the backbone. Each ``--run LABEL=CHECKPOINT``'s x_0 are sampled once per sampling seed
and shared by every weight; the weight is chosen on mean validation NDCG@20 over the runs, and
test (never used to choose) is reported at w = 0 and at the chosen w. From benchmarks/:

    REFIT_DATA_DIR=../shared/data python transition_blend.py --env ReFiT-Beauty-v1 \\
        --run 1=../runs/bench-beauty-v1/seed1/pretrain/denoiser.pt
"""

from __future__ import annotations

import argparse
import math

import torch
from common import mean_std, sequential_id, write_result
from torch import Tensor

from refit_gym.backbones import Backbone
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.training.metrics import eval_mode, evaluate_sequential
from refit_gym.training.peers import Markov

METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


class SampledFinalStates:
    """The backbone's own x_0 of a batch, drawn once per (sampling seed, rows) of one split
    and reused."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone, self.cache = backbone, {}

    def __call__(self, batch: dict[str, Tensor], chain: GaussianDiffusion | None,
                 generator: torch.Generator | None) -> Tensor:
        rows = batch["row"]
        key = (None if generator is None else generator.initial_seed(), int(rows[0]), len(rows))
        if key not in self.cache:
            self.cache[key] = self.backbone.generate(batch, chain, generator)
        return self.cache[key]


class TransitionBlend:
    """A ranker: log((1 - weight) softmax(scores / tau) + weight q_markov(. | last item))."""

    def __init__(self, final_states: SampledFinalStates, markov: Markov, weight: float,
                 tau: float) -> None:
        self.final_states, self.markov, self.weight, self.tau = final_states, markov, weight, tau

    def rank_scores(self, batch: dict[str, Tensor], chain: GaussianDiffusion | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        # log p in log space, so that w = 0 ranks exactly as the backbone (no float32 underflow
        # ties) and w = 1 exactly as the peer.
        model = self.final_states.backbone
        backbone = torch.log_softmax(model.scores(self.final_states(batch, chain, generator))
                                     / self.tau, dim=-1)
        peer = self.markov.rank_scores(batch)
        peer = (peer / peer.sum(dim=-1, keepdim=True)).log()
        return torch.logaddexp(backbone + math.log1p(-self.weight) if self.weight < 1
                               else torch.full_like(backbone, -torch.inf),
                               peer + math.log(self.weight) if self.weight > 0
                               else torch.full_like(peer, -torch.inf))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True, help="a sequential id")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CHECKPOINT")
    parser.add_argument("--weights", default="0,0.02,0.05,0.1,0.2,0.3,0.5,1",
                        help="comma-separated blend weights w of the Markov peer, in [0, 1]")
    parser.add_argument("--tau", type=float, default=1.0,
                        help="the backbone's softmax temperature (1: its training loss's)")
    parser.add_argument("--sampling-seeds", type=int, default=None,
                        help="sampling seeds of every evaluation (default: the spec's final "
                             "number; a chain that decides nothing needs one)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    if not weights or any(not 0 <= w <= 1 for w in weights) or 0.0 not in weights:
        parser.error("--weights must lie in [0, 1] and include 0 (the backbone alone)")
    if args.tau <= 0:
        parser.error("--tau must be positive")
    if args.sampling_seeds is not None and args.sampling_seeds < 1:
        parser.error("--sampling-seeds must be at least 1")
    spec, data = sequential_id(args.env)
    seeds = args.sampling_seeds or spec.pretrain.final_sampling_seeds
    markov = Markov().fit(data, seed=0)
    runs = [run.partition("=")[::2] for run in args.run]
    if any(not label or not path for label, path in runs):
        parser.error("--run takes LABEL=CHECKPOINT, e.g. --run 1=runs/seed1/denoiser.pt")
    evaluate = dict(ks=(10, 20), batch_size=spec.pretrain.eval_batch_size,
                    sampling_seeds=range(seeds))
    rows, valid, tests = [], {w: [] for w in weights}, []
    for label, checkpoint in runs:
        model, _ = spec.load_backbone(checkpoint, data.n_items)
        results: dict[float, dict] = {w: {} for w in weights}
        with eval_mode(model):
            for split in ("valid", "test"):  # a cache per split: both number their rows from 0
                final_states = SampledFinalStates(model)
                for w in weights:
                    blend = TransitionBlend(final_states, markov, w, args.tau)
                    results[w] |= evaluate_sequential(blend, data, splits=(split,), **evaluate)
        for w, result in results.items():
            valid[w].append(result["valid"]["ndcg@20"])
            rows.append(f"| {label} | {w:g} | "
                        + " | ".join(f"{result['valid'][m]:.4f}" for m in METRICS) + " |")
        tests.append((label, results))
    chosen = max(weights, key=lambda w: (sum(valid[w]), -w))  # a tie keeps the smaller weight
    lines = [
        f"Checkpoints: {', '.join(f'{label} = `{path}`' for label, path in runs)}. Backbone "
        f"softmax at tau {args.tau:g}; the Markov peer at smoothing {markov.smoothing:g} "
        f"(its normalised scores); validation and test over {seeds} sampling "
        f"seed{'s' if seeds > 1 else ''}, each weight on the same x_0.", "",
        "| run | weight w | " + " | ".join(f"valid {m}" for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS), *rows, "",
        "Mean validation NDCG@20 over the runs, by weight:", "",
        "| w | " + " | ".join(f"{w:g}" for w in weights) + " |",
        "|---|" + "---|" * len(weights),
        "| valid ndcg@20 | " + " | ".join(mean_std(valid[w]) for w in weights) + " |", "",
        f"Chosen on validation: w = {chosen:g}. Test (never used to choose):", "",
        f"| run | test hr@10, w = 0 | test ndcg@20, w = 0 | test hr@10, w = {chosen:g} | "
        f"test ndcg@20, w = {chosen:g} |", "|---|---|---|---|---|",
        *(f"| {label} | " + " | ".join(f"{results[w]['test'][m]:.4f}" for w in (0.0, chosen)
                                       for m in ("hr@10", "ndcg@20")) + " |"
          for label, results in tests),
        "| mean | " + " | ".join(mean_std([results[w]["test"][m] for _, results in tests])
                                for w in (0.0, chosen) for m in ("hr@10", "ndcg@20")) + " |",
    ]
    write_result(args.name or f"transition_blend_{args.env}",
                 f"The backbone blended with the transition graph, {args.env}", lines)


if __name__ == "__main__":
    main()
