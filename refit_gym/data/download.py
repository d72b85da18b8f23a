"""Checksummed, atomic downloads of published data files."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from refit_gym.data.fileio import DataError, atomic_path, default_data_dir, sha256_of


class DownloadError(DataError):
    """A download failed or its checksum did not match; nothing was written."""


def download(
    url: str, dest: str | os.PathLike[str], sha256: str, *, timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Stream ``url`` to ``dest``, verifying ``sha256``; an existing verified file is kept.

    The bytes go to a temporary file beside ``dest`` and are renamed onto it only after the
    checksum matched, so a failure (offline, HTTP error, mismatch, interrupt) leaves no file.
    """
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                          disable=not (progress and sys.stderr.isatty())) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise DownloadError(
                f"could not download {url} ({err}). Check the network connection and retry, or "
                f"download the file yourself and place it at {dest}."
            ) from err
        if digest.hexdigest() != sha256:
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got "
                f"{digest.hexdigest()}. Nothing was saved. The server returned a different file "
                f"(a proxy page or a changed upstream); retry, or place the published file at "
                f"{dest} yourself."
            )
    return dest


def fetch_dataset(
    dataset: Mapping[str, Any], data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download every file of a spec's ``[dataset]`` that has a pinned URL and sha256."""
    urls: Mapping[str, str] = dataset.get("urls", {})
    if not urls:
        raise DownloadError(
            f"dataset {dataset['name']!r} has no download address (its licence forbids "
            "redistribution or it is generated); see the README for how to obtain it."
        )
    directory = Path(data_dir or default_data_dir()) / dataset["name"]
    for filename, url in urls.items():
        download(url, directory / filename, dataset["sha256"][filename], progress=progress)
    return directory
