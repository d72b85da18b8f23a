"""Chain influence: does the randomness of a backbone's denoising chain move its outcome?

A policy gradient on the denoising MDP learns from the differences between trajectories of the
same episode. If the final state is (almost) a deterministic function of the condition, every
trajectory of a row earns the same reward and the gradient carries nothing, however good the
backbone ranks. This measures that before any agent is tuned on a backbone: for
fixed rows and M sampled trajectories each, the spread of the final reward (the target's
log-likelihood under softmax(scores / tau)) *within* a row against the spread *between* rows,
and how much two trajectories of one row agree on their top-k list against two different rows.

Two samplers are measured, because they differ exactly where it matters:

- ``"backbone"``: the backbone's own inference (noise at every step but the last, whose output
  is the mean: for DiffuRec-style backbones the predicted x_0 itself);
- ``"policy"``: the agents' Gaussian policy N(mu, (kappa sigma_t)^2) at every step, the last one
  included (its variance clipped to the next step's, as the agents do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from refit_gym.backbones import Backbone
from refit_gym.data import SequenceData
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.rl.refit_agent import policy_distribution, sample_action
from refit_gym.training.metrics import eval_mode

SAMPLERS = ("backbone", "policy")


@dataclass(frozen=True)
class ChainInfluence:
    """What the chain's randomness does to the outcome of ``rows`` x ``trajectories`` episodes.

    ``within_share`` = within-row variance / (within + between variance) of the reward: 0 for a
    chain whose outcome the condition fixes, near 1 when the draw decides everything.
    """

    sampler: str
    rows: int
    trajectories: int
    reward_mean: float
    reward_within_std: float  # sqrt(mean over rows of the variance over trajectories)
    reward_between_std: float  # std over rows of the row's mean reward
    within_share: float
    top_k: int
    overlap_within: float  # |top-k of one trajectory ∩ another of the same row| / k
    overlap_between: float  # the same for trajectories of two different rows
    hit_disagreement: float  # rows whose trajectories disagree on whether the target is in top-k

    def to_json(self) -> dict[str, float | int | str]:
        return asdict(self)


def _top_k_overlap(a: Tensor, b: Tensor) -> Tensor:
    """|a_r ∩ b_r| / k for index lists a, b (R, k) of distinct items -> (R,)."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).double().mean(-1)


@torch.no_grad()
def sample_final_states(backbone: Backbone, batch: dict[str, Tensor], chain: GaussianDiffusion,
                        sampler: str, generator: torch.Generator, kappa: float = 1.0) -> Tensor:
    """x_0 (B, d) of one trajectory per row of ``batch`` on ``chain`` under ``sampler``."""
    if sampler == "backbone":
        return backbone.generate(batch, chain, generator)
    if sampler != "policy":
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    condition = backbone.encode(batch)
    x = backbone.initial_state(batch, chain, generator)
    for step in reversed(range(chain.steps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x = sample_action(*policy_distribution(backbone, x, t, condition, kappa, chain), generator)
    return x


@torch.no_grad()
def chain_influence(backbone: Backbone, batch: dict[str, Tensor], chain: GaussianDiffusion, *,
                    trajectories: int = 16, sampler: str = "backbone", tau: float = 0.1,
                    top_k: int = 20, kappa: float = 1.0, seed: int = 0) -> ChainInfluence:
    """:class:`ChainInfluence` of ``trajectories`` (M >= 2) draws for each of the R >= 2 rows of
    ``batch`` (``{"history": (R, L), "target": (R,)}``), the rows repeated M times in one
    batched pass; the draws come from a generator seeded by ``seed``."""
    rows = len(batch["target"])
    if trajectories < 2 or rows < 2:
        raise ValueError(f"chain influence needs >= 2 rows and >= 2 trajectories each, got "
                         f"{rows} rows x {trajectories}")
    device = batch["target"].device
    # Row-keyed evaluation noise ("row") would give every trajectory of a row the same draws.
    repeated = {k: v.repeat_interleave(trajectories, 0) for k, v in batch.items() if k != "row"}
    generator = torch.Generator(device).manual_seed(seed)
    with eval_mode(backbone):
        x0 = sample_final_states(backbone, repeated, chain, sampler, generator, kappa)
        scores = backbone.scores(x0).double()  # (R * M, n_items)
    target = repeated["target"]
    reward = torch.log_softmax(scores / tau, -1).gather(1, target[:, None]).view(rows, -1)
    within = reward.var(1).mean()  # sample variances (n - 1), as every spread here
    between = reward.mean(1).var()
    total = within + between
    top = scores.topk(top_k, dim=1).indices.view(rows, trajectories, top_k)
    same_row = _top_k_overlap(top[:, :-1].reshape(-1, top_k), top[:, 1:].reshape(-1, top_k))
    other_row = _top_k_overlap(top[:-1].reshape(-1, top_k), top[1:].reshape(-1, top_k))
    hits = (top == target.view(rows, trajectories, 1)).any(-1)  # (R, M)
    disagree = hits.any(1) & ~hits.all(1)
    return ChainInfluence(
        sampler=sampler, rows=rows, trajectories=trajectories,
        reward_mean=reward.mean().item(), reward_within_std=within.sqrt().item(),
        reward_between_std=between.sqrt().item(),
        within_share=(within / total).item() if total > 0 else 0.0, top_k=top_k,
        overlap_within=same_row.mean().item(), overlap_between=other_row.mean().item(),
        hit_disagreement=disagree.double().mean().item())


def fixed_rows(data: SequenceData, rows: int, seed: int = 0, split: str = "valid"
               ) -> np.ndarray:
    """A fixed, seeded choice of ``rows`` row indices of ``split`` (sorted)."""
    n = len(data.targets[split])
    return np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))


def chain_influence_report(backbone: Backbone, data: SequenceData, chain: GaussianDiffusion, *,
                           rows: int = 256, trajectories: int = 16, tau: float = 0.1,
                           kappa: float = 1.0, samplers: Sequence[str] = SAMPLERS,
                           device: torch.device | str = "cpu") -> list[ChainInfluence]:
    """:func:`chain_influence` of each sampler on the same fixed validation rows."""
    batch = data.batch("valid", fixed_rows(data, rows), device)
    return [chain_influence(backbone, batch, chain, trajectories=trajectories, sampler=sampler,
                            tau=tau, kappa=kappa) for sampler in samplers]
