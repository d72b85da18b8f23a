"""Per seed and algorithm, what a bench folder's fine-tuning did: its selection passes, the
optimiser's own check and what was selected, as a markdown table on standard output.

    python benchmarks/bench_details.py runs/bench-beauty-v1/results.json

Columns: epochs run (training seconds); validation NDCG@20 of each selection pass (the first is
the start); the fixed-episode reward (the reward of the backbone's own chain on fixed training
episodes: the optimiser's own objective), start -> last; the selected pass (0: the start);
test HR@20 (Recall@20 for CF) and NDCG@20 of the selected model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def details(results: dict) -> list[str]:
    """The table's lines for a bench's ``results.json`` payload."""
    cells = results["cells"]
    hits = next(k for k in next(iter(cells.values()))[0]["test"]
                if k.endswith("@20") and not k.startswith("ndcg"))
    lines = ["| seed | algo | epochs (training s) | valid ndcg@20 per selection pass | "
             "fixed reward, start -> last | selected pass | "
             f"test {hits} / ndcg@20 |", "|---|---|---|---|---|---|---|"]
    for algo, runs in cells.items():
        for seed, run in zip(results["seeds"], runs):
            history = run.get("history") or []
            if not history:  # the pretrained backbone and the peers select no pass
                continue
            passes = ", ".join(f"{h['valid']['ndcg@20']:.5f}" for h in history)
            fixed = [h["fixed_reward"] for h in history if h.get("fixed_reward") is not None]
            check = f"{fixed[0]:.3f} -> {fixed[-1]:.3f}" if fixed else ""
            lines.append(
                f"| {seed} | {algo} | {history[-1]['epoch']} ({history[-1]['elapsed']:.0f}) | "
                f"{passes} | {check} | {run['selection']['best_epoch']} | "
                f"{run['test'][hits]:.4f} / {run['test']['ndcg@20']:.5f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, help="a bench folder's results.json")
    print("\n".join(details(json.loads(parser.parse_args().results.read_text()))))


if __name__ == "__main__":
    main()
