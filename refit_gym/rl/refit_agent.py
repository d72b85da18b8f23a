"""The ReFiT agent: policy-gradient fine-tuning of a pretrained diffusion backbone.

Policy: pi_theta(x_{t-1} | x_t, c) = N(mu_theta(x_t, c, t), (kappa sigma_t)^2 I), mu_theta the
backbone's reverse-step mean (the posterior mean of its guided x0 prediction), sigma_t the fixed
posterior std; kappa = 1 is the backbone's own chain. Each batch of users plays ``group_size``
trajectories per user on the environment's torch path; the advantage is the reward minus the
user's group mean, divided by the group's std. The loss is the (optionally ratio-clipped) policy
gradient on the exact per-step Gaussian log-likelihoods, plus an optional KL penalty to the
frozen pretrained backbone, over the last ``train_steps`` reverse steps (the earlier steps
explore too, or follow the mean chain with ``explore_all_steps=False``). Evaluation uses the
backbone's own inference (DiffRec: the deterministic mean chain).

A batch may be rolled out in chunks of users (:meth:`ReFiTAgent.rollout` each), whose gradients
:meth:`ReFiTAgent.update` accumulates and sums over the ranks of a ``torchrun`` group: the same
update as one rollout of the whole batch, in less memory or on several processes.

Neither a rollout nor an update waits for the device between steps: the chain's step is the
loop's, the core is stepped unchecked (:meth:`DenoisingMDP.step`), and the logged statistics
(reward, KL, clipped ratios) are summed on the device and read once per batch. What the core's
checks would have caught, a policy that diverged, :class:`DivergenceGuard` catches from those
reads, before the optimiser steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from refit_gym.backbones import Backbone
from refit_gym.diffusion import GaussianDiffusion, gaussian_log_prob
from refit_gym.distributed import Distributed, GradientSum, current
from refit_gym.mdp.core import DIVERGED, DenoisingMDP


@dataclass(frozen=True)
class ReFiTConfig:
    epochs: int = 3  # passes over the users
    users_per_epoch: int = 0  # 0: every user each epoch; else a fresh random subset of this size
    users_per_batch: int = 64
    # 0: one rollout of the whole batch. > 0: rollouts of this many users, each seeded by its
    # place in the run, so a batch gives the same update on any number of torchrun processes
    # (under torchrun, 0 means users_per_batch / world size).
    users_per_chunk: int = 0
    group_size: int = 8  # trajectories per user (the advantage baseline is their mean)
    kappa: float = 10.0  # exploration scale: policy std = kappa * sigma_t
    lr: float = 1e-5
    weight_decay: float = 0.0
    train_steps: int = 10  # gradients on the last train_steps reverse steps (t < train_steps)
    # Steps t < min_train_step follow the mean chain untrained: where sigma_t is tiny against
    # the states' scale, the score-function term eps / sigma_t is almost pure noise (on
    # SeqSynthetic one batch's gradient with every step trained has cosine 0.00 +- 0.20 with
    # the exact one; benchmarks/gradient_check.py).
    min_train_step: int = 0
    # False: the untrained steps (t >= train_steps) follow the mean chain, as evaluation does,
    # so their noise does not blur the reward of the steps that are trained.
    explore_all_steps: bool = True
    update_epochs: int = 1  # > 1 reuses each batch with importance-ratio clipping
    clip_range: float = 0.2
    kl_coef: float = 0.0  # weight of KL(pi_theta || pi_pretrained), per step
    max_grad_norm: float = 1.0
    checkpoint_every: int = 20  # batches between resumable checkpoints
    # The policy's and the reference's network forwards in rollout and update, and the update's
    # backward (PRECISIONS): "fp32" as pretrained; "tf32" CUDA's TF32 matmuls (refused off
    # CUDA); "bf16" bfloat16 autocast on the device (its backward follows the forward's dtypes).
    # Weights, optimiser, log-probabilities (float64), rewards and evaluation stay as in fp32.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not 0 <= self.min_train_step < self.train_steps:
            raise ValueError(
                f"min_train_step ({self.min_train_step}) must be >= 0 and below train_steps "
                f"({self.train_steps}): the trained steps are min_train_step <= t < train_steps")
        if self.update_epochs < 1:
            raise ValueError(f"update_epochs must be >= 1, got {self.update_epochs}")

    def identity(self) -> dict[str, Any]:
        """The settings as a run's identity (and metrics.json) records them: every field, but
        ``precision`` only when it is not "fp32", so runs saved before it existed resume."""
        settings = asdict(self)
        if settings["precision"] == "fp32":
            del settings["precision"]
        return settings

    def trains(self, step: int) -> bool:
        """Whether reverse step ``step`` (chain index t - 1) gets a policy gradient."""
        return self.min_train_step <= step < self.train_steps

    def explores(self, step: int) -> bool:
        """Whether the policy samples at ``step`` (else it follows the mean chain)."""
        return self.trains(step) or (self.explore_all_steps and step >= self.min_train_step)


PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str, device: torch.device | None = None) -> None:
    """Refuse, in one line, a name not in :data:`PRECISIONS`, or one that ``device`` (when
    given) cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}; choose one of {PRECISIONS}")
    if device is None:
        return
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision 'tf32' is a CUDA matmul mode and the policy is on "
                         f"{device.type}: use 'fp32' or 'bf16' there")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' needs a GPU with bfloat16 support, which "
                         f"{torch.cuda.get_device_name(device)} lacks: use 'fp32' or 'tf32'")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Inside the block, CUDA matmuls and convolutions (forward and backward) in TF32 when
    ``precision`` is "tf32" (PyTorch's global flags, restored on leaving); else nothing."""
    if precision != "tf32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def network_precision(precision: str, device: torch.device
                      ) -> contextlib.AbstractContextManager[Any]:
    """The block a policy network's forward runs in, and nothing else of a rollout (rewards stay
    fp32): bfloat16 autocast on ``device`` for "bf16" (its backward then follows the forward's
    dtypes), TF32 matmuls for "tf32" (the update's backward needs its own
    :func:`matmul_precision` block), none for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return matmul_precision(precision)


def policy_distribution(
    model: Backbone, x_t: Tensor, t: Tensor, condition: Tensor | None, kappa: float,
    chain: GaussianDiffusion | None = None, precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """The Gaussian policy at (x_t, t): its mean (B, d), float32 (the chain's posterior step
    with only the network's forward at ``precision``), and its std kappa sigma_t (B,).
    Shapes: x_t (B, d), t (B,) chain steps, condition as ``model.encode`` returns it."""
    with network_precision(precision, x_t.device):
        mean = model.reverse_mean(x_t, t, condition, chain)
    return mean, kappa * model.reverse_std(t, chain)


def sample_action(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """mean + std eps with eps ~ N(0, I) drawn from ``generator``: (B, d), (B,) -> (B, d)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std.to(mean.dtype).unsqueeze(-1) * noise).detach()


