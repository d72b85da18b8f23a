"""Where the chain stops: a sequential backbone's validation ranking and chain influence when its
reverse chain stops at network timestep s and returns the denoiser's x_0 prediction there (the
environments' ``stop_step``; s = 0 runs the whole chain). No weights change.

A chain that decides ranks a top-20 list from one sampled state, near one item; stopped at s, the
ranked x_0 is the denoiser's prediction from the noisier x_s, closer to a mean over the items
still likely, and the chain decides less. The stop is chosen on validation: the highest mean
validation NDCG@20 over the runs given (one rule, :class:`~refit_gym.training.selection.Selector`:
strictly higher wins, so the earliest stop of equals), then test is reported for each run at the
chosen stop and at 0. Metrics: the spec's evaluation protocol (every row, all items ranked,
``final_sampling_seeds`` sampling seeds); chain influence: benchmarks/chain_influence.py's, on the
same fixed validation rows. From benchmarks/, one model per seed (every run of one call is
selected together):

    REFIT_DATA_DIR=../shared/data python chain_stop.py --env ReFiT-Beauty-Concat-v0 \\
        --stops 0,4,8,12,16,20,24,28,31 --every-step \\
        --run 1=../runs/bench/seed1/pretrain/denoiser.pt \\
        --run 2=../runs/bench/seed2/pretrain/denoiser.pt
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, mean_std, sequential_id, write_result

from refit_gym.backbones import load_backbone
from refit_gym.data import SequenceData
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.specs import EnvSpec
from refit_gym.training.chain_influence import chain_influence_report
from refit_gym.training.chain_stop import stopped_chain
from refit_gym.training.metrics import eval_mode, evaluate
from refit_gym.training.selection import Selector


def parse_stops(text: str) -> list[int]:
    """The stop steps of ``--stops``, ascending and distinct."""
    try:
        return sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise SystemExit(f"--stops takes comma-separated integers, got {text!r}") from None


@dataclass
class StopStudy:
    """Per stop s, the validation NDCG@20 of every run (in ``--run`` order) and the report's
    rows; the stop chosen on their mean; each run's test at s = 0 and at the chosen stop."""

    valid: dict[int, list[float]]
    rows: list[str]
    chosen: int
    tests: list[tuple[str, dict, dict]]


def study(spec: EnvSpec, data: SequenceData, runs: list[tuple[str, str]], stops: list[int], *,
          rows: int = 256, trajectories: int = 16, every_step: bool = False) -> StopStudy:
    """Every run at every stop, on the id's K-step chain (at most the T - s steps above the
    stop) or, ``every_step``, on every trained step from T - 1 down to the stop; refuses a stop
    the chain cannot take before any work."""
    try:
        chains = {stop: stopped_chain(spec, stop, steps=spec.diffusion.steps - stop
                                      if every_step else None) for stop in sorted({0, *stops})}
    except ValueError as err:
        raise SystemExit(f"--stops: {err}") from None
    tau = float(EnvSettings.resolve(spec, {}).reward_params.get("tau", 1.0))
    valid: dict[int, list[float]] = {stop: [] for stop in stops}
    lines, models = [], {}
    for label, path in runs:
        model, _ = load_backbone(path, data.n_items)
        models[label] = model
        for stop in stops:
            with eval_mode(model):
                metrics = evaluate(model, data, spec.pretrain, chain=chains[stop],
                                   splits=("valid",))
            own, policy = chain_influence_report(model, data, chains[stop], rows=rows,
                                                 trajectories=trajectories, tau=tau)
            valid[stop].append(metrics["valid"]["ndcg@20"])
            lines.append(f"| {label} | {stop} | {chains[stop].steps} | "
                         f"{metrics['valid']['hr@10']:.4f} | {metrics['valid']['ndcg@20']:.4f} | "
                         f"{own.within_share:.2e} | {policy.within_share:.2e} | "
                         f"{own.overlap_within:.4f} | {own.hit_disagreement:.4f} |")
            print(lines[-1], flush=True)
    selector = Selector("ndcg@20")
    for stop in stops:
        selector.offer(stop, {"valid": {"ndcg@20": statistics.mean(valid[stop])}})
    chosen = selector.best_epoch
    if chosen is None:
        raise SystemExit("every stop scored NaN on validation: nothing to choose")
    tests = []
    for label, model in models.items():
        with eval_mode(model):
            scored = {stop: evaluate(model, data, spec.pretrain, chain=chains[stop],
                                     splits=("test",)) for stop in {0, chosen}}
        tests.append((label, scored[0], scored[chosen]))
    return StopStudy(valid, lines, chosen, tests)


