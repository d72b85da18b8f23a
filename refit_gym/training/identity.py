"""What identifies a run's inputs (digests of a spec and of a dataset's contents), the machine a
run ran on, and how two identities differ (one key, for a one-line refusal): recorded by bench
cells and checked by every resumable run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data import Dataset
from refit_gym.specs import EnvSpec


def digest(parts: Any) -> str:
    """sha256 (hex) of JSON-able ``parts``, keys sorted."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_digest(spec: EnvSpec, *, without: tuple[str, ...] = ()) -> str:
    """sha256 of the fields of ``spec`` (id, data, schedule, backbone, [pretrain], [env]) but
    those named in ``without``."""
    fields = dataclasses.asdict(spec)
    if unknown := sorted(set(without) - set(fields)):
        raise ValueError(f"spec_digest: {unknown} are not fields of a spec; it has {list(fields)}")
    return digest({name: value for name, value in fields.items() if name not in without})


def data_digest(data: Dataset) -> str:
    """sha256 of the dataset's contents: every array and sparse matrix of every split."""
    state = hashlib.sha256()

    def feed_array(value: np.ndarray) -> None:
        state.update(f"{value.dtype}{value.shape}".encode())
        state.update(np.ascontiguousarray(value).tobytes())

    def feed(name: str, value: Any) -> None:
        state.update(name.encode())
        if isinstance(value, dict):
            for key in sorted(value):
                feed(f"{name}.{key}", value[key])
        elif sp.issparse(value):
            csr = value.tocsr()
            state.update(repr(csr.shape).encode())
            for part in (csr.indptr, csr.indices, csr.data):
                state.update(name.encode())
                feed_array(part)
        elif isinstance(value, np.ndarray):
            # Item ids are stored as narrow as they fit (SequenceData): hash them as int64, so
            # the digest names the contents, not the storage.
            feed_array(value.astype(np.int64) if value.dtype.kind in "iu" else value)
        else:
            state.update(repr(value).encode())

    for field in dataclasses.fields(data):
        feed(field.name, getattr(data, field.name))
    return state.hexdigest()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, Any]:
    """Where a cell runs: what can change its floats but not what it computes."""
    name = (torch.cuda.get_device_name(torch.device(device))
            if torch.device(device).type == "cuda" else device)
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": name}


def first_difference(recorded: Any, wanted: Any, key: str = "") -> str | None:
    """The dotted key of the first difference between two JSON-like values (None: equal)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for name in sorted(set(recorded) | set(wanted)):
            if name not in recorded or name not in wanted:
                return f"{key}{name}"
            if (found := first_difference(recorded[name], wanted[name], f"{key}{name}.")):
                return found
        return None
    return None if recorded == wanted else key.rstrip(".") or "identity"


def _lookup(value: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        value = value.get(name, "<absent>") if isinstance(value, dict) else "<absent>"
    return value


def describe_difference(recorded: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """"KEY = RECORDED, this run gives WANTED" for the first differing key of two identities
    (compared as JSON would hold them: tuples as lists), each value cut to 60 characters;
    None when they are equal."""
    recorded, wanted = (json.loads(json.dumps(v, default=str)) for v in (recorded, wanted))
    key = first_difference(recorded, wanted)
    if key is None:
        return None

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{key} = {short(_lookup(recorded, key))}, this run gives {short(_lookup(wanted, key))}"
