"""Environment specs: the single source of each registered id's defaults (envs/*.toml).

A spec names its dataset, its diffusion schedule, its backbone (``[backbone] type``), the
backbone's training protocol and the MDP's defaults.

The TOML files sit in the top-level ``envs/`` folder of the source tree and ship inside the wheel
as the ``refit_gym.envs`` package, so :func:`load_env_spec` reads them the same way from both.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from refit_gym.backbones import Backbone, CheckpointError, backbone_configs, load_backbone
from refit_gym.backbones.registry import BACKBONES, backbone_config, backbone_from_configs
from refit_gym.data.loading import FORMATS, SEQUENTIAL_FORMATS
from refit_gym.diffusion import DiffusionConfig


@dataclass(frozen=True)
class PretrainConfig:
    """A backbone's training protocol: its own loss, selection by validation, early stop."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 400
    importance_sampling: bool = True  # sample t by the running loss (10 per step, as DiffRec)
    eval_every: int = 5  # epochs between validation passes
    patience: int = 20  # stop at epoch best + patience without running it (= Selector's + 1)
    max_epochs: int = 1000
    eval_batch_size: int = 1024  # rows per chain at evaluation (does not change results)
    selection_metric: str = "recall@20"  # the validation metric that picks the checkpoint
    ks: tuple[int, ...] = (10, 20)  # cut-offs K of the reported metrics
    # Stochastic backbones: the chain length (None: all T steps) and sampling seeds of the
    # selection passes during training; the selected model is then evaluated with its own
    # full sampler over ``final_sampling_seeds``.
    selection_steps: int | None = None
    selection_sampling_seeds: int = 1
    final_sampling_seeds: int = 3


@dataclass(frozen=True)
class EnvSpec:
    """Everything an environment id fixes: data, diffusion schedule, backbone, training, MDP."""

    id: str
    dataset: dict[str, Any]
    diffusion: DiffusionConfig
    backbone: dict[str, Any]  # "type" and its config's fields except n_items (from the data)
    pretrain: PretrainConfig
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone_type(self) -> str:
        return self.backbone["type"]

    @property
    def sequential(self) -> bool:
        """Whether the id is of the sequential scenario (next-item rows) rather than CF."""
        return BACKBONES[self.backbone_type][0].sequential

    def backbone_fields(self, n_items: int) -> dict[str, Any]:
        """The backbone config's fields for a dataset of ``n_items`` items."""
        return {"n_items": n_items, **{k: v for k, v in self.backbone.items() if k != "type"}}

    def backbone_configs(self, n_items: int) -> dict[str, Any]:
        """This spec's model for ``n_items`` items as a checkpoint records it
        (:func:`~refit_gym.backbones.backbone_configs`): backbone, config, diffusion."""
        config = backbone_config(self.backbone_type, self.backbone_fields(n_items))
        return {"backbone": self.backbone_type, "config": dataclasses.asdict(config),
                "diffusion": dataclasses.asdict(self.diffusion)}

    def build_backbone(self, n_items: int) -> Backbone:
        """A freshly initialised backbone of this spec for ``n_items`` items."""
        return backbone_from_configs(self.backbone_configs(n_items))

    def load_backbone(self, path: str | os.PathLike[str], n_items: int,
                      device: torch.device | str = "cpu") -> tuple[Backbone, dict[str, Any]]:
        """The backbone at ``path`` if it fits this spec: pretrained for this id, or for another
        id with this id's backbone, config and schedule (a spec file that copies an id to change
        its [env] reuses that id's backbones). Anything else is refused, naming what differs:
        ids on one dataset share their items, and ReFiT-SeqSynthetic-v0's DreamRec would
        otherwise play ReFiT-SeqSynthetic-v1's ADRec chain."""
        backbone, payload = load_backbone(path, n_items, device, self.id)
        recorded, wanted = backbone_configs(backbone), self.backbone_configs(n_items)
        if payload.get("env_id") != self.id and recorded != wanted:
            part = next(name for name in wanted if recorded[name] != wanted[name])
            keys = ([] if part == "backbone" else  # the type's name; the others are dicts
                    [key for key in wanted[part] if recorded[part].get(key) != wanted[part][key]])
            raise CheckpointError(
                f"checkpoint {path} belongs to {payload.get('env_id')}, whose {part}"
                f"{' ' + str(keys) if keys else ''} differs from {self.id}'s; pretrain one "
                f"for {self.id} (`refit-gym pretrain --env {self.id}`, with --spec PATH for "
                "a spec of your own)")
        return backbone, payload


