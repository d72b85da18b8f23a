"""A FLOP floor for ReFiT fine-tuning: the floating-point operations of one update and of a run,
counted from the backbone and the agent's settings, and the least time they take at a device's
peak rate (issue 30 item 5).

What is counted: the matrix products of the backbone's own code (``encode``, ``predict_x0``,
``scores``), measured with PyTorch's ``FlopCounterMode`` per row and scaled to a batch's rows (a
product's FLOPs are linear in its rows): on a probe batch of a few rows, or for a run's floor
on the id's own training rows (:func:`training_row_flops`: ADRec's encoder trims short
histories, so full-length probes overstate it); a backward as twice its forward; and one
operation per item for the reward on each trajectory's scores. Elementwise work
(the posterior step, the float64 log-probabilities, the reward's top-k and its relevance targets,
computed once per reset) is memory-bound and left out, so the count is a floor, not a forecast.

One ReFiT update of R = U users x G trajectories on a K-step chain:

    rollout  encode(R) (+ the reference's, with a KL term)
             + the K steps' forwards: R rows each, or U on the steps before the first
               exploring one when every trajectory of a user starts from the same x_K
               (the agent's shared prefix)
    reward   scores(R) + R n_items
    update   update_epochs x [3 (encode(R) + trained steps x forward(R))
                              (+ trained steps x the reference's forward(R), with a KL term)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from refit_gym.backbones import Backbone
from refit_gym.backbones.base import Batch
from refit_gym.data import Dataset, SequenceData
from refit_gym.rl.refit_agent import ReFiTConfig, check_precision

# Dense peak rates in TFLOP/s by precision, from NVIDIA's datasheets (their tensor-core figures
# "with sparsity" halved); "fp32" is plain FP32 (PyTorch's default: TF32 off). Keys are matched
# in order as substrings of torch.cuda.get_device_name (an H100 SXM reports "H100 80GB HBM3").
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    ("H100 80GB HBM3", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    ("H100 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
)


def peak_tflops(device: str, precision: str = "fp32") -> float | None:
    """The dense peak (TFLOP/s) of the device named ``device`` at ``precision``; None for a
    device not in :data:`PEAK_TFLOPS` (a CPU among them)."""
    check_precision(precision)
    for key, rates in PEAK_TFLOPS:
        if key in device:
            return rates[precision]
    return None


@dataclass(frozen=True)
class RowFlops:
    """Matmul FLOPs of one trajectory (row) through each part of a backbone."""

    encode: float  # the condition c, once per trajectory (0 for an unconditioned backbone)
    step: float  # one predict_x0 (guidance included)
    scores: float  # x_0's scores against the items
    n_items: int
    conditioned: bool  # encode returns a condition (the shared prefix needs none)


def probe_batch(model: Backbone, rows: int) -> Batch:
    """A backbone batch of ``rows`` episodes: for a sequential backbone a full-length history
    each (its encoder's largest cost, an upper bound for ADRec, which trims short histories:
    :func:`training_row_flops` counts an id's own rows), else an interaction row."""
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_len", None)
    if max_len is None:
        return {"history": torch.zeros(rows, model.n_items, device=device)}
    items = torch.arange(rows * max_len, device=device).remainder(model.n_items)
    return {"history": items.view(rows, max_len)}


def _matmul_flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@torch.no_grad()
def row_flops(model: Backbone, batch: Batch | None = None) -> RowFlops:
    """Per-row FLOPs of ``model``'s parts, measured on ``batch`` (default: two rows of
    :func:`probe_batch`) and divided by its rows."""
    batch = probe_batch(model, 2) if batch is None else batch
    rows = len(next(iter(batch.values())))
    condition = model.encode(batch)
    device = next(model.parameters()).device
    x = torch.zeros(rows, model.state_dim, device=device)
    t = torch.zeros(rows, dtype=torch.long, device=device)
    return RowFlops(encode=_matmul_flops(lambda: model.encode(batch)) / rows,
                    step=_matmul_flops(lambda: model.predict_x0(x, t, condition)) / rows,
                    scores=_matmul_flops(lambda: model.scores(x)) / rows,
                    n_items=model.n_items, conditioned=condition is not None)


@torch.no_grad()
def training_row_flops(model: Backbone, data: Dataset) -> RowFlops:
    """Per-row FLOPs of ``model``'s parts, averaged over ``data``'s training rows (the episodes
    a run draws). A row of interactions (dense) costs what any does: :func:`row_flops` of the
    probe. A sequential row's encoder work depends on its history's length alone (ADRec encodes
    each group of similar lengths trimmed to the group's width, DreamRec every position), so
    the encoder is measured on one row of each length present and weighted by that length's
    count: the rows' exact mean in at most L + 1 one-row passes."""
    if not isinstance(data, SequenceData):
        return row_flops(model)
    lengths = (data.histories["train"] != data.n_items).sum(1)
    _, first, counts = np.unique(lengths, return_index=True, return_counts=True)
    rows = data.batch("train", first, next(model.parameters()).device)["history"]  # (lengths, L)
    encode = sum(count * _matmul_flops(lambda row=row: model.encode({"history": row[None]}))
                 for row, count in zip(rows, counts.tolist(), strict=True))
    return replace(row_flops(model, {"history": rows}), encode=encode / data.n_train_rows)


@dataclass(frozen=True)
class UpdateFlops:
    """FLOPs of one ReFiT update (one batch), by phase."""

    rollout: float
    reward: float
    update: float

    @property
    def total(self) -> float:
        return self.rollout + self.reward + self.update


def refit_update_flops(row: RowFlops, config: ReFiTConfig, users: int, chain_steps: int, *,
                       shared_start: bool) -> UpdateFlops:
    """FLOPs of one update on ``users`` episodes x ``config.group_size`` trajectories over a
    ``chain_steps``-step chain. ``shared_start``: every trajectory of a user starts from the same
    x_K (a CF history without start noise), so an unconditioned backbone's rollout computes one
    row per user until the first exploring step."""
    rows = users * config.group_size
    references = 1 if config.kl_coef > 0 else 0
    shared = shared_start and not row.conditioned
    step_rows = 0
    for step in reversed(range(chain_steps)):  # the rollout's order
        shared = shared and not config.explores(step)
        step_rows += users if shared else rows
    trained = sum(config.trains(step) for step in range(chain_steps))
    update = config.update_epochs * rows * (3 * (row.encode + trained * row.step)
                                            + references * trained * row.step)
    return UpdateFlops(rollout=(1 + references) * row.encode * rows + row.step * step_rows,
                       reward=(row.scores + row.n_items) * rows, update=update)


def refit_run_flops(row: RowFlops, config: ReFiTConfig, n_episodes: int, chain_steps: int, *,
                    shared_start: bool) -> float:
    """FLOPs of a whole run: ``config.epochs`` passes over ``users_per_epoch`` (0: all
    ``n_episodes``) episodes in batches of ``users_per_batch``, the last one smaller."""
    per_epoch = min(config.users_per_epoch or n_episodes, n_episodes)
    full, rest = divmod(per_epoch, config.users_per_batch)

    def batch(users: int) -> float:
        return refit_update_flops(row, config, users, chain_steps,
                                  shared_start=shared_start).total if users else 0.0

    return config.epochs * (full * batch(config.users_per_batch) + batch(rest))
