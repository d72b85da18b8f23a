"""The batched denoising MDP: the one core behind every face, for every scenario.

State per row: x_t (d,) and the step t. An episode starts at t = K from x_K (its source says
how: a user's history, or noise), each action *is* the next state x_{t-1}, and after K actions
it terminates with reward R(scores(x_0); episode). The core holds data (through its episode
source), the chain and the reward, but no network: the policy belongs to the agent.

This is the torch-native path: tensors in and out, on ``device``, rows reset independently.
Only training data ever enters it; valid and test splits are not even passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from refit_gym.diffusion import GaussianDiffusion
from refit_gym.mdp.episodes import EpisodeSource
from refit_gym.mdp.rewards import Reward

ACTION_BOUND = 10.0  # |x| bound of observations and actions; clean states live well inside
# Why a run stops when actions (or, for an agent stepping unchecked, its batch's statistics)
# are not finite.
DIVERGED = ("actions contain NaN or infinite values; the denoiser diverged or an agent produced "
            "invalid output")


@dataclass
class StepResult:
    """What one batched step returns; every tensor has B rows, on the core's device."""

    x: Tensor  # (B, d) float32, x_{t-1}; the core's own state, never modified in place
    t: Tensor  # (B,) long, t - 1; likewise
    reward: Tensor  # (B,) float32, R where terminated, else 0
    terminated: Tensor  # (B,) bool


