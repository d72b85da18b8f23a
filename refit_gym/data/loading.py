"""Loading the dataset a spec's ``[dataset]`` section names, whatever its format."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refit_gym.data.fileio import DataError, default_cache_dir, default_data_dir, verify_checksums
from refit_gym.data.interactions import InteractionData, load_diffrec, load_lightgcn
from refit_gym.data.sequences import (
    DREAMREC_FILES,
    DREAMREC_STATS,
    SequenceData,
    load_diffurec,
    load_dreamrec,
)
from refit_gym.data.synthetic import make_sequential_synthetic, make_synthetic

Dataset = InteractionData | SequenceData
GENERATED = {"synthetic": make_synthetic, "sequential-synthetic": make_sequential_synthetic}
FILES = {
    "diffrec": ["train_list.npy", "valid_list.npy", "test_list.npy"],
    "lightgcn": ["train.txt", "test.txt"],
    "dreamrec": [*DREAMREC_FILES.values(), DREAMREC_STATS],
    "diffurec": ["dataset.pkl"],
}
FORMATS = (*FILES, *GENERATED)
SEQUENTIAL_FORMATS = ("dreamrec", "diffurec", "sequential-synthetic")  # load as SequenceData
# Keys of [dataset] that describe where the data comes from rather than how to read it.
SOURCE_KEYS = ("format", "name", "sha256", "urls", "obtain", "path")


def dataset_files(dataset: Mapping[str, Any]) -> list[str]:
    return FILES.get(dataset["format"], [])


def _env_ids(name: str) -> list[str]:
    """The registered ids whose dataset is ``name``, for messages that say what to run."""
    from refit_gym.specs import known_specs  # imported here: the specs import this module

    return sorted(spec.id for spec in known_specs().values() if spec.dataset["name"] == name)


def load_dataset(
    dataset: Mapping[str, Any], data_dir: str | os.PathLike[str] | None = None, verify: bool = True
) -> Dataset:
    """Load the dataset a spec's ``[dataset]`` section describes: from ``data_dir/<name>`` when
    a data folder is given, else from the section's ``path``, else from the default data folder.

    ``verify`` checks pinned sha256 sums (``verify=False`` reads files that differ from the
    published ones; pickles are always checked: they are never unpickled unverified). A missing
    file says where it was looked for, which ids use the dataset and how to obtain it.
    """
    fmt = dataset["format"]
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; known: {list(FORMATS)}")
    options = {k: v for k, v in dataset.items() if k not in SOURCE_KEYS}
    if fmt in GENERATED:
        return GENERATED[fmt](**options, name=dataset.get("name", fmt))
    if data_dir is None and "path" in dataset:
        directory = Path(dataset["path"])
    else:
        directory = Path(data_dir or default_data_dir()) / dataset["name"]
    ids = _env_ids(dataset["name"])
    download = f"`refit-gym download --env {ids[0] if ids else 'ID'}`"
    missing = [f for f in dataset_files(dataset) if not (directory / f).is_file()]
    if missing:
        how = (f"run {download} to fetch it (checksummed)"
               if dataset.get("urls") else dataset.get("obtain", "place the files there"))
        used_by = f" (data of {', '.join(ids)})" if ids else ""
        raise DataError(
            f"dataset {dataset['name']!r}{used_by} not found: missing {missing} in {directory}. "
            f"Set REFIT_DATA_DIR to the folder that holds {dataset['name']}/, or {how}."
        )
    fix = "replace it with the published file" + (
        f" ({download} fetches it)" if dataset.get("urls") else "")
    sha256 = dataset.get("sha256", {})
    cache = default_cache_dir() / "datasets"
    if fmt == "dreamrec":
        return load_dreamrec(directory, sha256, dataset["name"].replace("/", "-"), cache)
    if fmt == "diffurec":
        return load_diffurec(directory / "dataset.pkl",
                             sha256.get("dataset.pkl") if verify else None,
                             dataset["name"].replace("/", "-"), cache_dir=cache, **options)
    if verify and sha256:
        verify_checksums(directory, sha256, fix)
    if fmt == "diffrec":
        return load_diffrec(directory, dataset["name"])
    return load_lightgcn(directory, dataset["name"], **options)
