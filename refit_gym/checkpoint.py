"""Denoiser checkpoints: a state_dict plus a JSON-able config, written atomically.

Loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from refit_gym.denoiser import DenoiserConfig, MLPDenoiser
from refit_gym.fileio import atomic_path

CHECKPOINT_FORMAT = "refit-gym/denoiser-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the environment it is used with."""


def save_denoiser(
    path: str | os.PathLike[str], denoiser: MLPDenoiser, env_id: str, **extra: Any
) -> Path:
    """Write ``denoiser`` (weights + config) and JSON-able ``extra`` metadata to ``path``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "env_id": env_id,
        "denoiser_config": dataclasses.asdict(denoiser.config),
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.state_dict().items()},
        "extra": extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw payload of a refit-gym checkpoint, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; create one with `refit-gym pretrain --env <id>`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(err).__name__}: "
            f"{str(err)[:200]}); delete it and re-run the command that wrote it"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a refit-gym denoiser checkpoint (expected format "
            f"{CHECKPOINT_FORMAT!r}); pass a .pt written by `refit-gym pretrain` or `finetune`"
        )
    return payload


def load_denoiser(
    path: str | os.PathLike[str], n_items: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[MLPDenoiser, dict[str, Any]]:
    """Rebuild the denoiser of a checkpoint; ``n_items`` checks it fits the dataset."""
    payload = read_checkpoint(path)
    config = payload["denoiser_config"]
    config = DenoiserConfig(**{**config, "dims": tuple(config["dims"])})
    if n_items is not None and config.n_items != n_items:
        raise CheckpointError(
            f"checkpoint {path} was trained on {config.n_items} items (env "
            f"{payload.get('env_id')}) but this dataset has {n_items}; use a checkpoint of the "
            "same environment"
        )
    denoiser = MLPDenoiser(config)
    try:
        denoiser.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from err
    return denoiser.to(device), payload
