"""Draws keyed by the row, not by the batch: a stochastic backbone evaluated on rows of a split
gives each row the same x_K and per-step noise whatever the batch size, the batch the row
falls in or the process that evaluates it.

Rows are grouped in fixed blocks of :data:`ROW_BLOCK` consecutive row indices. Block b of
sampling seed s has its own generator (seeded from (s, b)), which draws, in this order, the
initial state of all ``ROW_BLOCK`` rows of the block and then, for each noisy step, a
(``ROW_BLOCK``, d) noise tensor; a row takes the draws at its place in its block. A batch that
holds part of a block still draws the whole block (at most two partial blocks per batch), so
the stream of every block, and so every row's draws, never depend on the batching.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

ROW_BLOCK = 1024  # part of the draws' definition: changing it changes every seeded result


def block_seed(seed: int, block: int) -> int:
    """The generator seed of row block ``block`` under sampling seed ``seed`` (any ints >= 0)."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0])


class RowNoise:
    """The draws of the rows ``rows`` (B,) (global row indices, distinct) under ``seed``."""

    def __init__(self, seed: int, rows: Tensor, device: torch.device | str) -> None:
        rows = rows.long().cpu()
        blocks = torch.unique(rows // ROW_BLOCK)  # sorted
        self.generators = [torch.Generator(device).manual_seed(block_seed(seed, int(b)))
                           for b in blocks]
        self.device = torch.device(device)
        # Each row's place in the concatenation of its blocks' draws.
        block_index = torch.searchsorted(blocks, rows // ROW_BLOCK)
        self.place = (block_index * ROW_BLOCK + rows % ROW_BLOCK).to(self.device)

    def initial_state(self, batch: dict[str, Tensor],
                      draw: Callable[[dict[str, Tensor], torch.Generator], Tensor]) -> Tensor:
        """x_K (B, d): ``draw(block_batch, generator)`` (a backbone's ``initial_state``) on each
        block padded to ``ROW_BLOCK`` rows, each batch row at its place in the block (the other
        places repeat the batch's first row: their draws are made and dropped). ``draw`` must
        draw row by row in order, the same amount whatever the rows hold."""
        parts = []
        for i, generator in enumerate(self.generators):
            in_block = (self.place >= i * ROW_BLOCK) & (self.place < (i + 1) * ROW_BLOCK)
            source = torch.zeros(ROW_BLOCK, dtype=torch.long, device=self.device)
            source[self.place[in_block] - i * ROW_BLOCK] = in_block.nonzero().squeeze(1)
            parts.append(draw({k: v[source.to(v.device)] for k, v in batch.items()}, generator))
        return torch.cat(parts)[self.place.to(parts[0].device)]

    def randn(self, width: int, dtype: torch.dtype) -> Tensor:
        """Standard normal noise (B, width), each row from its block's next (ROW_BLOCK, width)."""
        parts = [torch.randn((ROW_BLOCK, width), generator=g, device=self.device, dtype=dtype)
                 for g in self.generators]
        return torch.cat(parts)[self.place]
