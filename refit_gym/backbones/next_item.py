"""What the next-item backbones (DreamRec, ADRec) share: the state is an embedding of the item to
recommend next, x_K ~ N(0, I), and a final state is scored against the item table E."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from refit_gym.backbones.base import Backbone, Batch
from refit_gym.diffusion import GaussianDiffusion


def last_positions(history: Tensor, pad: int) -> Tensor:
    """(B,) index of each right-padded (B, L) history's latest item (0 for an empty one)."""
    return ((history != pad).sum(1) - 1).clamp(min=0)


def every_position_targets(history: Tensor, target: Tensor, last: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """The next item at every position of right-padded histories (B, L) with their targets
    (B,) and :func:`last_positions` ``last`` (B,): (targets (B, L), has_target (B, L) bool).
    Position j's target is the history's item j + 1, the row's target at its latest item;
    positions after it have none. Position j of the history then carries the pair "its items
    up to j -> the next item" (a sequence's first j + 1 items while the window is not
    truncated)."""
    targets = torch.roll(history, -1, dims=1)
    targets[torch.arange(len(history), device=history.device), last] = target
    positions = torch.arange(history.shape[1], device=history.device)
    return targets, positions[None] <= last[:, None]


class NextItemBackbone(Backbone):
    """A backbone over item-embedding states of size ``config.hidden`` whose ``item_embeddings``
    table has ``config.n_items + 1`` rows, the last one padding histories."""

    sequential: ClassVar[bool] = True
    item_embeddings: nn.Embedding

    @property
    def state_dim(self) -> int:
        return self.config.hidden

    @property
    def n_items(self) -> int:
        return self.config.n_items

    def item_table(self) -> Tensor:
        """E (n_items, d): the embeddings of the rankable items (padding excluded)."""
        return self.item_embeddings.weight[: self.config.n_items]

    def freeze_for_finetuning(self) -> NextItemBackbone:
        """E stays as pretrained: the sequential environment scores x_0 E^T with it."""
        self.item_embeddings.weight.requires_grad_(False)
        return self

    def initial_state(self, batch: Batch, chain: GaussianDiffusion,
                      generator: torch.Generator | None) -> Tensor:
        """x_K ~ N(0, I) (B, d), drawn on the generator's device."""
        rows, device = len(batch["history"]), self.item_embeddings.weight.device
        return torch.randn((rows, self.config.hidden), generator=generator,
                           device=device if generator is None else generator.device).to(device)

    def scores(self, x0: Tensor) -> Tensor:
        return x0 @ self.item_table().T