def policy_step(
    model: Backbone, x_t: Tensor, t: Tensor, condition: Tensor | None, kappa: float,
    action: Tensor | None = None, generator: torch.Generator | None = None,
    chain: GaussianDiffusion | None = None, precision: str = "fp32",
) -> tuple[Tensor, Tensor, Tensor]:
    """One reverse step of the Gaussian policy: (action, exact log-prob (B,) float64, mean).

    Samples ``action`` = mu + kappa sigma_t eps when none is given; otherwise scores it.
    Shapes and precision as :func:`policy_distribution`; the log-prob is float64 in every
    precision.
    """
    mean, std = policy_distribution(model, x_t, t, condition, kappa, chain, precision)
    if action is None:
        action = sample_action(mean, std, generator)
    return action, gaussian_log_prob(action, mean, std), mean


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                      clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped importance-sampled objective per sample, and the ratio (both (B,)):
    min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi_theta(a | s) / pi_old(a | s)."""
    # Beyond e^20 the clipped objective is flat anyway; the clamp only keeps a far-moved
    # policy (several updates per rollout) from overflowing to inf * 0 = NaN.
    ratio = torch.exp((log_prob - old_log_prob).clamp(max=20.0))
    surrogate = torch.minimum(ratio * advantages,
                              ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)
    return surrogate, ratio


def groups_identical(x: Tensor, group_size: int) -> bool:
    """Whether each consecutive group of ``group_size`` rows of ``x`` (U * G, d) is one row
    repeated (and a group has more than one row)."""
    grouped = x.view(-1, group_size, x.shape[-1])
    return group_size > 1 and torch.equal(grouped, grouped[:, :1].expand_as(grouped))


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """(reward - user's group mean) / group std, rewards (U * G,) grouped per user -> (U * G,)."""
    grouped = rewards.view(-1, group_size).double()
    centred = grouped - grouped.mean(1, keepdim=True)
    return (centred / (grouped.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


@dataclass
class BatchStats:
    reward: float
    kl: float
    grad_norm: float
    clip_fraction: float


@dataclass
class Rollout:
    """A chunk's trajectories: the trained steps (x_t, t, action, log-prob at sampling), each
    (R, ...) for R = users x group_size rows, their advantages and final rewards (R,)."""

    batch: dict[str, Tensor]
    chain: GaussianDiffusion
    steps: list[tuple[Tensor, Tensor, Tensor, Tensor]]
    advantages: Tensor
    reward: Tensor
    reference_condition: Tensor | None  # the frozen reference's c, for the KL term


def check_finite(value: float, what: str) -> float:
    """``value``, a batch statistic read on the host, refused with the core's message for NaN
    or infinite actions (:data:`~refit_gym.mdp.core.DIVERGED`) when it is not finite."""
    if not math.isfinite(value):
        raise ValueError(f"{DIVERGED} ({what} is {value})")
    return value


class DivergenceGuard:
    """Stops a batch's update when the policy diverged, in a fixed number of host reads: the
    agents step the core unchecked, so NaN actions pass into the states and the reward (a
    ranking reward of NaN scores may even be finite) and show in the gradient.

    The first optimiser step's gradient norm and the batch's reward (this rank's, read then:
    :attr:`reward`) are checked before that step: a policy that diverged before the batch (NaN
    weights) stops with its weights and optimiser untouched. The norm first: it is taken after
    the gradients' all-reduce, so under torchrun every rank stops there together. The later
    steps' norms (several update epochs, DDPO's minibatches) are kept on the device as their
    maximum, which NaN propagates, and read after the update (:meth:`after_update`): a policy
    that diverges within the update stops at this batch."""

    def __init__(self, rollouts: list[Rollout]) -> None:
        self.rollouts = rollouts
        self.reward = math.nan  # the rollouts' summed reward, once read
        self.largest: Tensor | None = None
        self.later_steps = False

    def before_step(self, grad_norm: Tensor) -> None:
        """Check (first step) or keep (later steps) the clipped gradient's norm (0-dim)."""
        if self.largest is None:
            check_finite(float(grad_norm), "the gradient norm")
            self.reward = check_finite(sum(r.reward.sum().item() for r in self.rollouts),
                                       "the batch's reward")
            self.largest = grad_norm
        else:
            self.largest, self.later_steps = torch.maximum(self.largest, grad_norm), True

    def after_update(self) -> None:
        """Check the later steps' norms (one read; none when the update took one step)."""
        if self.later_steps:
            check_finite(float(self.largest), "the largest gradient norm of the update")


class ReFiTAgent:
    """Owns the policy (the denoiser being tuned), its frozen reference and the optimiser;
    ``dist``: the torchrun group whose ranks share each batch (default: this process's)."""

    def __init__(self, model: Backbone, reference: Backbone, config: ReFiTConfig,
                 dist: Distributed | None = None) -> None:
        self.model, self.reference, self.config = model, reference, config
        self.dist = current() if dist is None else dist
        # No dropout: rollout and update must score the same policy.
        self.model.eval().freeze_for_finetuning()
        self.reference.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        check_precision(config.precision, self.device)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=config.lr, weight_decay=config.weight_decay)

    def train_batch(self, core: DenoisingMDP, users: Tensor,
                    generator: torch.Generator) -> BatchStats:
        """Roll out ``group_size`` trajectories per episode in ``users`` (U,) (users or training
        rows) on ``core``'s chain and update once."""
        return self.update([self.rollout(core, users, generator)],
                           len(users) * self.config.group_size)

    def forward(self) -> contextlib.AbstractContextManager[Any]:
        """The block the policy's and the reference's network forwards run in."""
        return network_precision(self.config.precision, self.device)

    @torch.no_grad()
    def rollout(self, core: DenoisingMDP, users: Tensor, generator: torch.Generator) -> Rollout:
        """Play ``group_size`` trajectories of each of ``users`` (U,) on ``core`` (U * G rows),
        keeping the trained steps and the group advantages."""
        cfg = self.config
        rows = torch.arange(core.num_rows, device=core.device)
        core.reset_rows(rows, users.repeat_interleave(cfg.group_size), generator)
        batch, chain = core.backbone_batch(), core.chain
        steps: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        # Only the networks' forwards run at cfg.precision (self.forward, policy_distribution): the
        # core's step, and so the reward, stays fp32.
        with self.forward():
            condition = self.model.encode(batch)
        # Until the first exploring step, rows whose group shares one deterministic start (an
        # unconditioned backbone started from the user's history, as DiffRec on ML-1M) share
        # every state too, so one row per group computes the mean: with exploration on the last
        # 5 of 40 steps, most of the chain.
        shared = condition is None and groups_identical(core.x, cfg.group_size)
        # Every row starts at t = K, so the i-th action is chain step K - 1 - i: the loop knows
        # it, and no step reads it back from the device.
        for step in reversed(range(core.steps)):
            t = core.denoiser_timestep()
            x_t = core.x
            if cfg.explores(step):
                shared = False
                mean, std = policy_distribution(self.model, x_t, t, condition, cfg.kappa,
                                                chain, cfg.precision)
                action = sample_action(mean, std, generator)
                if cfg.trains(step):  # scored only where trained (trains implies explores);
                    # the core never mutates a state, so x_t can be kept as it is
                    steps.append((x_t, t, action, gaussian_log_prob(action, mean, std)))
            elif shared:
                g = cfg.group_size
                with self.forward():
                    action = self.model.reverse_mean(x_t[::g], t[::g], None, chain
                                                     ).repeat_interleave(g, 0)
            else:
                with self.forward():
                    action = self.model.reverse_mean(x_t, t, condition, chain)
            # Unchecked: a diverged policy's NaN actions are caught by update's DivergenceGuard.
            result = core.step(action, checked=False)
        with self.forward():
            reference_condition = self.reference.encode(batch) if cfg.kl_coef > 0 else None
        return Rollout(batch, chain, steps, group_advantages(result.reward, cfg.group_size),
                       result.reward, reference_condition)

    def update(self, rollouts: list[Rollout], total_rows: int) -> BatchStats:
        """One policy-gradient update from ``rollouts`` (this rank's chunks of a batch of
        ``total_rows`` trajectories on every rank together): the loss is the mean over all of
        them, gradients are summed over chunks and ranks, then clipped and applied."""
        cfg = self.config
        guard = DivergenceGuard(rollouts)
        kl_total = clipped = torch.zeros((), dtype=torch.float64, device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Update-wide: the backward's matmuls run at the forwards' precision too (TF32).
        with matmul_precision(cfg.precision):
            for _ in range(cfg.update_epochs):
                kl, clip_count, n_steps = self.policy_gradient(rollouts, total_rows)
                kl_total, clipped = kl_total + kl, clipped + clip_count
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                guard.before_step(grad_norm)
                self.optimizer.step()
        guard.after_update()
        # The other statistics reach the host here, once.
        reward, kl_total, clipped = self.dist.sum_floats(
            [guard.reward, *torch.stack([kl_total, clipped]).tolist()])
        n_terms = max(total_rows * n_steps * cfg.update_epochs, 1)
        return BatchStats(reward=reward / total_rows, kl=kl_total / n_terms,
                          grad_norm=float(grad_norm), clip_fraction=clipped / n_terms)

    def policy_gradient(self, rollouts: list[Rollout], total_rows: int
                        ) -> tuple[Tensor, Tensor, int]:
        """Leave in each trainable parameter's ``.grad`` the gradient of the batch loss (the
        estimate :meth:`update` steps along), summed over chunks and ranks. Returns this rank's
        KL sum and clipped-ratio count (0-dim float64, on the device) and the number of trained
        steps per trajectory."""
        # Every trajectory trains the same steps; a rank may hold no chunk of a small batch.
        n_steps = int(self.dist.max_float(max((len(r.steps) for r in rollouts), default=0)))
        kl_total = clipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        gradient = GradientSum(self.model.parameters())
        for rollout in rollouts:
            kl, clip_count = self._accumulate(rollout, total_rows * n_steps)
            kl_total, clipped = kl_total + kl, clipped + clip_count
            gradient.add()  # each chunk's alone: the total is then the same on any world size
        # Chunks of users_per_chunk users are the same on any number of ranks, so an exact
        # (float64) all-reduce makes the update too; chunks of users_per_batch / world size
        # are not, and a float32 all-reduce moves half the bytes.
        gradient.reduce(self.dist, exact=self.config.users_per_chunk > 0)
        return kl_total, clipped, n_steps

    def _accumulate(self, rollout: Rollout, denominator: int) -> tuple[Tensor, Tensor]:
        """Backpropagate ``rollout``'s share of the batch loss (its per-row, per-step terms
        summed, divided by ``denominator`` rows x steps of the whole batch); returns its KL sum
        and clipped-ratio count (0-dim float64, left on the device)."""
        cfg, chain, advantages = self.config, rollout.chain, rollout.advantages
        kl_sum = clipped = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.forward():  # with gradients: the encoder is tuned too
            condition = self.model.encode(rollout.batch)
        # The steps score a leaf copy of the condition that collects d loss / d c over them; the
        # encoder then runs one backward with that sum, not one per step (chain rule: the same
        # gradient, to float rounding, at a fraction of the cost for a deep history encoder).
        encoded = condition is not None and condition.requires_grad
        step_condition = condition.detach().requires_grad_() if encoded else condition
        for x_t, t, action, old_log_prob in rollout.steps:
            _, log_prob, mean = policy_step(self.model, x_t, t, step_condition, cfg.kappa,
                                            action=action, chain=chain, precision=cfg.precision)
            surrogate, ratio = clipped_surrogate(log_prob, old_log_prob, advantages,
                                                 cfg.clip_range)
            loss = -surrogate.sum()
            if cfg.kl_coef > 0:
                with torch.no_grad(), self.forward():
                    ref_mean = self.reference.reverse_mean(x_t, t,
                                                           rollout.reference_condition, chain)
                var = (cfg.kappa * self.model.reverse_std(t, chain)).pow(2)
                kl = (mean.double() - ref_mean.double()).pow(2).sum(-1) / (2 * var)
                loss = loss + cfg.kl_coef * kl.sum()
                kl_sum = kl_sum + kl.detach().sum()
            (loss / denominator).backward()
            clipped = clipped + ((ratio - 1).abs() > cfg.clip_range).double().sum()
        if encoded and step_condition.grad is not None:
            condition.backward(step_condition.grad)
        return kl_sum, clipped


def user_batches(n_users: int, users_per_batch: int, generator: torch.Generator,
                 users_per_epoch: int = 0) -> list[Tensor]:
    """A shuffled pass over the episodes (users, or training rows; all, or the first
    ``users_per_epoch`` of a random order) in batches; the last batch may be smaller. The
    order is drawn on the generator's device and returned on the CPU."""
    order = torch.randperm(n_users, generator=generator, device=generator.device).cpu()
    if users_per_epoch:
        order = order[:users_per_epoch]
    return list(order.split(users_per_batch))

