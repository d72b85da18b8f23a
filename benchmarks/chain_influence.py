"""Chain influence of sequential backbones: does the denoising chain's randomness move the
outcome a policy gradient learns from? (refit_gym.training.chain_influence)

For each ``--run ID=CHECKPOINT``: the same fixed validation rows of the id's data,
``--trajectories`` draws each of the backbone's own sampler and of the agents' Gaussian policy
(kappa 1) on the chain its environment uses, the reward being the target's log-likelihood under
softmax(x_0 E^T / tau) with the id's tau. One table for all runs:

    REFIT_DATA_DIR=../shared/data python benchmarks/chain_influence.py \\
        --run ReFiT-SeqSynthetic-v0=runs/ReFiT-SeqSynthetic-v0/pretrain-seed1/denoiser.pt \\
        --run ReFiT-SeqSynthetic-v1=runs/ReFiT-SeqSynthetic-v1/pretrain-seed1/denoiser.pt
"""

from __future__ import annotations

import argparse

from common import write_result

from refit_gym.backbones import load_backbone
from refit_gym.data import SequenceData
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.specs import load_env_spec, register_spec_file
from refit_gym.training.chain_influence import ChainInfluence, chain_influence_report

COLUMNS = ("id", "backbone", "lambda", "chain steps", "sampler", "reward mean",
           "within-row std", "between-row std", "within share", "top-20 overlap in a row",
           "between rows", "rows whose hit@20 differs")


def _row(env_id: str, backbone: str, scale: str, steps: int, ci: ChainInfluence) -> str:
    cells = [env_id, backbone, scale, str(steps), ci.sampler, f"{ci.reward_mean:.3f}",
             f"{ci.reward_within_std:.4g}", f"{ci.reward_between_std:.3f}",
             f"{ci.within_share:.2e}", f"{ci.overlap_within:.4f}", f"{ci.overlap_between:.4f}",
             f"{ci.hit_disagreement:.4f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="ID=CHECKPOINT")
    parser.add_argument("--spec", action="append", default=[], metavar="PATH",
                        help="a spec file of your own whose id a --run names")
    parser.add_argument("--rows", type=int, default=256, help="validation rows (seeded)")
    parser.add_argument("--trajectories", type=int, default=16, help="draws per row")
    parser.add_argument("--name", default="chain_influence")
    args = parser.parse_args()
    for path in args.spec:
        register_spec_file(path)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in args.run:
        env_id, _, checkpoint = run.partition("=")
        spec = load_env_spec(env_id)
        data = cached_dataset(env_id)
        if not isinstance(data, SequenceData):
            raise SystemExit(f"{env_id} is not a sequential id: chain influence is measured on "
                             "the next-item scenario's sampled chains")
        settings = EnvSettings.resolve(spec, {"checkpoint": checkpoint, "device": "cpu"})
        model, _ = load_backbone(checkpoint, data.n_items)
        chain = settings.chain(spec)
        tau = float(settings.reward_params.get("tau", 1.0))
        scale = str(model.config.state_scale) if model.name == "adrec" else "concatenated"
        for ci in chain_influence_report(model, data, chain, rows=args.rows,
                                         trajectories=args.trajectories, tau=tau):
            lines.append(_row(env_id, model.name, scale, chain.steps, ci))
    lines += ["", "Per run: the same seeded validation rows, each drawn `--trajectories` times "
              "in one batch; reward = log softmax(x_0 E^T / tau)[target] with the id's tau. "
              "*within share* = mean within-row variance / (within + between-row variance), "
              "sample variances (n - 1). *backbone*: the backbone's own sampler (noise at every "
              "step but the last); *policy*: the agents' Gaussian policy with kappa 1 (noise at "
              "every step, the last one included). *lambda*: the scale at which ADRec's "
              "decoder reads x_t (DreamRec and ADRec-Concat concatenate x_t with the condition)."]
    write_result(args.name, "Chain influence of sequential backbones", lines)


if __name__ == "__main__":
    main()
