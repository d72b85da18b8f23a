"""Sequential-recommendation data: rows of (history, next item), from DreamRec's pandas pickles
and DiffuRec's ``dataset.pkl``, converted once to a safe ``.npz`` cache.

A row's history holds the latest ``max_len`` item ids, oldest first, right-padded with the id
``n_items``; its target is the next item. Pickles run code when loaded, so nothing is unpickled
before its sha256 matches a pinned value (DreamRec's DataFrames), or it is read with an
unpickler that admits no type beyond Python's builtins (DiffuRec's dicts of lists).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.fileio import DataError, atomic_path, sha256_of, verify_checksums

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SequenceData:
    """Rows of (history (L,) int64, target int64) per split; ids in [0, n_items), pad n_items."""

    name: str
    n_items: int
    histories: dict[str, np.ndarray]  # split -> (rows, L) int64
    targets: dict[str, np.ndarray]  # split -> (rows,) int64

    @property
    def max_len(self) -> int:
        return self.histories["train"].shape[1]

    @property
    def n_train_rows(self) -> int:
        return len(self.targets["train"])

    def batch(self, split: str, rows: np.ndarray, device: torch.device | str = "cpu"
              ) -> dict[str, torch.Tensor]:
        """Rows ``rows`` of ``split`` as a batch ``{"history": (B, L), "target": (B,)}``."""
        return {"history": torch.from_numpy(self.histories[split][rows]).to(device),
                "target": torch.from_numpy(self.targets[split][rows]).to(device)}

    def train_batch(self, rows: np.ndarray, device: torch.device | str = "cpu"
                    ) -> dict[str, torch.Tensor]:
        return self.batch("train", rows, device)

    def target_in_train(self, split: str) -> np.ndarray:
        """(rows,) bool: whether each row's target is ever a training target."""
        seen = np.zeros(self.n_items, dtype=bool)
        seen[self.targets["train"]] = True
        return seen[self.targets[split]]

    def last_items(self, split: str) -> np.ndarray:
        """(rows,) the latest history item of each row of ``split``, or -1 for an empty one."""
        return last_history_items(self.histories[split], self.n_items)

    def transitions(self) -> sp.csr_matrix:
        """C (n_items, n_items): C[i, j] counts training rows whose latest history item is i and
        whose target is j (each consecutive pair of a training sequence once)."""
        last = self.last_items("train")
        keep = last >= 0
        ones = np.ones(int(keep.sum()), dtype=np.float32)
        return sp.csr_matrix((ones, (last[keep], self.targets["train"][keep])),
                             shape=(self.n_items, self.n_items))

    @cached_property
    def sequence_end_rows(self) -> np.ndarray:
        """Indices of the training rows that no later row extends: each training sequence's
        last prefix, whose history and target together hold the whole (latest) sequence.

        Row i + 1 extends row i when its history is row i's history followed by row i's
        target (the latest ``max_len`` of them): consecutive prefixes of one sequence, as
        :func:`prefix_rows` lays them out. A backbone that trains on every position of a
        sequence at once (ADRec) passes over these rows only, every epoch: computed once."""
        history, target, pad = self.histories["train"], self.targets["train"], self.n_items
        length = (history != pad).sum(1)
        full = length == self.max_len
        extended = np.where(full[:, None], np.roll(history, -1, axis=1), history)
        rows = np.arange(len(target))
        extended[rows, np.where(full, self.max_len - 1, length)] = target
        continues = np.zeros(len(target), dtype=bool)
        continues[:-1] = (extended[:-1] == history[1:]).all(1)
        return np.flatnonzero(~continues)

    def summary(self) -> str:
        rows = " / ".join(f"{s} {len(self.targets[s])}" for s in SPLITS)
        return f"{self.name}: {self.n_items} items, history length {self.max_len}, rows {rows}"


def last_history_items(history: np.ndarray, pad: int) -> np.ndarray:
    """(rows,) the latest item of each right-padded history row (rows, L), or -1 if empty."""
    length = (history != pad).sum(1)
    last = history[np.arange(len(history)), np.maximum(length - 1, 0)]
    return np.where(length > 0, last, -1)


def validate_sequences(name: str, n_items: int, histories: Mapping[str, np.ndarray],
                       targets: Mapping[str, np.ndarray], source: str) -> SequenceData:
    """Check shapes, emptiness and id ranges, then build the dataset."""
    lengths = set()
    for split in SPLITS:
        history, target = histories[split], targets[split]
        if len(target) == 0:
            raise DataError(f"{source}: the {split} split is empty")
        if history.ndim != 2 or len(history) != len(target):
            raise DataError(f"{source}: {split} histories have shape {history.shape} for "
                            f"{len(target)} targets; expected (rows, L)")
        lengths.add(history.shape[1])
        if target.min() < 0 or target.max() >= n_items:
            raise DataError(f"{source}: {split} target id {int(target.max())} or "
                            f"{int(target.min())} is outside [0, {n_items}); the item count is "
                            "wrong or the file is corrupt")
        if history.min() < 0 or history.max() > n_items:
            raise DataError(f"{source}: {split} history id outside [0, {n_items}] ({n_items} "
                            "pads); the item count is wrong or the file is corrupt")
    if len(lengths) != 1:
        raise DataError(f"{source}: history lengths differ between splits ({sorted(lengths)})")
    return SequenceData(name, n_items,
                        {s: np.ascontiguousarray(histories[s], dtype=np.int64) for s in SPLITS},
                        {s: np.ascontiguousarray(targets[s], dtype=np.int64) for s in SPLITS})


