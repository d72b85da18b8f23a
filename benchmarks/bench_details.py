"""Per seed and algorithm, what a bench folder's fine-tuning did: its selection passes, the
optimiser's own check and what was selected, as a markdown table on standard output.

    python benchmarks/bench_details.py runs/bench-beauty-v1/results.json
    python benchmarks/bench_details.py runs/bench/results.json runs/probe/lr1e-4-s*.json

Each file is a bench folder's results.json or a run's ``refit-gym finetune --json`` output;
given several, a first column names the file each row comes from.

Columns: epochs run (training seconds); validation NDCG@20 of each selection pass (the first is
the start); the fixed-episode reward (the reward of the backbone's own chain on fixed training
episodes: the optimiser's own objective), start -> last; the selected pass (0: the start);
test HR@20 (Recall@20 for CF) and NDCG@20 of the selected model. A bench with the ``stop``
baseline adds its table: validation at every stop tried, and the stop chosen.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path


def reward_text(value: float) -> str:
    """At least three decimals and four significant digits: -95.711, 0.1336, -0.0006140 (a
    fixed-episode reward runs from -100 nats on Beauty to -4e-5 on Zhihu)."""
    decimals = 3 if value == 0 else max(3, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def runs_of(results: dict) -> Iterator[tuple[int, str, dict]]:
    """(seed, algo, run) of every run a payload holds: a bench's cells, or one fine-tuning."""
    if "cells" not in results:
        yield results["seed"], results["algo"], results
        return
    for algo, runs in results["cells"].items():
        yield from ((seed, algo, run) for seed, run in zip(results["seeds"], runs))


def details(results: dict | Sequence[tuple[str, dict]]) -> list[str]:
    """The table's lines for a bench's ``results.json`` payload, or for (source, payload)
    pairs (bench payloads or fine-tuning results), each row then led by its source."""
    sources = [("", results)] if isinstance(results, dict) else list(results)
    labelled = len(sources) > 1
    rows = [(source, *run) for source, payload in sources for run in runs_of(payload)]
    hits = next(k for k in rows[0][3]["test"] if k.endswith("@20") and not k.startswith("ndcg"))
    lines = [("| source " if labelled else "") + "| seed | algo | epochs (training s) | "
             "valid ndcg@20 per selection pass | fixed reward, start -> last | selected pass | "
             f"test {hits} / ndcg@20 |", "|---" * (7 + labelled) + "|"]
    for source, seed, algo, run in rows:
        history = run.get("history") or []
        if not history:  # the pretrained backbone and the peers select no pass
            continue
        passes = ", ".join(f"{h['valid']['ndcg@20']:.5f}" for h in history)
        fixed = [h["fixed_reward"] for h in history if h.get("fixed_reward") is not None]
        check = f"{reward_text(fixed[0])} -> {reward_text(fixed[-1])}" if fixed else ""
        lines.append(
            (f"| {source} " if labelled else "")
            + f"| {seed} | {algo} | {history[-1]['epoch']} ({history[-1]['elapsed']:.0f}) | "
            f"{passes} | {check} | {run['selection']['best_epoch']} | "
            f"{run['test'][hits]:.4f} / {run['test']['ndcg@20']:.5f} |")
    return lines


def stop_details(results: dict) -> list[str]:
    """The ``stop`` cells of a bench's ``results.json`` payload: each seed's validation NDCG@20
    at every stop of the grid, the stop chosen and its chain's steps, its validation and test;
    [] if the bench has none."""
    stops = results.get("cells", {}).get("stop", [])
    if not stops:
        return []
    lines = ["| seed | valid ndcg@20 per stop s | chosen s (chain steps) | valid ndcg@20 | "
             "test hr@10 / ndcg@20 | wall s |", "|---|---|---|---|---|---|"]
    for seed, cell in zip(results["seeds"], stops):
        scan = ", ".join(f"{g['params']['stop_step']}: {g['valid']:.4f}" for g in cell["grid"])
        lines.append(f"| {seed} | {scan} | {cell['params']['stop_step']} "
                     f"({cell['params']['steps']}) | {cell['valid']['ndcg@20']:.4f} | "
                     f"{cell['test']['hr@10']:.4f} / {cell['test']['ndcg@20']:.4f} | "
                     f"{cell['wall_time_s']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+",
                        help="a bench folder's results.json or a `refit-gym finetune --json` "
                        "output (several: a column names each row's file)")
    paths = parser.parse_args().results
    payloads = [(str(path), json.loads(path.read_text())) for path in paths]
    print("\n".join(details(payloads if len(payloads) > 1 else payloads[0][1])))
    for _, payload in payloads:
        if stop := stop_details(payload):
            print("\n" + "\n".join(stop))


if __name__ == "__main__":
    main()