class DenoisingMDP:
    """A batch of ``num_rows`` denoising episodes of ``source``, rewarded by ``reward``."""

    def __init__(self, source: EpisodeSource, reward: Reward, num_rows: int) -> None:
        self.source, self.reward = source, reward
        self.device = source.device
        self.n_episodes, self.n_items = source.n_episodes, source.n_items
        self.state_dim = source.state_dim
        self.steps = source.chain.steps
        d = self.device
        self.x = torch.zeros(num_rows, self.state_dim, device=d)
        self.t = torch.zeros(num_rows, dtype=torch.long, device=d)  # 0 = finished, needs reset
        self.episodes = torch.zeros(num_rows, dtype=torch.long, device=d)  # user or row ids
        # Steps left of every row while all rows started together (known on the host, so a
        # step need not read t from the device to know which rows terminate); None once rows
        # were reset apart.
        self.lockstep: int | None = 0
        self.inputs = source.empty_inputs(num_rows)
        # The reward's per-episode target, shaped as the reward makes it (items or a state).
        self.relevance = reward.relevance(torch.zeros(num_rows, self.n_items, device=d),
                                          source.visible(self.inputs), self.inputs)

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    @property
    def chain(self) -> GaussianDiffusion:
        """The K-step reverse chain the episodes walk (an agent's policy steps along it)."""
        return self.source.chain

    @property
    def visible(self) -> Tensor | None:
        """(B, n_items) items each row's input shows (masked from rankings), or None."""
        return self.source.visible(self.inputs)

    def reset_rows(self, rows: Tensor, episodes: Tensor, generator: torch.Generator) -> None:
        """Start ``episodes`` (k,) (user or training-row ids) in ``rows`` (k,); all draws come
        from ``generator``, which must live on the core's device."""
        episodes = episodes.to(self.device, torch.long)
        rows = rows.to(self.device, torch.long)
        if episodes.numel() and (episodes.min() < 0 or episodes.max() >= self.n_episodes):
            raise IndexError(f"episode ids must be in [0, {self.n_episodes}), got "
                             f"{episodes.min().item()}..{episodes.max().item()}")
        start = self.source.start(episodes, generator)
        relevance = self.reward.relevance(start.target, self.source.visible(start.inputs),
                                          start.inputs)
        steps = torch.full_like(episodes, self.steps)
        if torch.equal(rows, torch.arange(self.num_rows, device=self.device)):
            # All rows start together (the usual case): the new tensors become the state.
            self.x, self.t, self.episodes, self.inputs, self.relevance = (
                start.x, steps, episodes, start.inputs, relevance)
            self.lockstep = self.steps
            return
        self.lockstep = None
        # Out of place: tensors handed out by earlier steps stay as they were.
        self.x = self.x.index_put((rows,), start.x)
        self.t = self.t.index_put((rows,), steps)
        self.episodes = self.episodes.index_put((rows,), episodes)
        self.inputs = {k: v.index_put((rows,), start.inputs[k]) for k, v in self.inputs.items()}
        self.relevance = self.relevance.index_put((rows,), relevance)

    def step(self, action: Tensor, *, checked: bool = True) -> StepResult:
        """Apply actions (B, d): x <- clip(action), t <- t - 1; reward rows that reach t = 0.

        Raises on a wrong shape, a non-float dtype, NaN or infinite values, or a row that has
        already terminated (reset it first). Finite values outside +-ACTION_BOUND are clipped.
        An in-bounds float32 ``action`` becomes the state itself (no copy): the caller must not
        modify it in place afterwards.

        ``checked=False`` is for a trusted agent (the project's own): shape and dtype are still
        refused (they are known on the host), but the values are clamped without being read, so
        NaN or infinite actions pass into the state and the reward unreported (the project's
        agents catch them in their update: ``refit_agent.DivergenceGuard``), and the state is
        always a new tensor. With every row started together (one :meth:`reset_rows` of all
        rows) such a step never waits for the device: which rows terminate is known from the
        host's count of steps; with rows reset apart it reads which rows terminated from the device
        once (one ``nonzero``)."""
        if action.shape != self.x.shape:
            raise ValueError(f"action shape {tuple(action.shape)} != expected "
                             f"{tuple(self.x.shape)} (num_rows, state dimension)")
        if not action.is_floating_point():
            raise TypeError(f"actions must be floating point, got {action.dtype}")
        if self.lockstep is not None:
            finished = self.lockstep == 0
        else:  # rows reset apart: read only when checked (a trusted agent's are not)
            finished = checked and self.t.min().item() <= 0
        if finished:
            raise RuntimeError("step() on a terminated episode: call reset() first (reset_rows "
                               "on the torch core)")
        action = action.to(self.device, torch.float32)
        if not checked:
            action = action.clamp(-ACTION_BOUND, ACTION_BOUND)
        else:
            low, high = (v.item() for v in torch.aminmax(action))  # NaN and inf propagate
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(DIVERGED)
            if low < -ACTION_BOUND or high > ACTION_BOUND:
                action = action.clamp(-ACTION_BOUND, ACTION_BOUND)
        self.x = action  # taken as the next state without a copy: do not modify it in place
        self.t = self.t - 1
        terminated = self.t == 0
        if self.lockstep is None:  # rows reset apart: which terminated is read, once
            done: Tensor | None = terminated.nonzero().squeeze(-1)
            everyone = len(done) == self.num_rows
        else:  # known on the host: every row terminates, or none
            self.lockstep -= 1
            done, everyone = None, self.lockstep == 0
        if everyone:
            reward = self.final_reward(self.x)  # the usual case: rows started together
        else:
            reward = torch.zeros(self.num_rows, device=self.device)
            if done is not None and len(done):
                reward[done] = self.final_reward(self.x[done], done)
        return StepResult(self.x, self.t, reward, terminated)

    def final_reward(self, x0: Tensor, rows: Tensor | None = None) -> Tensor:
        """R of final states ``x0`` (k, d) of ``rows`` (k,) (default: every row), as the last
        step rewards them."""
        relevance, inputs = self.relevance, self.inputs
        if rows is not None:
            relevance, inputs = relevance[rows], {k: v[rows] for k, v in inputs.items()}
        final = x0 if self.reward.on_state else self.source.scores(x0)
        return self.reward(final, relevance, self.source.visible(inputs))

    def denoiser_timestep(self) -> Tensor:
        """The chain step t - 1 (in [0, T)) of each row's next reverse step."""
        return (self.t - 1).clamp(min=0)

    def backbone_batch(self) -> dict[str, Tensor]:
        """The rows' episode inputs as a backbone batch (what ``Backbone.encode`` reads)."""
        return self.inputs

