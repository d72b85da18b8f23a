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
from pathlib import Path

from common import RESULTS, sequential_id, write_result

from refit_gym.backbones import Backbone, load_backbone
from refit_gym.data import SequenceData
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.specs import EnvSpec, register_spec_file
from refit_gym.training.chain_influence import chain_influence_report

COLUMNS = ("id", "backbone", "lambda", "chain steps", "sampler", "reward mean",
           "within-row std", "between-row std", "within share", "top-20 overlap in a row",
           "between rows", "rows whose hit@20 differs")


def table_header(setting: str = "lambda", extra: tuple[str, ...] = ()) -> list[str]:
    """The table's two header lines; ``setting`` names the third column."""
    columns = (*COLUMNS[:2], setting, *COLUMNS[3:], *extra)
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def backbone_on_chain(spec: EnvSpec, data: SequenceData, checkpoint: str | Path
                      ) -> tuple[Backbone, GaussianDiffusion, float]:
    """The backbone at ``checkpoint``, the chain of ``spec``'s environment (on the CPU) and
    its reward's tau: what the environment's episodes would run and score."""
    settings = EnvSettings.resolve(spec, {"checkpoint": str(checkpoint), "device": "cpu"})
    model, _ = load_backbone(checkpoint, data.n_items)
    return model, settings.chain(spec), float(settings.reward_params.get("tau", 1.0))


def influence_rows(spec: EnvSpec, data: SequenceData, checkpoint: str | Path, setting: str | None,
                   *, rows: int, trajectories: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Table rows of ``checkpoint`` on ``spec``'s chain, one per sampler. ``setting`` fills the
    third column (None: how the backbone reads x_t, ADRec's lambda or "concatenated")."""
    model, chain, tau = backbone_on_chain(spec, data, checkpoint)
    if setting is None:
        setting = f"{model.config.state_scale:g}" if model.name == "adrec" else "concatenated"
    lines = []
    for ci in chain_influence_report(model, data, chain, rows=rows, trajectories=trajectories,
                                     tau=tau):
        cells = [spec.id, model.name, setting, str(chain.steps), ci.sampler,
                 f"{ci.reward_mean:.3f}", f"{ci.reward_within_std:.4g}",
                 f"{ci.reward_between_std:.3f}", f"{ci.within_share:.2e}",
                 f"{ci.overlap_within:.4f}", f"{ci.overlap_between:.4f}",
                 f"{ci.hit_disagreement:.4f}", *extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="ID=CHECKPOINT")
    parser.add_argument("--spec", action="append", default=[], metavar="PATH",
                        help="a spec file of your own whose id a --run names")
    parser.add_argument("--rows", type=int, default=256, help="validation rows (seeded)")
    parser.add_argument("--trajectories", type=int, default=16, help="draws per row")
    parser.add_argument("--name", default="chain_influence")
    parser.add_argument("--folder", type=Path, default=RESULTS,
                        help="where <name>.md goes (default benchmarks/results)")
    args = parser.parse_args()
    for path in args.spec:
        register_spec_file(path)
    lines = table_header()
    for run in args.run:
        env_id, _, checkpoint = run.partition("=")
        spec, data = sequential_id(env_id)
        lines += influence_rows(spec, data, checkpoint, None, rows=args.rows,
                                trajectories=args.trajectories)
    lines += ["", "Per run: the same seeded validation rows, each drawn `--trajectories` times "
              "in one batch; reward = log softmax(x_0 E^T / tau)[target] with the id's tau. "
              "*within share* = mean within-row variance / (within + between-row variance), "
              "sample variances (n - 1). *backbone*: the backbone's own sampler (noise at every "
              "step but the last); *policy*: the agents' Gaussian policy with kappa 1 (noise at "
              "every step, the last one included). *lambda*: the scale at which ADRec's "
              "decoder reads x_t (DreamRec and ADRec-Concat concatenate x_t with the condition)."]
    write_result(args.name, "Chain influence of sequential backbones", lines, args.folder)


if __name__ == "__main__":
    main()