# --------------------------------------------------------------------------- safe cache


# The cache's format version, part of every key: bump it whenever the code that converts the
# source files or lays out the .npz changes, so no stale conversion is ever read back.
CACHE_FORMAT = 1


def _cache_key(file_digests: list[str], extra: Mapping[str, Any]) -> str:
    """A cache name from the source files' sha256 (already computed), the read options and
    :data:`CACHE_FORMAT`."""
    digest = hashlib.sha256(repr(sorted({**extra, "cache_format": CACHE_FORMAT}.items())).encode())
    for file_digest in file_digests:
        digest.update(file_digest.encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path, name: str) -> SequenceData | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            return SequenceData(name, int(cached["n_items"]),
                                {s: cached[f"{s}_history"] for s in SPLITS},
                                {s: cached[f"{s}_target"] for s in SPLITS})
    except (OSError, ValueError, KeyError):
        return None  # unreadable: rebuilt from the source below


def _write_cache(path: Path, data: SequenceData) -> None:
    arrays = {f"{s}_history": data.histories[s] for s in SPLITS}
    arrays.update({f"{s}_target": data.targets[s] for s in SPLITS})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, n_items=np.int64(data.n_items), **arrays)


# --------------------------------------------------------------------------- DreamRec pickles

DREAMREC_FILES = {"train": "train_data.df", "valid": "val_data.df", "test": "test_data.df"}
DREAMREC_STATS = "data_statis.df"
# DreamRec names the columns differently in its train file and its val/test files.
DREAMREC_TARGET = ("next", "tgt")


def _read_verified_pickle(path: Path) -> Any:
    """Unpickle ``path``, which the caller has checked against its pinned sha256."""
    import pandas as pd

    return pd.read_pickle(path)


def load_dreamrec(directory: str | Path, sha256: Mapping[str, str] | None, name: str,
                  cache_dir: Path | None = None) -> SequenceData:
    """DreamRec's ``{train,val,test}_data.df`` and ``data_statis.df`` (pandas DataFrames).

    ``sha256`` must pin every file: a pickle is unpickled only after its checksum matched.
    """
    directory = Path(directory)
    files = [*DREAMREC_FILES.values(), DREAMREC_STATS]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DataError(f"dataset {name!r}: missing {missing} in {directory}")
    unpinned = [f for f in files if f not in (sha256 or {})]
    if unpinned:
        raise DataError(f"dataset {name!r}: {unpinned} have no pinned sha256. These are pickles, "
                        "and unpickling runs code: add their sha256 under [dataset.sha256] in "
                        "the spec after checking where the files came from")
    verify_checksums(directory, {f: sha256[f] for f in files})
    key = _cache_key([sha256[f] for f in files], {"format": "dreamrec"})  # verified: no re-hash
    cache = cache_dir / f"{name}-{key}.npz" if cache_dir else None
    if cache is not None and (cached := _read_cache(cache, name)) is not None:
        return cached
    stats = _read_verified_pickle(directory / DREAMREC_STATS)
    try:
        n_items, seq_size = int(stats["item_num"].iloc[0]), int(stats["seq_size"].iloc[0])
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{directory / DREAMREC_STATS}: expected a DataFrame with columns "
                        f"item_num and seq_size ({err})") from err
    histories, targets = {}, {}
    for split, filename in DREAMREC_FILES.items():
        frame = _read_verified_pickle(directory / filename)
        target_column = next((c for c in DREAMREC_TARGET if c in frame), None)
        if "seq" not in frame or target_column is None:
            raise DataError(f"{directory / filename}: expected columns 'seq' and one of "
                            f"{DREAMREC_TARGET}, got {list(frame.columns)}")
        if len(frame) == 0:
            raise DataError(f"{directory / filename}: the {split} split is empty")
        try:
            histories[split] = np.stack(frame["seq"].to_numpy()).astype(np.int64)
        except ValueError as err:
            raise DataError(f"{directory / filename}: 'seq' rows must be equal-length id "
                            f"lists ({err})") from err
        if histories[split].shape[1] != seq_size:
            raise DataError(f"{directory / filename}: histories of length "
                            f"{histories[split].shape[1]}, {DREAMREC_STATS} says {seq_size}")
        targets[split] = frame[target_column].to_numpy().astype(np.int64)
    data = validate_sequences(name, n_items, histories, targets, str(directory))
    if cache is not None:
        _write_cache(cache, data)
    return data