def report(spec: EnvSpec, runs: list[tuple[str, str]], stops: list[int], result: StopStudy,
           rows: int, trajectories: int) -> list[str]:
    chosen = result.chosen
    return [
        f"Checkpoints: {', '.join(f'{label} = `{path}`' for label, path in runs)}.", "",
        "Per run and stop s: validation metrics over the spec's "
        f"{spec.pretrain.final_sampling_seeds} sampling seeds; the chain's share of the reward's "
        "variance within a row under the backbone's own sampler and the agents' policy "
        "(kappa 1), the top-20 overlap of two trajectories of a row and the rows whose hit@20 "
        f"differs between trajectories (own sampler; {rows} validation rows x {trajectories} "
        "trajectories).", "",
        "| run | stop s | chain steps | valid hr@10 | valid ndcg@20 | within share (own) | "
        "within share (policy) | top-20 overlap in a row | rows whose hit@20 differs |",
        "|---|---|---|---|---|---|---|---|---|", *result.rows, "",
        "Mean validation NDCG@20 over the runs, by stop:", "",
        "| stop s | " + " | ".join(str(s) for s in stops) + " |",
        "|---|" + "---|" * len(stops),
        "| valid ndcg@20 | " + " | ".join(mean_std(result.valid[s]) for s in stops) + " |", "",
        f"Chosen on validation: s = {chosen}. Test (never used to choose), the whole chain "
        "against the chosen stop:", "",
        f"| run | test hr@10, s = 0 | test ndcg@20, s = 0 | test hr@10, s = {chosen} | "
        f"test ndcg@20, s = {chosen} |", "|---|---|---|---|---|",
        *(f"| {label} | {whole['test']['hr@10']:.4f} | {whole['test']['ndcg@20']:.4f} | "
          f"{stopped['test']['hr@10']:.4f} | {stopped['test']['ndcg@20']:.4f} |"
          for label, whole, stopped in result.tests),
        "| mean | " + " | ".join(mean_std([t[i]["test"][m] for t in result.tests])
                                for i in (1, 2) for m in ("hr@10", "ndcg@20")) + " |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True, help="a sequential id")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CHECKPOINT",
                        help="a backbone of the id, e.g. its seed and checkpoint")
    parser.add_argument("--stops", default="0,4,8,12,16,20,24,28,31")
    parser.add_argument("--rows", type=int, default=256, help="chain influence's validation rows")
    parser.add_argument("--trajectories", type=int, default=16, help="draws per row")
    parser.add_argument("--every-step", action="store_true",
                        help="K = T - s: every trained step down to the stop (default: the "
                             "id's K, at most T - s)")
    parser.add_argument("--name", default=None, help="report name (default chain_stop_<env>)")
    parser.add_argument("--folder", type=Path, default=RESULTS)
    args = parser.parse_args()
    spec, data = sequential_id(args.env)
    stops = parse_stops(args.stops)
    runs = [(label, path) for label, _, path in (run.partition("=") for run in args.run)]
    if any(not label or not path for label, path in runs):
        parser.error("--run takes LABEL=CHECKPOINT")
    for _, path in runs:
        if not Path(path).is_file():
            raise SystemExit(f"no checkpoint at {path}: pretrain or fine-tune it first")
    result = study(spec, data, runs, stops, rows=args.rows, trajectories=args.trajectories,
                   every_step=args.every_step)
    write_result(args.name or f"chain_stop_{spec.id}", f"Where the chain stops, {spec.id}",
                 report(spec, runs, stops, result, args.rows, args.trajectories), args.folder)


if __name__ == "__main__":
    main()
