"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", DDPO_IS)
on the denoising MDP: the same Gaussian policy, rollouts and per-user group advantages as
ReFiT (:mod:`refit_gym.rl.refit_agent`), but each rollout is reused for several optimiser
epochs, every epoch a fresh shuffle of the collected (trajectory, step) samples in minibatches,
one optimiser step per minibatch on the importance-sampled, ratio-clipped objective

    L = mean over the minibatch of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = pi_theta(a_t | x_t, c) / pi_old(a_t | x_t, c),

with A the trajectory's group-normalised advantage clipped to +- ``advantage_clip`` (DDPO's
``adv_clip_max``). ReFiT instead takes one step per rollout on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from refit_gym.backbones import Backbone
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.distributed import Distributed
from refit_gym.rl.refit_agent import (
    BatchStats,
    DivergenceGuard,
    ReFiTAgent,
    ReFiTConfig,
    Rollout,
    clipped_surrogate,
    matmul_precision,
    policy_step,
)


@dataclass(frozen=True)
class DDPOConfig(ReFiTConfig):
    update_epochs: int = 4  # optimiser passes over each rollout's samples
    minibatches: int = 4  # each pass splits the (trajectory, step) samples into this many
    advantage_clip: float = 5.0  # |A| <= this, as DDPO's adv_clip_max

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.minibatches < 1:
            raise ValueError(f"ddpo minibatches = {self.minibatches}; it must be >= 1")
        if self.kl_coef != 0:
            raise ValueError(f"ddpo kl_coef = {self.kl_coef}; DDPO has no KL penalty (0), "
                             "the ratio clip alone keeps the policy near the rollout's")
        if self.advantage_clip <= 0:
            raise ValueError(f"ddpo advantage_clip = {self.advantage_clip}; it must be > 0")


def ddpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
              advantage_clip: float) -> tuple[Tensor, Tensor]:
    """DDPO's minibatch loss (scalar) and how many of its samples' ratios were clipped (0-dim
    long, left on the device); every argument (M,) for M (trajectory, step) samples."""
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    surrogate, ratio = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    return -surrogate.mean(), ((ratio - 1).abs() > clip_range).sum()


@dataclass
class Samples:
    """The (trajectory, step) samples of a batch's rollouts, flat: row i of every field is one
    sample; ``row`` indexes ``batch`` (the trajectories' backbone inputs, all chunks)."""

    x_t: Tensor  # (M, d)
    t: Tensor  # (M,)
    action: Tensor  # (M, d)
    old_log_prob: Tensor  # (M,)
    advantages: Tensor  # (M,)
    row: Tensor  # (M,)
    batch: dict[str, Tensor]
    chain: GaussianDiffusion

    @classmethod
    def of(cls, rollouts: list[Rollout]) -> Samples:
        fields: list[list[Tensor]] = [[], [], [], [], [], []]
        offset = 0
        for rollout in rollouts:
            rows = torch.arange(len(rollout.advantages), device=rollout.advantages.device)
            for step in rollout.steps:
                for values, value in zip(fields, (*step, rollout.advantages, rows + offset),
                                         strict=True):
                    values.append(value)
            offset += len(rows)
        batch = {key: torch.cat([r.batch[key] for r in rollouts])
                 for key in rollouts[0].batch}
        return cls(*(torch.cat(values) for values in fields), batch, rollouts[0].chain)

    def __len__(self) -> int:
        return len(self.t)

    @property
    def trajectories(self) -> int:
        """How many trajectories the samples come from (rows of ``batch``)."""
        return len(next(iter(self.batch.values())))


class DDPOAgent(ReFiTAgent):
    """ReFiT's agent with DDPO's update; one process (its minibatches are not split over
    ranks). ``shuffle`` orders the samples: seed it before each update for a resumable run."""

    def __init__(self, model: Backbone, reference: Backbone, config: DDPOConfig,
                 dist: Distributed | None = None) -> None:
        super().__init__(model, reference, config, dist)
        if self.dist.active:
            raise ValueError("ddpo runs in one process only (its minibatch steps are not "
                             "split over ranks); start it without torchrun")
        self.shuffle = torch.Generator()

    def update(self, rollouts: list[Rollout], total_rows: int) -> BatchStats:
        """``update_epochs`` passes over the rollouts' samples, one optimiser step per
        minibatch."""
        cfg = self.config
        samples = Samples.of(rollouts)
        params = [p for p in self.model.parameters() if p.requires_grad]
        per_minibatch = -(-len(samples) // cfg.minibatches)
        clipped = torch.zeros((), dtype=torch.long, device=samples.t.device)
        norm_sum: Tensor | float = 0.0  # logged: the minibatches' mean norm, not the last one's
        guard = DivergenceGuard(rollouts)
        with matmul_precision(cfg.precision):
            for _ in range(cfg.update_epochs):
                # Drawn on the CPU generator (resumable), sent to the device once a pass.
                order = torch.randperm(len(samples), generator=self.shuffle
                                       ).to(samples.t.device)
                for indices in order.split(per_minibatch):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss, clip_count = self.minibatch_loss(samples, indices)
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    guard.before_step(grad_norm)
                    self.optimizer.step()
                    clipped = clipped + clip_count
                    norm_sum = norm_sum + grad_norm.detach()  # on the device: no read per step
        guard.after_update()
        # The other statistics reach the host here, once.
        steps = cfg.update_epochs * math.ceil(len(samples) / per_minibatch)
        return BatchStats(reward=guard.reward / total_rows, kl=0.0,
                          grad_norm=float(norm_sum) / steps,
                          clip_fraction=int(clipped) / (len(samples) * cfg.update_epochs))

    def minibatch_loss(self, samples: Samples, indices: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`ddpo_loss` of the samples at ``indices`` (M,) on the samples' device, under
        the current policy."""
        cfg = self.config
        rows = samples.row[indices]
        # A history encoder costs far more than a denoising step: encode the fewer of the
        # minibatch's samples and all trajectories' inputs (indexing the trajectories'
        # conditions sums each sample's gradient into its trajectory's, as encoding it would).
        with self.forward():
            if len(indices) < samples.trajectories:
                condition = self.model.encode({key: value[rows]
                                               for key, value in samples.batch.items()})
            else:
                encoded = self.model.encode(samples.batch)
                condition = None if encoded is None else encoded[rows]
        _, log_prob, _ = policy_step(self.model, samples.x_t[indices], samples.t[indices],
                                     condition, cfg.kappa, action=samples.action[indices],
                                     chain=samples.chain, precision=cfg.precision)
        return ddpo_loss(log_prob, samples.old_log_prob[indices], samples.advantages[indices],
                         cfg.clip_range, cfg.advantage_clip)
