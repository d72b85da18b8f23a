"""How much of the log-likelihood reward is the scale of x_0: a sequential backbone's
training-row log-likelihood log softmax(x_0 E^T / tau)[target] over a grid of tau.

Ranking by x_0 E^T does not depend on the norm of x_0, but the log-likelihood at a fixed tau
does: a backbone whose x_0 is long against E is over-confident at a small tau, and a policy
gradient on that reward can raise it by shrinking x_0 towards the flat softmax, whose value is
-log(n_items), without ranking anything better. For each ``--run ID=CHECKPOINT``, one draw of
x_0 per fixed training row (the agents' policy, kappa 1, on the id's chain):

    REFIT_DATA_DIR=../shared/data python benchmarks/reward_scale.py \\
        --run ReFiT-Beauty-Concat-v0=runs/ReFiT-Beauty-Concat-v0/pretrain-seed1/denoiser.pt
"""

from __future__ import annotations

import argparse
import math

import torch
from chain_influence import backbone_on_chain
from common import sequential_id, write_result

from refit_gym.training.chain_influence import fixed_rows, sample_final_states
from refit_gym.training.metrics import eval_mode

TAUS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


@torch.no_grad()
def log_likelihoods(env_id: str, checkpoint: str, rows: int, batch_size: int = 512
                    ) -> tuple[list[float], float, float, float]:
    """Mean target log-likelihood at each of :data:`TAUS`, the id's tau, and the mean norms
    of x_0 and of the rows of E."""
    spec, data = sequential_id(env_id)
    model, chain, tau = backbone_on_chain(spec, data, checkpoint)
    chosen = fixed_rows(data, rows, split="train")
    x0, targets = [], []
    with eval_mode(model):
        for start in range(0, len(chosen), batch_size):
            batch = data.batch("train", chosen[start : start + batch_size])
            generator = torch.Generator().manual_seed(start)
            x0.append(sample_final_states(model, batch, chain, "policy", generator))
            targets.append(batch["target"])
    x, target = torch.cat(x0), torch.cat(targets)
    scores, picked = model.scores(x), torch.arange(len(target))
    means = [torch.log_softmax(scores / t, 1)[picked, target].mean().item() for t in TAUS]
    table_norm = model.item_table().norm(dim=1).mean().item()
    return means, tau, x.norm(dim=1).mean().item(), table_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="ID=CHECKPOINT")
    parser.add_argument("--rows", type=int, default=2048, help="training rows (seeded)")
    parser.add_argument("--name", default="reward_scale")
    args = parser.parse_args()
    lines = ["| run | id's tau | mean norm of x_0 | of E's rows | -log(n_items) | "
             + " | ".join(f"tau {tau:g}" for tau in TAUS) + " | best tau |",
             "|---|---|---|---|---|" + "---|" * (len(TAUS) + 1)]
    for run in args.run:
        env_id, _, checkpoint = run.partition("=")
        means, tau, x_norm, e_norm = log_likelihoods(env_id, checkpoint, args.rows)
        n_items = sequential_id(env_id)[1].n_items
        best = TAUS[max(range(len(TAUS)), key=means.__getitem__)]
        lines.append(f"| {checkpoint} | {tau:g} | {x_norm:.2f} | {e_norm:.2f} | "
                     f"{-math.log(n_items):.2f} | " + " | ".join(f"{m:.2f}" for m in means)
                     + f" | {best:g} |")
    lines += ["", f"Mean over {args.rows} seeded training rows of log softmax(x_0 E^T / tau)"
              "[target], one x_0 per row from the agents' Gaussian policy (kappa 1) on the id's "
              "chain; *best tau*: the grid's maximum (the backbone's calibrated temperature)."]
    write_result(args.name, "Scale of the log-likelihood reward", lines)


if __name__ == "__main__":
    main()
