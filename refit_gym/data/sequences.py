"""Sequential-recommendation data: rows of (history, next item), from DreamRec's pandas pickles
and DiffuRec's ``dataset.pkl``, converted once to a safe ``.npz`` cache.

A row's history holds the latest ``max_len`` item ids, oldest first, right-padded with the id
``n_items``; its target is the next item. Ids are held in the narrowest integer type that holds
them (:func:`id_dtype`: int16 up to 32,767 items, a quarter of int64's memory) and become int64
in a batch, as torch's losses need. Pickles run code when loaded, so nothing is unpickled
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
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.fileio import DataError, atomic_path, sha256_of, verify_checksums

SPLITS = ("train", "valid", "test")
HOLDOUT = "holdout"  # the latest training rows, when held out (SequenceData.hold_out_latest)


def id_dtype(n_items: int) -> np.dtype:
    """The narrowest signed integer type holding the ids [0, n_items), the pad ``n_items`` and
    :func:`last_history_items`' -1: int16 up to 32,767 items, else int32."""
    return np.dtype(np.int16) if n_items <= np.iinfo(np.int16).max else np.dtype(np.int32)


def as_ids(array: Any, dtype: np.dtype) -> np.ndarray:
    """``array`` as a C-contiguous array of ``dtype``; refuses a value that the narrower type
    would wrap around (numpy casts silently)."""
    array = np.asarray(array)
    if array.size and not np.can_cast(array.dtype, dtype):
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"ids in [{array.min()}, {array.max()}] do not fit {dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


@dataclass(frozen=True)
class SequenceData:
    """Rows of (history (L,), target) per split; ids in [0, n_items), pad n_items, held as
    :func:`id_dtype` (``n_items``) whatever the arrays given; :meth:`batch` gives int64."""

    name: str
    n_items: int
    histories: dict[str, np.ndarray]  # split -> (rows, L) id_dtype(n_items)
    targets: dict[str, np.ndarray]  # split -> (rows,) id_dtype(n_items)

    def __post_init__(self) -> None:
        dtype = id_dtype(self.n_items)
        for field in ("histories", "targets"):  # frozen: set as dataclasses' own __init__ does
            arrays = getattr(self, field)
            object.__setattr__(self, field, {s: as_ids(a, dtype) for s, a in arrays.items()})

    @property
    def max_len(self) -> int:
        return self.histories["train"].shape[1]

    @property
    def n_train_rows(self) -> int:
        return len(self.targets["train"])

    def batch(self, split: str, rows: np.ndarray, device: torch.device | str = "cpu"
              ) -> dict[str, torch.Tensor]:
        """Rows ``rows`` of ``split`` as a batch ``{"history": (B, L), "target": (B,)}``, int64
        (cross-entropy and one_hot take no narrower targets; converted per batch, not held)."""
        return {"history": torch.from_numpy(self.histories[split][rows]).to(device, torch.long),
                "target": torch.from_numpy(self.targets[split][rows]).to(device, torch.long)}

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

    def next_item_distribution(self) -> sp.csr_matrix:
        """D_out^-1 C (n_items, n_items): row i is the distribution of the training targets
        that follow item i (first order), zero for an item that no training row continues."""
        counts = self.transitions()
        out_deg = np.asarray(counts.sum(axis=1)).ravel()
        return (sp.diags(np.divide(1.0, out_deg, out=np.zeros_like(out_deg), where=out_deg > 0))
                @ counts).tocsr()

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

    @property
    def episode_split(self) -> str:
        """The split whose rows are the MDP's episodes: "holdout" once
        :meth:`hold_out_latest` has made one, else "train"."""
        return HOLDOUT if HOLDOUT in self.targets else "train"

    def hold_out_latest(self) -> SequenceData:
        """This data with each training sequence's latest row (:attr:`sequence_end_rows`) moved
        from "train" into a "holdout" split: pretraining, the peers and the transition graph
        never see those targets, and the MDP's episodes are those rows, so a reward on them
        measures what validation measures (the next item after a whole training prefix) on
        targets no model was fit to. DESIGN defines a holdout for collaborative filtering
        only; this is the sequential counterpart, as a study option."""
        if HOLDOUT in self.targets:
            raise ValueError(f"{self.name}: the latest training rows are held out already")
        held = self.sequence_end_rows
        keep = np.ones(self.n_train_rows, dtype=bool)
        keep[held] = False
        if not keep.any():
            raise ValueError(f"{self.name}: every training row is a sequence's latest; holding "
                             "them out would leave nothing to pretrain on")
        split = {"train": keep, HOLDOUT: held}
        return SequenceData(
            self.name, self.n_items,
            {**self.histories, **{s: self.histories["train"][r] for s, r in split.items()}},
            {**self.targets, **{s: self.targets["train"][r] for s, r in split.items()}})

    def summary(self) -> str:
        rows = " / ".join(f"{s} {len(self.targets[s])}" for s in self.targets)
        return f"{self.name}: {self.n_items} items, history length {self.max_len}, rows {rows}"


ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def last_history_items(history: ArrayOrTensor, pad: int) -> ArrayOrTensor:
    """(rows,) the latest item of each right-padded history row (rows, L), or -1 if empty; a
    numpy array or a torch tensor in (on any device), the same kind out."""
    numpy = isinstance(history, np.ndarray)
    take, where = (np.take_along_axis, np.where) if numpy else (torch.take_along_dim, torch.where)
    length = (history != pad).sum(1)
    last = take(history, (length - 1).clip(0)[:, None], 1)[:, 0]
    return where(length > 0, last, -1)


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
    return SequenceData(name, n_items, dict(histories), dict(targets))


