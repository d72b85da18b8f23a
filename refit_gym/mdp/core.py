"""The batched denoising MDP: the one core behind every face (DESIGN section 3).

State per row: the noisy interaction vector x_t (n_items,) and the step t. An episode is one
user: it starts at t = T from x_T = h_u (or a draw of q(x_k | h_u)), each action *is* the next
state x_{t-1}, and after T actions it terminates with reward R(x_0; u). The core holds data,
schedule and reward but no network: the policy belongs to the agent.

This is the torch-native path: tensors in and out, on ``device``, rows reset independently.
Only training interactions ever enter it; valid and test splits are not even passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from refit_gym.diffusion import GaussianDiffusion
from refit_gym.mdp.rewards import Reward

ACTION_BOUND = 10.0  # |x| bound of observations and actions; clean vectors live in [0, 1]
HOLDOUTS = ("random", "temporal")


@dataclass
class StepResult:
    """What one batched step returns; every tensor has B rows, on the core's device."""

    x: Tensor  # (B, n) float32, x_{t-1}; the core's own state, never modified in place
    t: Tensor  # (B,) long, t - 1; likewise
    reward: Tensor  # (B,) float32, R(x_0; u) where terminated, else 0
    terminated: Tensor  # (B,) bool


class DenoisingMDP:
    """A batch of ``num_rows`` denoising episodes over the training matrix ``train``."""

    def __init__(
        self,
        train: sp.csr_matrix,
        diffusion: GaussianDiffusion,
        reward: Reward,
        num_rows: int,
        *,
        sampling_steps: int = 0,
        holdout_fraction: float = 0.0,
        holdout: str = "random",
        order: sp.csr_matrix | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """``holdout``: "random" hides each interaction with probability ``holdout_fraction``;
        "temporal" hides each user's latest round(fraction * n_u) interactions (at most
        n_u - 1) by ``order``, the chronological positions of ``train``'s entries
        (:attr:`refit_gym.data.InteractionData.train_order`)."""
        if not 0 <= sampling_steps <= diffusion.steps:
            raise ValueError(f"sampling_steps must be in [0, {diffusion.steps}], "
                             f"got {sampling_steps}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        if holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
        self.train = train.tocsr()
        self.holdout = holdout
        self._order: np.ndarray | None = None
        if holdout == "temporal":
            if order is None:
                raise ValueError("holdout='temporal' needs the chronological order of the "
                                 "training interactions, which this dataset does not record; "
                                 "use holdout='random'")
            order = order.tocsr()
            if not (np.array_equal(order.indptr, self.train.indptr)
                    and np.array_equal(order.indices, self.train.indices)):
                raise ValueError("order does not have the training matrix's sparsity pattern; "
                                 "pass the train_order of the same dataset")
            self._order = order.data
        self.diffusion, self.reward = diffusion, reward
        self.sampling_steps, self.holdout_fraction = sampling_steps, holdout_fraction
        self.device = torch.device(device)
        self.n_users, self.n_items = self.train.shape
        self.steps = diffusion.steps
        n, d = self.n_items, self.device
        self.x = torch.zeros(num_rows, n, device=d)
        self.t = torch.zeros(num_rows, dtype=torch.long, device=d)  # 0 = finished, needs reset
        self.users = torch.zeros(num_rows, dtype=torch.long, device=d)
        self.history = torch.zeros(num_rows, n, device=d)  # the visible input h_u
        self.relevance = torch.zeros(num_rows, n, device=d)  # the reward's per-episode target

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def reset_rows(self, rows: Tensor, users: Tensor, generator: torch.Generator) -> None:
        """Start episodes for ``users`` (k,) in ``rows`` (k,); all draws come from ``generator``.

        ``generator`` must live on the core's device.
        """
        users = users.to(self.device, torch.long)
        rows = rows.to(self.device, torch.long)
        if users.numel() and (users.min() < 0 or users.max() >= self.n_users):
            raise IndexError(f"user ids must be in [0, {self.n_users}), got "
                             f"{users.min().item()}..{users.max().item()}")
        entries, counts = self._history_entries(users)
        row_of = torch.repeat_interleave(torch.arange(len(users), device=self.device), counts)
        item_of = torch.from_numpy(self.train.indices[entries].astype(np.int64)).to(self.device)
        values = torch.from_numpy(self.train.data[entries].astype(np.float32)).to(self.device)
        full = torch.zeros(len(users), self.n_items, device=self.device)
        full.index_put_((row_of, item_of), values)
        if self.holdout_fraction > 0:
            hidden = self._hidden(entries, row_of, counts, generator)
            history, target = self._hide(full, row_of[hidden], item_of[hidden])
        else:
            history, target = full, full
        x = history
        if self.sampling_steps > 0:
            t = torch.full((len(users),), self.sampling_steps - 1, device=self.device)
            noise = torch.randn(x.shape, generator=generator, device=self.device)
            x = self.diffusion.q_sample(x, t, noise)
        relevance = self.reward.relevance(target, history)
        steps = torch.full_like(users, self.steps)
        if torch.equal(rows, torch.arange(self.num_rows, device=self.device)):
            # All rows start together (the usual case): the new tensors become the state.
            self.x, self.t, self.users, self.history, self.relevance = (
                x, steps, users, history, relevance)
            return
        # Out of place: tensors handed out by earlier steps stay as they were.
        self.x = self.x.index_put((rows,), x)
        self.t = self.t.index_put((rows,), steps)
        self.users = self.users.index_put((rows,), users)
        self.history = self.history.index_put((rows,), history)
        self.relevance = self.relevance.index_put((rows,), relevance)

    def _history_entries(self, users: Tensor) -> tuple[np.ndarray, Tensor]:
        """Indices into the CSR arrays of every training interaction of ``users`` (k,), row by
        row in CSR order, and each row's count (k,) on the core's device: O(nnz), the only read
        of the sparse matrix per reset."""
        users_np = users.cpu().numpy()
        starts = self.train.indptr[users_np]
        counts = self.train.indptr[users_np + 1] - starts
        entries = np.arange(counts.sum()) + np.repeat(starts - (np.cumsum(counts) - counts),
                                                      counts)
        return entries, torch.from_numpy(counts.astype(np.int64)).to(self.device)

    def _hidden(self, entries: np.ndarray, row_of: Tensor, counts: Tensor,
                generator: torch.Generator) -> Tensor:
        """Which of the ``entries`` (their rows ``row_of``) the holdout hides, a bool mask.

        Random: one uniform draw per interaction (not per item). Temporal: no draw.
        """
        if self.holdout == "random":
            return torch.rand(len(entries), generator=generator,
                              device=self.device) < self.holdout_fraction
        position = torch.from_numpy(self._order[entries]).to(self.device)
        n_hidden = torch.minimum(torch.round(self.holdout_fraction * counts), counts - 1)
        return position > (counts - n_hidden)[row_of]  # empty rows have no entries to index

    @staticmethod
    def _hide(full: Tensor, row_of: Tensor, item_of: Tensor) -> tuple[Tensor, Tensor]:
        """Split rows ``full`` (k, n) into (visible history, hidden target), both (k, n), hiding
        the interactions (``row_of``, ``item_of``)."""
        target = torch.zeros_like(full).index_put_((row_of, item_of), full.new_ones(()))
        history = full.index_put((row_of, item_of), full.new_zeros(()))
        return history, target

    def step(self, action: Tensor) -> StepResult:
        """Apply actions (B, n): x <- clip(action), t <- t - 1; reward rows that reach t = 0.

        Raises on a wrong shape, a non-float dtype, NaN or infinite values, or a row that has
        already terminated (reset it first). Finite values outside +-ACTION_BOUND are clipped.
        An in-bounds float32 ``action`` becomes the state itself (no copy): the caller must not
        modify it in place afterwards.
        """
        if action.shape != self.x.shape:
            raise ValueError(f"action shape {tuple(action.shape)} != expected "
                             f"{tuple(self.x.shape)} (num_rows, n_items)")
        if not action.is_floating_point():
            raise TypeError(f"actions must be floating point, got {action.dtype}")
        if self.t.min().item() <= 0:
            raise RuntimeError("step() on a terminated episode: call reset() first (reset_rows "
                               "on the torch core)")
        low, high = (v.item() for v in torch.aminmax(action))  # NaN and inf propagate into it
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("actions contain NaN or infinite values; the denoiser diverged or "
                             "an agent produced invalid output")
        action = action.to(self.device, torch.float32)
        if low < -ACTION_BOUND or high > ACTION_BOUND:
            action = action.clamp(-ACTION_BOUND, ACTION_BOUND)
        self.x = action  # taken as the next state without a copy: do not modify it in place
        self.t = self.t - 1
        terminated = self.t == 0
        if bool(terminated.all()):  # the usual case: rows started together
            reward = self.reward(self.x, self.relevance, self.history)
        else:
            reward = torch.zeros(self.num_rows, device=self.device)
            if bool(terminated.any()):
                done = terminated.nonzero().squeeze(-1)
                reward[done] = self.reward(self.x[done], self.relevance[done], self.history[done])
        return StepResult(self.x, self.t, reward, terminated)

    def denoiser_timestep(self) -> Tensor:
        """The chain step t - 1 (in [0, T)) of each row's next reverse step."""
        return (self.t - 1).clamp(min=0)

    def backbone_batch(self) -> dict[str, Tensor]:
        """The rows' episode inputs as a backbone batch (what ``Backbone.encode`` reads)."""
        return {"history": self.history}

