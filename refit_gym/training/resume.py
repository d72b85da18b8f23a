"""What a resumable run writes and reads back: its state file (rank 0 writes it atomically; a
file of another run or a corrupt one is refused with a clear error), every rank's random
state, and seeds derived from a place in the run so that a resumed run draws what the
uninterrupted one would have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from refit_gym.backbones import CheckpointError
from refit_gym.data import Dataset, atomic_path
from refit_gym.distributed import Distributed, current
from refit_gym.training.identity import describe_difference


def seed_for(seed: int, *place: int) -> int:
    """A seed for a place in a run (an epoch; an epoch, batch and chunk; a rank), so a resumed
    run regenerates the same user order and a chunk the same draws wherever it is rolled out."""
    return int(np.random.SeedSequence([seed, *place]).generate_state(1)[0])


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with its ``identity``) to ``path`` atomically, on rank 0 only: every
    rank holds the same state."""
    if current().is_main:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(payload, file)  # a file object: the bytes do not depend on tmp's name


def held_out(data: Dataset) -> dict[str, str]:
    """The part of a run's identity that says its training rows are not the whole training
    split (:meth:`refit_gym.data.SequenceData.hold_out_latest`); empty otherwise, so the states
    of runs on the whole split, written before the key existed, still resume."""
    return {} if data.episode_split == "train" else {"episodes": data.episode_split}


def load_state(path: Path, identity: dict[str, Any], run: str,
               map_location: torch.device | str | None = "cpu") -> dict[str, Any] | None:
    """The state at ``path`` if it belongs to the run ``identity`` describes; None if there is
    none. ``run`` names the kind of run in the errors (e.g. "fine-tuning"). Tensors load onto
    ``map_location`` (default the CPU, so a state written on a GPU resumes on a machine without
    one; ``load_state_dict`` then copies them onto the model's device; None: where they were
    saved)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as err:
        raise CheckpointError(f"resume state {path} is corrupt ({err}); delete it to start the "
                              f"{run} over") from err
    if (difference := describe_difference(payload["identity"], identity)) is not None:
        raise CheckpointError(f"{path.parent} holds another {run} run's state ({difference}); "
                              "use another --out folder, or delete it to start over")
    return payload


def gather_random_states(dist: Distributed, noise: torch.Generator | None) -> Tensor:
    """(world_size, n) uint8: each rank's global torch RNG state (dropout) and ``noise``
    state. A collective: every rank calls it."""
    own = torch.get_rng_state()
    if noise is not None:
        own = torch.cat([own, noise.get_state()])
    return dist.gather_rows(own.unsqueeze(0))


def restore_random_states(states: Tensor, dist: Distributed,
                          noise: torch.Generator | None) -> None:
    """Undo :func:`gather_random_states` on this rank."""
    own, n = states[dist.rank], torch.get_rng_state().numel()
    torch.set_rng_state(own[:n].clone())
    if noise is not None:
        noise.set_state(own[n:].clone())