# --------------------------------------------------------------------------- safe cache


# The cache's format version, part of every key: bump it whenever the code that converts the
# source files or lays out the .npz changes, so no stale conversion is ever read back.
# 2: ids in id_dtype, DiffuRec's cache holds the per-user sequences rather than the rows.
CACHE_FORMAT = 2


def _cache_key(file_digests: list[str], extra: Mapping[str, Any]) -> str:
    """A cache name from the source files' sha256 (already computed), the read options and
    :data:`CACHE_FORMAT`."""
    digest = hashlib.sha256(repr(sorted({**extra, "cache_format": CACHE_FORMAT}.items())).encode())
    for file_digest in file_digests:
        digest.update(file_digest.encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path | None, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``names`` of the cache file ``path``, or None when it is absent, unreadable
    or lacks one (then the caller converts the source again)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            return {key: cached[key] for key in names}
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path | None, arrays: Mapping[str, np.ndarray]) -> None:
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)


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
    names = ("n_items", *(f"{s}_{part}" for s in SPLITS for part in ("history", "target")))
    if (cached := _read_cache(cache, names)) is not None:
        return SequenceData(name, int(cached["n_items"]),
                            {s: cached[f"{s}_history"] for s in SPLITS},
                            {s: cached[f"{s}_target"] for s in SPLITS})
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
    _write_cache(cache, {"n_items": np.int64(n_items),
                         **{f"{s}_history": data.histories[s] for s in SPLITS},
                         **{f"{s}_target": data.targets[s] for s in SPLITS}})
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
    s_1..s_{j-1} (oldest first, right-padded with ``pad``), for j >= ``first`` + 1. Returns
    histories (rows, max_len) and targets (rows,), both :func:`id_dtype` (``pad``)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = as_ids(np.concatenate(sequences) if len(sequences) else [], id_dtype(pad))
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(flat)) - np.repeat(starts, lengths)  # index within its sequence
    rows = np.flatnonzero(position >= first)
    return _windows(flat, rows, np.minimum(position[rows], max_len), max_len, pad), flat[rows]


def _windows(flat: np.ndarray, ends: np.ndarray, counts: np.ndarray, max_len: int,
             pad: int) -> np.ndarray:
    """(rows, max_len) :func:`id_dtype` (``pad``): flat[end - count : end] left-aligned,
    right-padded with ``pad``. Filled a column at a time, so that the temporaries are of one
    column's size, not of the table's (ML-1M: 982,089 rows x 50)."""
    out = np.full((len(ends), max_len), pad, dtype=id_dtype(pad))
    starts = ends - counts
    for k in range(max_len):
        filled = np.flatnonzero(counts > k)
        out[filled, k] = flat[starts[filled] + k]
    return out


def last_items(sequences: list[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """The latest ``max_len`` items of each sequence, as padded history rows."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = as_ids(np.concatenate(sequences), id_dtype(pad))
    return _windows(flat, np.cumsum(lengths), np.minimum(lengths, max_len), max_len, pad)


def _diffurec_rows(name: str, n_items: int, train: list[np.ndarray], valid: np.ndarray,
                   test: np.ndarray, max_len: int, source: str) -> SequenceData:
    """DiffuRec's rows from each user's training sequence and validation and test items
    (users,): a training row for every prefix, validation's history the training sequence,
    test's training + validation, each the latest ``max_len`` items."""
    history, target = prefix_rows(train, max_len, n_items)
    histories = {"train": history,
                 "valid": last_items(train, max_len, n_items),
                 "test": last_items([np.append(s, v) for s, v in zip(train, valid, strict=True)],
                                    max_len, n_items)}
    targets = {"train": target, "valid": valid, "test": test}
    return validate_sequences(name, n_items, histories, targets, source)


def load_diffurec(path: str | Path, sha256: str | None, name: str, max_len: int = 50,
                  cache_dir: Path | None = None) -> SequenceData:
    """DiffuRec's ``dataset.pkl``: ``train``/``val``/``test`` dicts of per-user item lists
    (1-based ids, leave-one-out), read as DiffuRec reads it: a training row for every prefix of
    a user's training sequence; validation's history is the training sequence, test's is
    training + validation; histories keep the latest ``max_len`` items. Ids become 0-based.

    The cache holds the per-user sequences (ML-1M: 2 MB), not the rows they lay out (ML-1M:
    982,089 x 50), which are rebuilt from them on every load."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    digest = sha256_of(path)  # read once: the check and the cache name
    if sha256 and digest != sha256:
        verify_checksums(path.parent, {path.name: sha256})  # raises, naming the file and fix
    key = _cache_key([digest], {"format": "diffurec"})  # sequences: any max_len reads them
    cache = cache_dir / f"{name}-{key}.npz" if cache_dir else None
    if (cached := _read_cache(cache, ("n_items", "train", "lengths", "valid", "test"))) is not None:
        n_items = int(cached["n_items"])
        train = np.split(cached["train"], np.cumsum(cached["lengths"])[:-1])
        return _diffurec_rows(name, n_items, train, cached["valid"], cached["test"], max_len,
                              str(cache))
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
    dtype = id_dtype(n_items)
    valid, test = as_ids(np.concatenate(seq_valid), dtype), as_ids(np.concatenate(seq_test), dtype)
    data = _diffurec_rows(name, n_items, seq_train, valid, test, max_len, str(path))
    lengths = np.array([len(s) for s in seq_train], dtype=np.int64)
    _write_cache(cache, {"n_items": np.int64(n_items), "lengths": lengths,
                         "train": as_ids(np.concatenate(seq_train), dtype),
                         "valid": valid, "test": test})
    return data
