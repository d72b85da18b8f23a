"""Shared plumbing for benchmark scripts: machine description and result files."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from refit_gym.data import SequenceData, atomic_path
from refit_gym.mdp.gym_env import EnvSettings, cached_dataset
from refit_gym.specs import EnvSpec, load_env_spec
from refit_gym.training.identity import cpu_model
from refit_gym.training.metrics import sample_std
from refit_gym.training.pretrain import make_timestep_sampler

RESULTS = Path(__file__).resolve().parent / "results"


def sequential_id(env_id: str) -> tuple[EnvSpec, SequenceData]:
    """The spec and data of a sequential id; a one-line exit for any other id (the studies of
    sampled next-item chains have nothing to measure there)."""
    data = cached_dataset(env_id)
    if not isinstance(data, SequenceData):
        raise SystemExit(f"{env_id} is not a sequential id: this study measures the next-item "
                         "scenario's sampled chains")
    return load_env_spec(env_id), data


def machine() -> str:
    threads = torch.get_num_threads()
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({threads} thread{'s' if threads > 1 else ''}), Python {platform.python_version()}")


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds, the std the project's sample std (n - 1); one seed: its value."""
    mean = f"{statistics.mean(values):.4f}"
    return mean if len(values) == 1 else f"{mean} ± {sample_std(values):.4f}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_result(name: str, title: str, lines: list[str], folder: Path = RESULTS) -> Path:
    """Write ``<folder>/<name>.md`` (default results/) with the exact command and the machine,
    atomically, and echo it."""
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    text = "\n".join([f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
                      *lines, ""])
    path = folder / f"{name}.md"
    with atomic_path(path) as tmp:  # an interrupted run leaves the old result whole
        tmp.write_text(text)
    print(text)
    return path


def fresh_training(spec: EnvSpec, n_items: int):
    """A seeded, untrained backbone with AdamW, its t-sampler and a generator."""
    torch.manual_seed(0)
    model = spec.build_backbone(n_items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain.lr,
                                  weight_decay=spec.pretrain.weight_decay)
    sampler = make_timestep_sampler(spec.pretrain, model.diffusion.steps)
    return model, optimizer, sampler, torch.Generator().manual_seed(0)


def untrained_episodes(spec: EnvSpec, data, env_kwargs: dict | None = None):
    """A seeded, untrained backbone of ``spec`` and the episode source and reward of ``data``
    (a sequential id scores with this backbone's E): speed does not depend on the weights."""
    torch.manual_seed(0)
    settings = EnvSettings.resolve(spec, env_kwargs or {})
    model = spec.build_backbone(data.n_items).eval().to(settings.device)
    table = model.item_table()
    embeddings = None if table is None else table.detach()
    return (model, settings.build_source(spec, data, embeddings),
            settings.build_reward(data, embeddings))
