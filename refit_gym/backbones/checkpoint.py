"""Backbone checkpoints: a state_dict plus JSON-able configs, written atomically.

Loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code. It records the
backbone's kind, its config and its diffusion schedule, so it rebuilds without its spec.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from refit_gym.backbones.base import Backbone
from refit_gym.backbones.registry import BACKBONES, backbone_from_configs
from refit_gym.data.fileio import atomic_path

CHECKPOINT_FORMAT = "refit-gym/backbone-v1"
PAYLOAD_KEYS = ("backbone", "config", "diffusion", "state_dict")
# What torch.load raises on bytes that are no PyTorch file (a text file: KeyError; random bytes:
# any of these), besides the unpickler's own refusals.
UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
              KeyError, IndexError, struct.error)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the environment it is used with."""


def backbone_configs(backbone: Backbone) -> dict[str, Any]:
    """The JSON-able description that :func:`backbone_from_configs` rebuilds ``backbone`` from."""
    return {"backbone": backbone.name, "config": dataclasses.asdict(backbone.config),
            "diffusion": dataclasses.asdict(backbone.diffusion.config)}


def save_backbone(path: str | os.PathLike[str], backbone: Backbone, env_id: str,
                  **extra: Any) -> Path:
    """Write ``backbone`` (weights + configs) and JSON-able ``extra`` metadata to ``path``."""
    payload = {
        "format": CHECKPOINT_FORMAT, "env_id": env_id, **backbone_configs(backbone),
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "extra": extra,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        # Through a file object the archive is named "archive", not after the temporary file:
        # the same weights and metadata give the same bytes, so the checksum that fine-tuning
        # runs record still matches after a finished pretraining is run again.
        torch.save(payload, file)
    return Path(path)


def default_checkpoint(env_id: str, seed: int = 1) -> Path:
    """Where ``refit-gym pretrain --env ID --seed S`` writes its backbone by default: a path
    relative to the current directory (the sequential ids look there unless given one)."""
    return Path("runs") / env_id / f"pretrain-seed{seed}" / "denoiser.pt"


def pretrain_hint(env_id: str, path: Path) -> str:
    """How to make the checkpoint ``path`` names: ``--out`` its folder, then pass that path."""
    return (f"`refit-gym pretrain --env {env_id} --out {path.parent}` writes "
            f"{path.parent / 'denoiser.pt'}: pass that path")


def read_checkpoint(path: str | os.PathLike[str], env_id: str | None = None) -> dict[str, Any]:
    """The raw payload of a refit-gym checkpoint, with a clear error for anything else
    (``env_id``: the environment it is for, named in the hint when there is no file)."""
    path = Path(path)
    if not path.is_file():
        env = env_id or "ID"
        raise CheckpointError(
            f"checkpoint {path} not found; {pretrain_hint(env, path)} (without --out, "
            f"--seed 1 writes {default_checkpoint(env)})"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(err).__name__}: "
            f"{first_line}); pass a .pt written by `refit-gym pretrain` or `finetune`, or "
            "delete it and re-run the command that wrote it"
        ) from err
    missing = ([] if not isinstance(payload, dict) else
               [key for key in PAYLOAD_KEYS if key not in payload])
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or missing:
        raise CheckpointError(
            f"{path} is not a refit-gym backbone checkpoint (expected format "
            f"{CHECKPOINT_FORMAT!r} with keys {list(PAYLOAD_KEYS)}); pass a .pt written by "
            "`refit-gym pretrain` or `finetune`"
        )
    if payload.get("backbone") not in BACKBONES:
        raise CheckpointError(f"{path}: unknown backbone {payload.get('backbone')!r}; known: "
                              f"{sorted(BACKBONES)}")
    return payload


def load_backbone(
    path: str | os.PathLike[str], n_items: int | None = None,
    device: torch.device | str = "cpu", env_id: str | None = None,
) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild the backbone of a checkpoint; ``n_items`` checks it fits the dataset; ``env_id``
    (the environment it is for) is named in the hint when there is no file. Whether it fits
    an environment's spec: :meth:`refit_gym.specs.EnvSpec.load_backbone`."""
    payload = read_checkpoint(path, env_id)
    backbone = backbone_from_configs(payload)
    if n_items is not None and backbone.n_items != n_items:
        raise CheckpointError(
            f"checkpoint {path} was trained on {backbone.n_items} items (env "
            f"{payload.get('env_id')}) but this dataset has {n_items}; use a checkpoint of the "
            "same environment"
        )
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from err
    return backbone.to(device), payload