class SpecError(ValueError):
    """An environment id is unknown or its spec file is malformed."""


def _build(cls: type, section: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise SpecError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})


SECTIONS = ("id", "dataset", "diffusion", "backbone", "pretrain", "env")


def _parse(raw: dict[str, Any], source: str) -> EnvSpec:
    missing = [k for k in SECTIONS[:-1] if k not in raw]
    if missing:
        raise SpecError(f"{source}: missing sections {missing}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpecError(f"{source}: unknown keys {unknown}; allowed: {list(SECTIONS)}")
    dataset = raw["dataset"]
    if dataset.get("format") not in FORMATS or "name" not in dataset:
        raise SpecError(f"{source} [dataset]: needs 'name' and a 'format' among "
                        f"{list(FORMATS)}, got format {dataset.get('format')!r}")
    if "type" not in raw["backbone"]:
        raise SpecError(f"{source} [backbone]: missing key 'type' (e.g. \"diffrec\")")
    kind = raw["backbone"]["type"]
    if kind in BACKBONES and BACKBONES[kind][0].sequential != (
            dataset["format"] in SEQUENTIAL_FORMATS):
        scenario = "sequential" if BACKBONES[kind][0].sequential else "collaborative-filtering"
        fitting = sorted(f for f in FORMATS if (f in SEQUENTIAL_FORMATS)
                         == BACKBONES[kind][0].sequential)
        raise SpecError(f"{source}: backbone {kind!r} is {scenario} and reads formats "
                        f"{fitting}, but [dataset] has format {dataset['format']!r}")
    fields = {k: v for k, v in raw["backbone"].items() if k != "type"}
    try:  # checks the keys now, not at the first pretraining
        backbone_config(raw["backbone"]["type"], {"n_items": 1, **fields})
    except (ValueError, TypeError) as err:
        raise SpecError(f"{source} [backbone]: {err}") from err
    pretrain = _build(PretrainConfig, raw["pretrain"], f"{source} [pretrain]")
    _, _, k = pretrain.selection_metric.partition("@")
    if not k.isdigit() or int(k) not in pretrain.ks:
        raise SpecError(f"{source} [pretrain]: selection_metric {pretrain.selection_metric!r} "
                        f"must be NAME@K with K in ks = {list(pretrain.ks)}")
    return EnvSpec(
        id=raw["id"],
        dataset=dict(raw["dataset"]),
        diffusion=_build(DiffusionConfig, raw["diffusion"], f"{source} [diffusion]"),
        backbone={k: tuple(v) if isinstance(v, list) else v for k, v in raw["backbone"].items()},
        pretrain=pretrain,
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


_USER_SPECS: dict[str, EnvSpec] = {}  # registered from files outside the package


def known_specs() -> dict[str, EnvSpec]:
    """The package's specs and those registered with :func:`register_spec_file`."""
    return {**all_env_specs(), **_USER_SPECS}


def register_spec_file(path: str | os.PathLike[str]) -> EnvSpec:
    """Read a spec file from anywhere and make its id known (re-reading the same file again
    replaces it). A relative ``[dataset] path`` is taken from the spec file's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpecError(f"spec file {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from err
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and "path" in dataset:
        raw["dataset"] = {**dataset, "path": str((path.parent / dataset["path"]).resolve())}
    spec = _parse(raw, str(path))
    if spec.id in all_env_specs():
        raise SpecError(f"{path}: id {spec.id!r} is one of the package's; choose another id")
    _USER_SPECS[spec.id] = spec
    return spec


def load_env_spec(env_id: str) -> EnvSpec:
    """The spec of ``env_id`` (a ``refit_gym:`` prefix is accepted)."""
    env_id = env_id.removeprefix("refit_gym:")
    specs = known_specs()
    if env_id not in specs:
        raise SpecError(f"unknown environment id {env_id!r}; known ids: {sorted(specs)} (an id "
                        "of your own: refit_gym.register_spec(PATH) or --spec PATH)")
    return specs[env_id]


# torch device types an agents/<algo>.toml sub-table may be named after.
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})


def check_device(device: str, setting: str | None = "device") -> str:
    """``device`` unchanged if this machine can use it ("auto" always), else a ValueError
    naming ``setting`` (None: the caller names it), the value and what is allowed."""
    allowed = "auto (CUDA when available, else cpu), cpu, cuda or cuda:N"
    named = f"{setting}: {device!r}" if setting else repr(device)
    if device == "auto":
        return device
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{named} is not a torch device; use {allowed}") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{named}: no CUDA GPU is usable here (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use auto or cpu")
        if kind.index is not None and kind.index >= count:
            raise ValueError(f"{named}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{named}: MPS is not available here; use {allowed}")
    elif kind.type not in ("cpu", "mps"):
        raise ValueError(f"{named}: unsupported device type; use {allowed}")
    return device


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as TOML or JSON gives it) has the type ``hint`` names. A type this
    check cannot judge passes: the constructor's own checks apply then."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass, but True is no epoch count
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and (
            not args or all(_matches(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is collections.abc.Callable:
        return callable(value)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is collections.abc.Callable:
        return "a callable"
    return getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)


# The smallest value of settings whose smaller values run and do nothing (0 epochs, no users,
# no parallel episodes) or fail late; every algorithm that has the setting shares its bound.
LOWER_BOUNDS = {"epochs": 1, "users_per_batch": 1, "users_per_epoch": 0, "users_per_chunk": 0,
                "n_envs": 1, "group_size": 1, "checkpoint_every": 1, "batch_size": 1,
                "eval_every": 1, "n_steps": 1, "n_epochs": 1, "train_steps": 1}


def check_settings(values: Mapping[str, Any], hints: Mapping[str, Any], where: str, *,
                   closed: bool = True, minima: Mapping[str, int] | None = None) -> None:
    """Refuse, in one line each, a key of ``values`` that ``hints`` (name -> type) lacks (when
    ``closed``), a value of another type, and one below its lower bound (:data:`LOWER_BOUNDS`
    updated by ``minima``). ``where`` names the settings, e.g. "refit --set"."""
    if closed and (unknown := sorted(set(values) - set(hints))):
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(hints)}")
    bounds = {**LOWER_BOUNDS, **(minima or {})}
    for key, value in values.items():
        if key not in hints:
            continue
        if not _matches(value, hints[key]):
            raise ValueError(f"{where}: {key} = {value!r} ({type(value).__name__}); {key} takes "
                             f"{_type_name(hints[key])}")
        if key in bounds and isinstance(value, int) and value < bounds[key]:
            raise ValueError(f"{where}: {key} = {value!r}; {key} must be >= {bounds[key]}")


def dataclass_hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (``from __future__ import annotations`` leaves
    strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Arguments of an SB3 algorithm that the driver sets itself (refit_gym.rl.sb3_agents.make_model).
SB3_DRIVER_SET = ("self", "policy", "env", "seed", "device", "verbose", "_init_setup_model")


def agent_settings(algo: str) -> tuple[dict[str, Any], dict[str, int]] | None:
    """What ``algo``'s hyperparameters may be: (name -> type, lower bounds beyond
    :data:`LOWER_BOUNDS`); None for an algorithm without tunable hyperparameters here (the
    pretrained start, the peers' grids)."""
    # Imported here: the algorithms import the MDP, which imports this module.
    from refit_gym.rl.sb3_agents import DRIVER_KEYS, SB3_ALGOS
    from refit_gym.training.algorithms import BUILDERS, CONTINUE_SETTINGS

    config_class = getattr(BUILDERS.get(algo), "config_class", None)
    if config_class is not None:  # ReFiT and its kin (DDPO): advantages centred on the user's
        return dataclass_hints(config_class), {"group_size": 2}  # group need G >= 2
    if algo == "continue":
        hints = dataclass_hints(PretrainConfig)
        return {key: hints[key] for key in CONTINUE_SETTINGS}, {}
    if algo in SB3_ALGOS:
        parameters = inspect.signature(SB3_ALGOS[algo].__init__).parameters
        hints = {name: p.annotation for name, p in parameters.items()
                 if name not in SB3_DRIVER_SET}
        return {**hints, **dict.fromkeys(DRIVER_KEYS, int)}, {}
    return None


def check_agent_hyperparams(algo: str, params: Mapping[str, Any], where: str, *,
                            closed: bool = True) -> None:
    """Refuse ``params`` of ``algo`` that its agent does not have (when ``closed``), of the
    wrong type, or below a bound, in one line naming ``where`` they came from; algorithms
    without a schema pass."""
    settings = agent_settings(algo)
    if settings is not None:
        hints, minima = settings
        check_settings(params, hints, where, closed=closed, minima=minima)


def _agent_file(algo: str) -> tuple[Any, dict[str, Any]] | None:
    """agents/<algo>.toml as written: its ``extends`` (None if it has none) and its tables;
    None if there is no such file."""
    path = resources.files("refit_gym.agents") / f"{algo}.toml"
    if not path.is_file():
        return None
    written = tomllib.loads(path.read_text())
    return written.get("extends"), {key: value for key, value in written.items()
                                    if isinstance(value, dict)}


def agent_tables(algo: str) -> dict[str, Any]:
    """agents/<algo>.toml's tables as written: one per id (and "default"); {} if it has none."""
    return (_agent_file(algo) or (None, {}))[1]


def load_agent_hyperparams(algo: str, env_id: str, device: str = "cpu") -> dict[str, Any]:
    """Hyperparameters of ``algo`` for ``env_id`` from agents/<algo>.toml ("default" fallback).

    An id's table may hold one sub-table per device type (``["ReFiT-ML1M-v0".cuda]``): on that
    device its keys replace the id's, so a GPU gets the batches it affords and a CPU the ones
    that finish there. Any other sub-table is a hyperparameter (SB3's ``policy_kwargs``).
    ``same_as = "<id>"`` takes that id's table (keys beside it override). A file that opens with
    ``extends = "<algo>"`` starts every id from that algorithm's hyperparameters for the id and
    device and adds its own keys (DDPO samples what ReFiT samples and differs in the update)."""
    base, table = _agent_file(algo) or (None, {})
    env_id = env_id.removeprefix("refit_gym:")
    entry = dict(table.get(env_id, table.get("default", {})))
    if "same_as" in entry:  # another id's table, the rule stated once: its keys, then these
        other = entry.pop("same_as")
        if other not in table or "same_as" in table[other]:
            raise SpecError(f"agents/{algo}.toml [{env_id}]: same_as = {other!r} must name "
                            f"another id's table of this file that has no same_as itself")
        entry = {**table[other], **entry}
    by_device = {key: entry.pop(key) for key in DEVICE_TYPES & set(entry)}
    params = {**entry, **by_device.get(device.split(":")[0], {})}
    if base is not None:
        written = _agent_file(base) if isinstance(base, str) and base != algo else None
        if written is None or written[0] is not None:
            raise SpecError(f"agents/{algo}.toml: extends = {base!r} must name another "
                            "algorithm's file that extends none itself")
        params = {**load_agent_hyperparams(base, env_id, device), **params}
    # Types and bounds now; unknown names are left to the agent's constructor, which names them.
    check_agent_hyperparams(algo, params, f"agents/{algo}.toml for {env_id}", closed=False)
    return params
