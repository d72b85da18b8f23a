"""The reward study: which reward (and, for CF, holdout and hops) makes ReFiT improve
*validation* NDCG@20.

Each configuration fine-tunes the same pretrained backbone with the ReFiT agent (same seed and
hyperparameters) and is judged by validation metrics only; test is not looked at here. The
fixed-episode column is the optimiser's own check (its reward on fixed training episodes).
Runs are resumable and reused: rerunning skips finished configurations.

    REFIT_DATA_DIR=../shared/data python benchmarks/reward_study.py --env ReFiT-ML1M-v0 \
        --checkpoint runs/pretrain/ReFiT-ML1M-v0-seed1/denoiser.pt --epochs 1 \
        --users-per-epoch 1536 --out runs/reward_study
    REFIT_DATA_DIR=../shared/data python benchmarks/reward_study.py --env ReFiT-Zhihu-v0 \
        --checkpoint runs/pretrain/ReFiT-Zhihu-v0-seed1/denoiser.pt --epochs 1 \
        --users-per-epoch 6400 --out runs/reward_study_zhihu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_result

from refit_gym.cli import parse_sets
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import check_agent_hyperparams, load_env_spec
from refit_gym.training.finetune import finetune

LOWRANK = {"propagation": "lowrank", "rank": 256}
CF_CONFIGS: dict[str, dict] = {
    "collab a=0.5, whole history": {
        "reward": "collaborative", "reward_params": {"alphas": [0.5], "tau": 0.05, **LOWRANK}},
    "log-lik (a=0), holdout 0.2, excl.": {
        "reward": "collaborative", "holdout_fraction": 0.2,
        "reward_params": {"alphas": [], "tau": 0.05, "exclude_history": True}},
    "collab a=0.5, holdout 0.2, excl.": {
        "reward": "collaborative", "holdout_fraction": 0.2,
        "reward_params": {"alphas": [0.5], "tau": 0.05, "exclude_history": True, **LOWRANK}},
    "collab K=2 a=[0.5,0.25], holdout 0.2, excl.": {
        "reward": "collaborative", "holdout_fraction": 0.2,
        "reward_params": {"alphas": [0.5, 0.25], "tau": 0.05, "exclude_history": True,
                          **LOWRANK}},
    "hit@20, holdout 0.2": {"reward": "hit", "holdout_fraction": 0.2,
                            "reward_params": {"k": 20}},
    "ndcg@20, holdout 0.2": {"reward": "ndcg", "holdout_fraction": 0.2,
                             "reward_params": {"k": 20}},
    "graded ndcg@20 a=0.3, holdout 0.2": {
        "reward": "ndcg", "holdout_fraction": 0.2,
        "reward_params": {"k": 20, "alphas": [0.3], **LOWRANK}},
    "neg. MSE to history": {"reward": "neg_mse", "reward_params": {}},
    # The temporal holdout hides each user's latest interactions, as validation and test do.
    "hit@20, temporal holdout 0.2": {"reward": "hit", "holdout_fraction": 0.2,
                                     "holdout": "temporal", "reward_params": {"k": 20}},
    "ndcg@20, temporal holdout 0.2": {"reward": "ndcg", "holdout_fraction": 0.2,
                                      "holdout": "temporal", "reward_params": {"k": 20}},
    "graded ndcg@20 a=0.3, temporal holdout 0.2": {
        "reward": "ndcg", "holdout_fraction": 0.2, "holdout": "temporal",
        "reward_params": {"k": 20, "alphas": [0.3], **LOWRANK}},
    "log-lik (a=0), temporal holdout 0.2, excl.": {
        "reward": "collaborative", "holdout_fraction": 0.2, "holdout": "temporal",
        "reward_params": {"alphas": [], "tau": 0.05, "exclude_history": True}},
}
TRANSITIONS = {"alphas": [0.5], "propagation": "exact"}  # one hop of the item-transition graph
SEQ_CONFIGS: dict[str, dict] = {
    # alphas [] explicitly: otherwise a spec whose default is the collaborative reward lends
    # its own hops to these (parameters of the same reward merge).
    "log-lik of the next item, tau 0.1": {
        "reward": "collaborative", "reward_params": {"tau": 0.1, "alphas": []}},
    "log-lik of the next item, tau 1": {
        "reward": "collaborative", "reward_params": {"tau": 1.0, "alphas": []}},
    "collab a=0.5 transitions, tau 0.1": {
        "reward": "collaborative", "reward_params": {"tau": 0.1, **TRANSITIONS}},
    "hit@20": {"reward": "hit", "reward_params": {"k": 20}},
    "ndcg@20": {"reward": "ndcg", "reward_params": {"k": 20}},
    "graded ndcg@20 a=0.5 transitions": {
        "reward": "ndcg", "reward_params": {"k": 20, **TRANSITIONS}},
    "neg. MSE to E[target] (DreamRec's loss)": {"reward": "neg_mse", "reward_params": {}},
    # Appended, so the numbers of the committed reports' --only still name the same configs.
    "log-lik of the next item, tau 10": {
        "reward": "collaborative", "reward_params": {"tau": 10.0, "alphas": []}},
    # p = (1 - w) e_target + w q(. | last history item), w = beta / (1 + beta): the first-order
    # next-item distribution mixed into the target (transition_blend.py mixes the backbone's
    # own softmax with the Markov peer, q plus popularity smoothing, with no training).
    **{f"log-lik + w={w:g} transitions of the last item, tau {tau:g}": {
        "reward": "collaborative",
        "reward_params": {"tau": tau, "alphas": [], "transition_weight": w / (1 - w)}}
       for tau in (1.0, 0.1) for w in (0.2, 0.5)},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="runs/reward_study")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--users-per-epoch", type=int, default=0, help="0: all users")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated config numbers (1-based)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the id's ReFiT hyperparameters (repeatable)")
    parser.add_argument("--name", default=None,
                        help="the report's name under results/ (default reward_study_<id>)")
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    overrides = parse_sets(args.set)
    check_agent_hyperparams("refit", overrides, "--set")  # before any run starts
    if owned := sorted({"epochs", "users_per_epoch"} & set(overrides)):
        raise SystemExit(f"--set {owned}: set them with --epochs / --users-per-epoch")
    data = cached_dataset(spec.id, None)
    sequential = spec.sequential
    configs = list((SEQ_CONFIGS if sequential else CF_CONFIGS).items())
    hits = "hr@20" if sequential else "recall@20"
    numbers = [int(i) for i in args.only.split(",")] if args.only else range(1, len(configs) + 1)
    rows = []
    for number in numbers:
        name, env_kwargs = configs[number - 1]
        out = Path(args.out) / f"config{number}"
        budget = {**overrides, "epochs": args.epochs, "users_per_epoch": args.users_per_epoch}
        result = finetune(spec, data, args.checkpoint, "refit", out, seed=args.seed,
                          hyperparams=budget, env_kwargs=env_kwargs, progress=False)
        start, last = result["history"][0], result["history"][-1]
        delta = last["valid"]["ndcg@20"] / start["valid"]["ndcg@20"] - 1
        rewards = [h["train_reward"] for h in result["history"][1:]]
        best = max(result["history"], key=lambda h: h["valid"]["ndcg@20"])
        rows.append(
            f"| {number} | {name} | {rewards[0]:.4f} → {rewards[-1]:.4f} | "
            f"{start['fixed_reward']:.4f} → {last['fixed_reward']:.4f} | "
            f"{start['valid']['ndcg@20']:.4f} → {last['valid']['ndcg@20']:.4f} ({delta:+.1%}) "
            f"| {best['valid']['ndcg@20']:.4f} ({best['epoch']}) "
            f"| {start['valid'][hits]:.4f} → {last['valid'][hits]:.4f} | "
            f"{result['wall_time_s']:.0f} |")
        print(rows[-1], flush=True)
        (out / "config.json").write_text(json.dumps(env_kwargs, indent=2))
    write_result(args.name or f"reward_study_{spec.id}",
                 f"Reward study, {spec.id} (validation only)", [
        f"ReFiT agent, agents/refit.toml defaults for {spec.id} except epochs={args.epochs}, "
        f"users_per_epoch={args.users_per_epoch or data.n_train_rows}"
        + "".join(f", {key}={value}" for key, value in overrides.items()) + "; "
        f"seed {args.seed}; backbone `{args.checkpoint}`. Columns: mean training reward of the "
        "first → last epoch; the reward of the backbone's own chain on 256 fixed training "
        f"episodes, start → last epoch; validation NDCG@20 of the pretrained start → the last "
        "epoch, and its best selection pass (epoch; 0 is the start), and validation "
        f"{hits} (a stochastic backbone: on the tuned chain, "
        f"{spec.pretrain.selection_sampling_seeds} sampling seed); training seconds. Test "
        "metrics are not used here.", "",
        f"| # | reward | train reward | fixed episodes | valid ndcg@20 | best valid ndcg@20 "
        f"(epoch) | valid {hits} | s |",
        "|---|---|---|---|---|---|---|---|", *rows,
    ])


if __name__ == "__main__":
    main()
