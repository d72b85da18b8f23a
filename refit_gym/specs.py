"""Environment specs: the single source of each registered id's defaults (envs/*.toml).

The TOML files sit in the top-level ``envs/`` folder of the source tree and ship inside the wheel
as the ``refit_gym.envs`` package, so :func:`load_env_spec` reads them the same way from both.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from refit_gym.denoiser import DenoiserConfig
from refit_gym.diffusion import DiffusionConfig


@dataclass(frozen=True)
class PretrainConfig:
    """DiffRec's training protocol (DESIGN section 2; DiffRec's main.py)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 400
    reweight: bool = True  # weight the x0-MSE of step t by SNR(t-1) - SNR(t)
    importance_sampling: bool = True  # sample t by the running loss (10 per step, as DiffRec)
    eval_every: int = 5  # epochs between validation passes
    patience: int = 20  # stop when this many epochs passed since the best validation Recall@20
    max_epochs: int = 1000
    eval_batch_size: int = 1024  # users per reverse chain at evaluation (does not change results)


@dataclass(frozen=True)
class EnvSpec:
    """Everything an environment id fixes: data, diffusion schedule, backbone, training, MDP."""

    id: str
    dataset: dict[str, Any]
    diffusion: DiffusionConfig
    denoiser: dict[str, Any]  # DenoiserConfig fields except n_items, which comes from the data
    pretrain: PretrainConfig
    env: dict[str, Any] = field(default_factory=dict)

    def denoiser_config(self, n_items: int) -> DenoiserConfig:
        return DenoiserConfig(n_items=n_items, **self.denoiser)


class SpecError(ValueError):
    """An environment id is unknown or its spec file is malformed."""


def _build(cls: type, section: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise SpecError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    return cls(**section)


def _parse(raw: dict[str, Any], source: str) -> EnvSpec:
    missing = [k for k in ("id", "dataset", "diffusion", "denoiser", "pretrain") if k not in raw]
    if missing:
        raise SpecError(f"{source}: missing sections {missing}")
    denoiser_fields = {f.name for f in dataclasses.fields(DenoiserConfig)} - {"n_items"}
    unknown = sorted(set(raw["denoiser"]) - denoiser_fields)
    if unknown:
        raise SpecError(f"{source} [denoiser]: unknown keys {unknown}")
    return EnvSpec(
        id=raw["id"],
        dataset=dict(raw["dataset"]),
        diffusion=_build(DiffusionConfig, raw["diffusion"], f"{source} [diffusion]"),
        denoiser={k: tuple(v) if isinstance(v, list) else v for k, v in raw["denoiser"].items()},
        pretrain=_build(PretrainConfig, raw["pretrain"], f"{source} [pretrain]"),
        env=dict(raw.get("env", {})),
    )


@cache
def all_env_specs() -> dict[str, EnvSpec]:
    """Every spec under ``refit_gym.envs`` (the source tree's envs/), keyed by id."""
    specs: dict[str, EnvSpec] = {}
    for entry in sorted(resources.files("refit_gym.envs").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        spec = _parse(tomllib.loads(entry.read_text()), f"envs/{entry.name}")
        if spec.id in specs:
            raise SpecError(f"envs/{entry.name}: id {spec.id!r} is defined twice")
        specs[spec.id] = spec
    return specs


def load_env_spec(env_id: str) -> EnvSpec:
    """The spec of ``env_id`` (a ``refit_gym:`` prefix is accepted)."""
    env_id = env_id.removeprefix("refit_gym:")
    specs = all_env_specs()
    if env_id not in specs:
        raise SpecError(f"unknown environment id {env_id!r}; known ids: {sorted(specs)}")
    return specs[env_id]


def load_agent_hyperparams(algo: str, env_id: str) -> dict[str, Any]:
    """Hyperparameters of ``algo`` for ``env_id`` from agents/<algo>.toml ("default" fallback)."""
    path = resources.files("refit_gym.agents") / f"{algo}.toml"
    if not path.is_file():
        return {}
    table = tomllib.loads(path.read_text())
    return dict(table.get(env_id.removeprefix("refit_gym:"), table.get("default", {})))
