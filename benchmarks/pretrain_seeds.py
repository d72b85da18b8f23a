"""Pretrain the backbone over seeds with `refit-gym pretrain`; tabulate the best checkpoints.

    REFIT_DATA_DIR=../shared/data python benchmarks/pretrain_seeds.py --env ReFiT-ML1M-v0 \
        --seeds 1,2,3 --out runs/pretrain
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import write_result

from refit_gym.cli import main as refit_gym

KEYS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default="runs/pretrain")
    args = parser.parse_args()
    rows, results = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = Path(args.out) / f"{args.env}-seed{seed}"
        code = refit_gym(["pretrain", "--env", args.env, "--seed", str(seed), "--out", str(out),
                          "--quiet"])
        if code:
            raise SystemExit(code)
        result = json.loads((out / "metrics.json").read_text())
        results.append(result)
        rows.append(f"| {seed} | {result['best_epoch']} / {result['epochs']} | "
                    + " | ".join(f"{result['test'][k]:.4f}" for k in KEYS)
                    + f" | {result['valid']['recall@20']:.4f} | {result['wall_time_s']:.0f} |")
    means = {k: statistics.mean(r["test"][k] for r in results) for k in KEYS}
    spread = {k: statistics.pstdev(r["test"][k] for r in results) for k in KEYS}
    write_result(f"pretrain_{args.env}", f"Pretraining the DiffRec backbone, {args.env}", [
        "Selection by validation Recall@20 (every 5 epochs, patience 20); test reported.", "",
        "| seed | best / last epoch | test recall@10 | test recall@20 | test ndcg@10 "
        "| test ndcg@20 | valid recall@20 | wall s |",
        "|---|---|---|---|---|---|---|---|", *rows,
        "| mean ± std | | " + " | ".join(f"{means[k]:.4f} ± {spread[k]:.4f}" for k in KEYS)
        + " | | |",
        "", "DiffRec's own public code on this kind of machine, seed 1 (../shared/data/README.md):"
        " test recall@10 0.1007, recall@20 0.1697, ndcg@10 0.0862, ndcg@20 0.1094.",
    ])


if __name__ == "__main__":
    main()