# --------------------------------------------------------------------------- DiffuRec pickle


class BuiltinsUnpickler(pickle.Unpickler):
    """Admits Python's built-in containers and scalars only: any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}; only builtin "
                                     "dicts, lists, ints and strings are admitted")


def _user_lists(table: Any, what: str, source: str) -> dict[Any, list[int]]:
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise DataError(f"{source}: '{what}' must be a dict of per-user item lists")
    return table


def prefix_rows(sequences: list[np.ndarray], max_len: int, pad: int, first: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix of every sequence as a row: target s_j, history the latest ``max_len`` of
    s_1..s_{j-1} (oldest first, right-padded with ``pad``), for j >= ``first`` + 1."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = np.concatenate(sequences).astype(np.int64) if len(sequences) else np.empty(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(flat)) - np.repeat(starts, lengths)  # index within its sequence
    rows = np.flatnonzero(position >= first)
    return _windows(flat, rows, np.minimum(position[rows], max_len), max_len, pad), flat[rows]


def _windows(flat: np.ndarray, ends: np.ndarray, counts: np.ndarray, max_len: int,
             pad: int) -> np.ndarray:
    """(rows, max_len): flat[end - count : end] left-aligned, right-padded with ``pad``."""
    k = np.arange(max_len)
    index = ends[:, None] - counts[:, None] + k
    return np.where(k < counts[:, None], flat[np.clip(index, 0, max(len(flat) - 1, 0))], pad)


def last_items(sequences: list[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """The latest ``max_len`` items of each sequence, as padded history rows."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = np.concatenate(sequences).astype(np.int64)
    return _windows(flat, np.cumsum(lengths), np.minimum(lengths, max_len), max_len, pad)


def load_diffurec(path: str | Path, sha256: str | None, name: str, max_len: int = 50,
                  cache_dir: Path | None = None) -> SequenceData:
    """DiffuRec's ``dataset.pkl``: ``train``/``val``/``test`` dicts of per-user item lists
    (1-based ids, leave-one-out), read as DiffuRec reads it: a training row for every prefix of
    a user's training sequence; validation's history is the training sequence, test's is
    training + validation; histories keep the latest ``max_len`` items. Ids become 0-based."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    digest = sha256_of(path)  # read once: the check and the cache name
    if sha256 and digest != sha256:
        verify_checksums(path.parent, {path.name: sha256})  # raises, naming the file and fix
    key = _cache_key([digest], {"format": "diffurec", "max_len": max_len})
    cache = cache_dir / f"{name}-{key}.npz" if cache_dir else None
    if cache is not None and (cached := _read_cache(cache, name)) is not None:
        return cached
    try:
        raw = BuiltinsUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a DiffuRec dataset.pkl of builtin dicts and lists "
                        f"({err})") from err
    if not isinstance(raw, dict) or not {"train", "val", "test"} <= set(raw):
        raise DataError(f"{path}: expected a dict with keys 'train', 'val' and 'test'")
    train = _user_lists(raw["train"], "train", str(path))
    valid = _user_lists(raw["val"], "val", str(path))
    test = _user_lists(raw["test"], "test", str(path))
    users = list(train)
    if not users:
        raise DataError(f"{path}: the train split is empty")
    if set(valid) != set(users) or set(test) != set(users):
        raise DataError(f"{path}: 'train', 'val' and 'test' must hold the same users")
    # The one pass over users happens here, at conversion; the cache is read afterwards.
    seq_train = [np.asarray(train[u], dtype=np.int64) - 1 for u in users]
    seq_valid = [np.asarray(valid[u], dtype=np.int64) - 1 for u in users]
    seq_test = [np.asarray(test[u], dtype=np.int64) - 1 for u in users]
    every = np.concatenate([*seq_train, *seq_valid, *seq_test])
    if every.min() < 0:
        raise DataError(f"{path}: item id {int(every.min()) + 1} < 1; DiffuRec ids start at 1")
    if any(len(v) != 1 for v in seq_valid) or any(len(v) != 1 for v in seq_test):
        raise DataError(f"{path}: 'val' and 'test' must hold exactly one item per user "
                        "(leave-one-out)")
    n_items = int(every.max()) + 1
    history, target = prefix_rows(seq_train, max_len, n_items)
    histories = {"train": history,
                 "valid": last_items(seq_train, max_len, n_items),
                 "test": last_items([np.concatenate(p) for p in zip(seq_train, seq_valid)],
                                    max_len, n_items)}
    targets = {"train": target, "valid": np.concatenate(seq_valid),
               "test": np.concatenate(seq_test)}
    data = validate_sequences(name, n_items, histories, targets, str(path))
    if cache is not None:
        _write_cache(cache, data)
    return data
