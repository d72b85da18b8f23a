"""Where a process runs: its device, and under ``torchrun`` (DESIGN 11) the process group and
its few collectives.

A command started by ``torchrun --nproc_per_node N ...`` finds ``WORLD_SIZE`` and ``RANK`` in its
environment; :func:`init_from_environment` then joins the process group (gloo on CPU, NCCL on
CUDA, each rank on GPU ``LOCAL_RANK``) with a timeout on every collective, and :func:`current`
returns the group's :class:`Distributed` everywhere in the package. Without ``torchrun`` it is the
single-process group: every collective is the identity, so single-process code paths pay nothing.

Who does what: each rank rolls out, trains on and evaluates its share of every batch; gradients
and metric sums are summed across ranks, so every rank holds the same weights and the same
numbers, and rank 0 alone writes files. A rank that dies makes the others' next collective fail
(gloo sees the closed connection, NCCL the timeout) with :class:`DistributedError`, not a hang.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for a silent rank; REFIT_DIST_TIMEOUT
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, timed out or disagreed."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size`` (1: no group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, results, logs and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of ``items``: every ``world_size``-th one from ``rank`` on."""
        return items[self.rank :: self.world_size]

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place; returns it (on the group's device: CUDA for
        NCCL)."""
        if self.active:
            self._collective("all_reduce", dist.all_reduce, tensor)
        return tensor

    def sum_floats(self, values: Iterable[float]) -> list[float]:
        """Sums over ranks of a few Python numbers, in one float64 reduction."""
        values = list(values)
        if not self.active:
            return values
        return self.sum_(torch.tensor(values, dtype=torch.float64,
                                      device=self._device())).tolist()

    def max_float(self, value: float) -> float:
        """The largest of every rank's ``value``: a quantity all ranks must agree on."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        self._collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``parameters`` (one dtype) over ranks in one all-reduce. A
        parameter without a gradient on every rank keeps none, as one process would leave it
        (an optimiser then skips it, weight decay included)."""
        params = [p for p in parameters if p.requires_grad]
        if not self.active or not params:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in params],
                                dtype=params[0].dtype, device=params[0].device)
        flat = self.sum_(torch.cat([*((torch.zeros_like(p) if p.grad is None else p.grad)
                                      .reshape(-1) for p in params), has_grad]))
        offset = 0
        for p, any_rank in zip(params, flat[-len(params):].tolist(), strict=True):
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone() if any_rank else None
            offset += p.numel()

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` (n_r, ...) in rank order; sizes may differ."""
        if not self.active:
            return tensor
        device = self._device()
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=device)
        sizes[self.rank] = len(tensor)
        self.sum_(sizes)
        padded = tensor.new_zeros((int(sizes.max()), *tensor.shape[1:]), device=device)
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("all_gather", dist.all_gather, parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes.tolist(), strict=True)]
                         ).to(tensor.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.active:
            return value
        box = [value]
        self._collective("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            self._collective("barrier", dist.barrier)

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _collective(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        global _communication_s
        started = time.perf_counter()
        try:
            fn(*args, **kwargs)
            _communication_s += time.perf_counter() - started
        except (RuntimeError, ValueError) as err:  # torch's DistBackendError is a RuntimeError
            raise DistributedError(
                f"{name} failed on rank {self.rank} of {self.world_size} ({err}); another rank "
                "probably died or timed out. Rerun the same command to resume from the last "
                "checkpoint.") from err


_current = Distributed()
_communication_s = 0.0


def communication_seconds() -> float:
    """Seconds this process has spent in collectives: transfers and waiting for the slowest
    rank (a clock to read before and after the work measured)."""
    return _communication_s


def current() -> Distributed:
    """The process group this process belongs to (single-process unless initialised)."""
    return _current


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when a GPU is available, else the CPU; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str, timeout_s: float | None = None) -> tuple[Distributed,
                                                                                 str]:
    """Join the ``torchrun`` group when launched by it (else stay single-process).

    Returns the group and this rank's device (``device`` resolved by :func:`resolve_device`):
    the CPU as named, or ``cuda:LOCAL_RANK`` for CUDA. Collectives time out after
    ``timeout_s`` (default ``$REFIT_DIST_TIMEOUT`` or 600 s).
    """
    global _current
    device = resolve_device(device)
    if not launched_by_torchrun() or _current.active:
        return _current, device
    if timeout_s is None:
        timeout_s = float(os.environ.get("REFIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    _current = Distributed(dist.get_rank(), dist.get_world_size())
    return _current, device


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Distributed()
