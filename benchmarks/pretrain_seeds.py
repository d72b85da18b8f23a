"""Pretrain an id's backbone over seeds with `refit-gym pretrain`; tabulate the selected models.

A seed whose run folder already holds ``metrics.json`` is reused, not retrained. For a
stochastic backbone (DreamRec, ADRec) the table gives the spread over sampling seeds, test split by
whether the target was ever a training target, and the same models under respaced K-step chains.

    REFIT_DATA_DIR=../shared/data python benchmarks/pretrain_seeds.py --env ReFiT-ML1M-v0 \
        --seeds 1,2,3 --out runs/pretrain
    REFIT_DATA_DIR=../shared/data python benchmarks/pretrain_seeds.py --env ReFiT-Zhihu-v0 \
        --seeds 1,2,3 --out runs/pretrain --respaced 20,50

``--max-epochs N`` caps the epochs at N instead of the spec's (a reused run must have been made
with the same cap); ``--curve`` adds each seed's validation at every selection pass, to see
whether a cap binds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import mean_std, write_result

from refit_gym.backbones import BACKBONES, load_backbone
from refit_gym.cli import main as refit_gym
from refit_gym.data import load_dataset
from refit_gym.specs import EnvSpec, load_env_spec
from refit_gym.training.identity import spec_digest
from refit_gym.training.metrics import evaluate_sequential

# Reference figures of the backbone's own code (../shared/data/README.md), in the table's units.
REFERENCES = {
    "ReFiT-ML1M-v0": "DiffRec's own public code on this kind of machine, seed 1: test "
                     "recall@10 0.1007, recall@20 0.1697, ndcg@10 0.0862, ndcg@20 0.1094.",
    "ReFiT-Zhihu-v0": "DreamRec's own code on this kind of machine (README settings, epoch by "
                      "validation): test hr@20 0.0195, ndcg@20 0.0067; its paper, as recalled: "
                      "0.0226 / 0.0079; most-popular hr@20 0.0143.",
    "ReFiT-Beauty-v0": "DiffuRec's Table 2 as transcribed by a third party (not verified): "
                       "hr@10 / ndcg@10 DiffuRec 0.0791 / 0.0475, SASRec 0.0626 / 0.0323.",
}
REFERENCES["ReFiT-Beauty-v1"] = (
    REFERENCES["ReFiT-Beauty-v0"] + " On this split with this project's metric code, SASRec "
    "over seeds 1-3 (bench_ReFiT-Beauty-v1.md): test hr@10 0.0649 ± 0.0006, ndcg@10 0.0317 ± "
    "0.0007, hr@20 0.0942 ± 0.0006, ndcg@20 0.0391 ± 0.0006 (sample std); DreamRec (v0, "
    "bench_ReFiT-Beauty-v0.md) test hr@10 0.0012.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default="runs/pretrain")
    parser.add_argument("--respaced", default="",
                        help="comma-separated K: also evaluate each model on a K-step chain")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap on epochs (default: the spec's)")
    parser.add_argument("--curve", action="store_true",
                        help="also tabulate validation at every selection pass")
    parser.add_argument("--name", default="",
                        help="suffix of the report's name (pretrain_<env><name>.md)")
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    config = spec.pretrain
    cap = config.max_epochs if args.max_epochs is None else args.max_epochs
    if cap < 1:
        raise SystemExit(f"--max-epochs must be at least 1, got {cap}")
    capped = str(cap) if cap == config.max_epochs else f"{cap}, not the spec's {config.max_epochs}"
    sampled = BACKBONES[spec.backbone_type][0].stochastic_inference  # the next-item backbones
    names = ("hr", "ndcg") if sampled else ("recall", "ndcg")
    keys = [f"{n}@{k}" for n in names for k in config.ks]
    seeds = [int(s) for s in args.seeds.split(",")]
    results, rows, outs = [], [], []
    for seed in seeds:
        out = Path(args.out) / f"{args.env}-seed{seed}"
        if not (out / "metrics.json").is_file():
            code = refit_gym(["pretrain", "--env", args.env, "--seed", str(seed), "--out",
                              str(out), "--max-epochs", str(cap), "--quiet"])
            if code:
                raise SystemExit(code)
        result = json.loads((out / "metrics.json").read_text())
        made_with = cap_of(result, spec)
        if made_with != cap:
            raise SystemExit(f"{out} was pretrained with at most {made_with} epochs, not "
                             f"{cap}: pass --max-epochs {made_with}, or another --out"
                             if made_with else
                             f"{out} was pretrained under another version of {args.env}'s "
                             "spec, whose epoch cap this one may not share: pass another --out")
        results.append(result)
        outs.append(out)
        rows.append(f"| {seed} | {result['best_epoch']} / {result['epochs']} | "
                    + " | ".join(f"{result['test'][k]:.4f}" for k in keys)
                    + f" | {result['valid'][config.selection_metric]:.4f} "
                    f"| {result['wall_time_s']:.0f} |")
    lines = [
        f"Backbone {spec.backbone_type}; selection by validation {config.selection_metric} "
        f"(every {config.eval_every} epochs, patience {config.patience}, at most "
        f"{capped}); test reported, never used.", "",
        "| seed | best / last epoch | " + " | ".join(f"test {k}" for k in keys)
        + f" | valid {config.selection_metric} | wall s |",
        "|---" * (len(keys) + 4) + "|", *rows,
        "| mean ± std over seeds | | " + " | ".join(mean_std([r["test"][k] for r in results])
                                                 for k in keys) + " | | |", ""]
    if sampled:
        steps = spec.diffusion.steps
        guidance = (f", guidance w = {spec.backbone['guidance']}" if "guidance" in spec.backbone
                    else "")
        chain = (f"a respaced {config.selection_steps}-step chain" if config.selection_steps
                 else f"the backbone's own {steps}-step sampler")
        lines += [
            f"Sequential protocol: every row, all items ranked, nothing masked. Selection passes "
            f"ran {chain}, {config.selection_sampling_seeds} sampling seed; the selected model "
            f"is evaluated with {spec.backbone_type}'s own sampler (all {steps} steps{guidance}) "
            f"over {config.final_sampling_seeds} sampling seeds, whose spread (sample std of "
            "the per-seed means) is below.", "",
            "| seed | sampling std of test " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
            *(f"| {s} | " + " | ".join(f"{r['test_std'][k]:.4f}" for k in keys) + " |"
              for s, r in zip(seeds, results)), "",
            "Test split by whether the row's target was ever a training target "
            "(mean over seeds):", "",
            "| rows | count | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for part in ("seen", "unseen"):
            block = [r[f"test_{part}"] for r in results]
            lines.append(f"| target {'in' if part == 'seen' else 'never in'} train | "
                         f"{block[0]['rows']} | "
                         + " | ".join(f"{statistics.mean(b[k] for b in block):.4f}"
                                      for k in keys) + " |")
        lines.append("")
        if args.respaced:
            data = load_dataset(spec.dataset)
            lines += ["The same models under respaced K-step chains (exact posterior variances "
                      f"on the subsequence), {config.final_sampling_seeds} sampling seeds, "
                      "mean ± std over training seeds:", "",
                      "| chain | " + " | ".join(f"test {k}" for k in keys) + " |",
                      "|---" * (len(keys) + 1) + "|",
                      f"| {steps} steps (own sampler) | "
                      + " | ".join(mean_std([r["test"][k] for r in results]) for k in keys)
                      + " |"]
            for k_steps in (int(k) for k in args.respaced.split(",")):
                runs = []
                for out in outs:
                    model, _ = load_backbone(out / "denoiser.pt", data.n_items)
                    runs.append(evaluate_sequential(
                        model, data, ks=config.ks, batch_size=config.eval_batch_size,
                        chain=model.diffusion.respaced(k_steps),
                        sampling_seeds=range(config.final_sampling_seeds), splits=("test",)))
                lines.append(f"| {k_steps} steps | "
                             + " | ".join(mean_std([r["test"][k] for r in runs]) for k in keys)
                             + " |")
            lines.append("")
    if args.curve:
        lines += selection_curve(results, seeds, config.selection_metric)
    if args.env in REFERENCES:
        lines.append(REFERENCES[args.env])
    write_result(f"pretrain_{args.env}{args.name}", f"Pretraining the {spec.backbone_type} "
                 f"backbone, {args.env}", lines)


def cap_of(result: dict, spec: EnvSpec) -> int | None:
    """The epoch cap a pretraining run was made under, from its recorded identity: a cap it
    names, else the spec's when the run's spec digest is this spec's (with or without [env], as
    earlier versions recorded it); None when neither says."""
    identity = result.get("identity", {})
    if identity.get("max_epochs") is not None:
        return identity["max_epochs"]
    if identity.get("spec") in (spec_digest(spec), spec_digest(spec, without=("env",))):
        return spec.pretrain.max_epochs
    return None


def selection_curve(results: list[dict], seeds: list[int], metric: str) -> list[str]:
    """Validation ``metric`` and NDCG@20 at every selection pass, a column per seed; the best
    pass of each seed is in bold."""
    passes = sorted({h["epoch"] for r in results for h in r["history"]})
    by_epoch = [{h["epoch"]: h["valid"] for h in r["history"]} for r in results]
    lines = [f"Validation at every selection pass ({metric} / ndcg@20; bold: the selected):", "",
             "| epoch | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (len(seeds) + 1) + "|"]
    for epoch in passes:
        cells = []
        for result, valid in zip(results, by_epoch):
            if epoch not in valid:
                cells.append("")
                continue
            cell = f"{valid[epoch][metric]:.4f} / {valid[epoch]['ndcg@20']:.4f}"
            cells.append(f"**{cell}**" if epoch == result["best_epoch"] else cell)
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
