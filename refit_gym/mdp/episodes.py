"""Episode sources: each scenario's half of the denoising MDP.

A source says where an episode's chain starts (x_K), what the backbone reads as the episode's
input, which items are the reward's target, which items the input already shows (masked from
rankings) and how a final state becomes item scores. The core (:mod:`refit_gym.mdp.core`)
steps any source's episodes the same way. Only training data ever enters a source.

- :class:`InteractionEpisodes` (collaborative filtering, DiffRec): an episode is a user; x_K is
  the training history h_u (or a draw of q(x_k | h_u)), optionally with part of it held out as
  the target; the scores are x_0 itself, history masked.
- :class:`SequenceEpisodes` (sequential, DreamRec): an episode is a training row (history, next
  item); x_K ~ N(0, I); the target is the next item; the scores are x_0 E^T over the frozen
  item-embedding table E of the pretrained backbone; nothing is masked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from gymnasium import spaces
from torch import Tensor

from refit_gym.data import SequenceData
from refit_gym.diffusion import GaussianDiffusion

HOLDOUTS = ("random", "temporal")


@dataclass
class EpisodeStart:
    """The first state of k episodes, on the source's device."""

    x: Tensor  # (k, d) x_K
    inputs: dict[str, Tensor]  # per-row backbone inputs (what ``Backbone.encode`` reads)
    target: Tensor  # (k, n_items) float, the reward's target items y


class EpisodeSource(ABC):
    """Starts episodes of one scenario and scores their final states."""

    n_episodes: int  # distinct episode ids: users (CF) or training rows (sequential)
    n_items: int
    state_dim: int
    chain: GaussianDiffusion  # the K-step reverse chain an episode walks
    device: torch.device

    @abstractmethod
    def start(self, episodes: Tensor, generator: torch.Generator) -> EpisodeStart:
        """Start episodes ``episodes`` (k,) long; every draw comes from ``generator``."""

    @abstractmethod
    def scores(self, x0: Tensor) -> Tensor:
        """Item scores (B, n_items) of final states x0 (B, d)."""

    @abstractmethod
    def visible(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """(B, n_items) items the inputs already show, masked from rankings; None: none."""

    @abstractmethod
    def empty_inputs(self, rows: int) -> dict[str, Tensor]:
        """Placeholder inputs of ``rows`` not-yet-started rows."""

    def input_spaces(self) -> dict[str, spaces.Space]:
        """Observation entries beside ``x`` and ``t`` that expose the inputs to a policy."""
        return {}


class InteractionEpisodes(EpisodeSource):
    """Users of a training matrix ``train`` (n_users, n_items) as DiffRec episodes."""

    def __init__(self, train: sp.csr_matrix, chain: GaussianDiffusion, *,
                 sampling_steps: int = 0, holdout_fraction: float = 0.0,
                 holdout: str = "random", order: sp.csr_matrix | None = None,
                 device: torch.device | str = "cpu") -> None:
        """``holdout``: "random" hides each interaction with probability ``holdout_fraction``;
        "temporal" hides each user's latest round(fraction * n_u) interactions (at most
        n_u - 1) by ``order``, the chronological positions of ``train``'s entries
        (:attr:`refit_gym.data.InteractionData.train_order`)."""
        if not 0 <= sampling_steps <= chain.steps:
            raise ValueError(f"sampling_steps must be in [0, {chain.steps}], "
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
        self.chain, self.device = chain, torch.device(device)
        self.sampling_steps, self.holdout_fraction = sampling_steps, holdout_fraction
        self.n_episodes, self.n_items = self.train.shape
        self.state_dim = self.n_items

    def start(self, episodes: Tensor, generator: torch.Generator) -> EpisodeStart:
        users = episodes
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
            x = self.chain.q_sample(x, t, noise)
        return EpisodeStart(x, {"history": history}, target)

    def scores(self, x0: Tensor) -> Tensor:
        return x0

    def visible(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["history"]

    def empty_inputs(self, rows: int) -> dict[str, Tensor]:
        return {"history": torch.zeros(rows, self.n_items, device=self.device)}

    def _history_entries(self, users: Tensor) -> tuple[np.ndarray, Tensor]:
        """Indices into the CSR arrays of every training interaction of ``users`` (k,), row by
        row in CSR order, and each row's count (k,) on the device: O(nnz), the only read of the
        sparse matrix per reset."""
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


class SequenceEpisodes(EpisodeSource):
    """Training rows of ``data`` (its held-out latest rows, if it has them) as DreamRec
    episodes, scored with the frozen table E."""

    def __init__(self, data: SequenceData, chain: GaussianDiffusion, item_embeddings: Tensor,
                 device: torch.device | str = "cpu") -> None:
        if item_embeddings.shape[0] != data.n_items:
            raise ValueError(f"the item-embedding table has {item_embeddings.shape[0]} rows but "
                             f"the dataset has {data.n_items} items; use a checkpoint of the "
                             "same environment")
        self.device = torch.device(device)
        self.chain = chain
        self.embeddings = item_embeddings.detach().to(self.device, torch.float32)
        split = data.episode_split
        self.histories = torch.from_numpy(data.histories[split]).to(self.device)
        self.targets = torch.from_numpy(data.targets[split]).to(self.device)
        self.n_episodes, self.n_items = len(data.targets[split]), data.n_items
        self.state_dim = self.embeddings.shape[1]

    def start(self, episodes: Tensor, generator: torch.Generator) -> EpisodeStart:
        x = torch.randn((len(episodes), self.state_dim), generator=generator, device=self.device)
        target = torch.zeros(len(episodes), self.n_items, device=self.device)
        # The tables stay in the data's narrow id type (int16 indexes nothing): int64 per batch.
        target[torch.arange(len(episodes), device=self.device), self.targets[episodes].long()] = 1.0
        return EpisodeStart(x, {"history": self.histories[episodes].long()}, target)

    def scores(self, x0: Tensor) -> Tensor:
        return x0 @ self.embeddings.T

    def visible(self, inputs: dict[str, Tensor]) -> None:
        return None

    def empty_inputs(self, rows: int) -> dict[str, Tensor]:
        return {"history": torch.full((rows, self.histories.shape[1]), self.n_items,
                                      dtype=torch.long, device=self.device)}

    def input_spaces(self) -> dict[str, spaces.Space]:
        length = self.histories.shape[1]
        return {"history": spaces.MultiDiscrete(np.full(length, self.n_items + 1))}
