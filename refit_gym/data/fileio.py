"""Files: atomic writes (a reader never sees a half-written checkpoint, JSON or download),
pinned checksums, the data folder, and the error every malformed data file raises."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _new_file_beside(target: Path) -> Path:
    """An empty file of a fresh name in ``target``'s folder, created with mode 0666 less the
    umask, as ``open`` creates files (``tempfile.mkstemp`` makes them 0600: a checkpoint or a
    result that colleagues on a shared server could not read)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so that the final ``os.replace`` is atomic,
    and its bytes reach the disk before the rename, so that a crash leaves the old file or the
    whole new one. It is created as ``open`` creates files (0666 less the umask). On any
    exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(target)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself, on systems that can sync a folder
            _fsync(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent with the others."""


def default_data_dir() -> Path:
    """``$REFIT_DATA_DIR``, else ``$XDG_CACHE_HOME/refit-gym`` (``~/.cache/refit-gym``)."""
    if os.environ.get("REFIT_DATA_DIR"):
        return Path(os.environ["REFIT_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "refit-gym"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(directory: Path, expected: Mapping[str, str],
                     fix: str = "replace it with the published file") -> None:
    """Compare each file's sha256 with its pinned value; a mismatch names the file and ``fix``
    (what the caller can do: only options every caller of the path that raises has)."""
    for filename, want in expected.items():
        got = sha256_of(directory / filename)
        if got != want:
            raise DataError(
                f"{directory / filename}: sha256 {got} does not match the pinned {want}. The file "
                f"is not the published version (corrupt, truncated or a different split): {fix}."
            )


def default_cache_dir() -> Path:
    """Where derived files (low-rank factors, converted pickles) go: ``$REFIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/refit-gym`` (``~/.cache/refit-gym``)."""
    root = os.environ.get("REFIT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refit-gym"

