"""Backbones by name, and building one from its configs (a spec's or a checkpoint's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refit_gym.backbones.adrec import ADRec, ADRecConfig
from refit_gym.backbones.adrec_concat import ConcatADRec, ConcatADRecConfig
from refit_gym.backbones.base import Backbone
from refit_gym.backbones.diffrec import DiffRec, DiffRecConfig
from refit_gym.backbones.dreamrec import DreamRec, DreamRecConfig
from refit_gym.diffusion import DiffusionConfig

BACKBONES: dict[str, tuple[type[Backbone], type]] = {
    ADRec.name: (ADRec, ADRecConfig),
    ConcatADRec.name: (ConcatADRec, ConcatADRecConfig),
    DiffRec.name: (DiffRec, DiffRecConfig),
    DreamRec.name: (DreamRec, DreamRecConfig),
}


def backbone_config(kind: str, fields: Mapping[str, Any]) -> Any:
    """The config dataclass of backbone ``kind`` from ``fields`` (lists become tuples)."""
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; known: {sorted(BACKBONES)}")
    config_type = BACKBONES[kind][1]
    allowed = set(config_type.__dataclass_fields__)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"backbone {kind!r}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def backbone_from_configs(payload: Mapping[str, Any]) -> Backbone:
    """A freshly initialised backbone from ``{"backbone", "config", "diffusion"}``."""
    cls = BACKBONES[payload["backbone"]][0]
    return cls(backbone_config(payload["backbone"], payload["config"]),
               DiffusionConfig(**payload["diffusion"]))
