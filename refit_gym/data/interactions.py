"""Collaborative-filtering data: one sparse dataset object from DiffRec, LightGCN/KGAT and
GroupLens files.

Everything is stored as CSR (users x items, float32 ones); only a batch of rows is ever densified
(:func:`dense_rows`). Loaders validate their files and raise :class:`DataError` with a message
that names the file, the problem and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.fileio import DataError


@dataclass(frozen=True)
class InteractionData:
    """Binary user-item interactions split into train / valid / test, all (n_users, n_items).

    ``train_order``: the same pattern as ``train``, each entry the interaction's position in its
    user's chronological sequence (1 = earliest, float32, exact to 2**24); None when the source
    records no order. It is what a temporal holdout hides the latest part of.
    """

    name: str
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    train_order: sp.csr_matrix | None = None

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def n_train_rows(self) -> int:
        """Rows a training epoch passes over: the users."""
        return self.n_users

    @property
    def episode_split(self) -> str:
        """The split whose rows are the MDP's episodes (a CF holdout hides part of each
        training history instead: :class:`refit_gym.mdp.episodes.InteractionEpisodes`)."""
        return "train"

    def train_batch(self, rows: np.ndarray, device: torch.device | str = "cpu"
                    ) -> dict[str, torch.Tensor]:
        """Training rows ``rows`` as a backbone batch: ``{"history": (B, n_items)}``."""
        return {"history": dense_rows(self.train, rows, device)}

    def summary(self) -> str:
        return (
            f"{self.name}: {self.n_users} users, {self.n_items} items, interactions "
            f"train {self.train.nnz} / valid {self.valid.nnz} / test {self.test.nnz}"
        )


def dense_rows(
    matrix: sp.csr_matrix, users: np.ndarray, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rows ``users`` of a sparse matrix as a dense float32 tensor of shape (len(users), n)."""
    return torch.from_numpy(matrix[users].toarray().astype(np.float32, copy=False)).to(device)


# --------------------------------------------------------------------------- pairs -> CSR


def _check_ids(array: np.ndarray, what: str, source: str) -> None:
    if array.size and array.min() < 0:
        raise DataError(f"{source}: negative {what} id {int(array.min())}; ids must be >= 0")


def pairs_to_csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int], source: str):
    """Binary CSR matrix from (user, item) id arrays; duplicate or out-of-range ids are errors."""
    _check_ids(users, "user", source)
    _check_ids(items, "item", source)
    n_users, n_items = shape
    if users.size and users.max() >= n_users:
        raise DataError(
            f"{source}: unknown user id {int(users.max())} (the training split has {n_users} "
            "users); every user must appear in the training file"
        )
    if items.size and items.max() >= n_items:
        raise DataError(
            f"{source}: unknown item id {int(items.max())} (the training split has {n_items} "
            "items); every item must appear in the training file"
        )
    ones = np.ones(len(users), dtype=np.float32)
    matrix = sp.csr_matrix((ones, (users, items)), shape=shape)
    matrix.sum_duplicates()
    if matrix.nnz != len(users):
        first = int(np.flatnonzero(matrix.data > 1)[0])
        row = int(np.searchsorted(matrix.indptr, first, side="right") - 1)
        raise DataError(
            f"{source}: {len(users) - matrix.nnz} duplicate (user, item) pairs, e.g. user {row} "
            f"item {int(matrix.indices[first])}; each interaction must be listed once"
        )
    return matrix


def rank_within_user(sorted_users: np.ndarray) -> np.ndarray:
    """Each entry's 0-based position among its user's entries; ``sorted_users`` holds user ids
    in ascending order (grouped by user, as after a sort by user)."""
    counts = np.bincount(sorted_users)
    return np.arange(len(sorted_users)) - (np.cumsum(counts) - counts)[sorted_users]


def order_matrix(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Each pair's position among its user's pairs, in the order listed (1 = first), as a CSR
    matrix with the pattern of ``pairs_to_csr(users, items, ...)`` (pairs must be unique)."""
    by_user = np.argsort(users, kind="stable")
    position = np.empty(len(users), dtype=np.float32)
    position[by_user] = rank_within_user(users[by_user]) + 1
    matrix = sp.csr_matrix((position, (users, items)), shape=shape)
    matrix.sum_duplicates()  # canonical (sorted) like pairs_to_csr's; there are no duplicates
    return matrix


def _check_disjoint(splits: Mapping[str, sp.csr_matrix], source: str) -> None:
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = splits[a].multiply(splits[b]).nnz
            if overlap:
                raise DataError(
                    f"{source}: {overlap} (user, item) pairs are in both {a} and {b}; splits must "
                    "be disjoint or evaluation leaks training data"
                )


def _from_splits(name: str, pairs: Mapping[str, np.ndarray], sources: Mapping[str, str],
                 chronological: bool):
    """Build the dataset; ids are sized by the training split, as DiffRec does.

    ``chronological``: each user's training pairs are listed oldest first (kept as
    ``train_order``)."""
    for split, p in pairs.items():
        if len(p) == 0:
            raise DataError(f"{sources[split]}: the {split} split is empty")
    train = pairs["train"]
    shape = (int(train[:, 0].max()) + 1, int(train[:, 1].max()) + 1)
    matrices = {s: pairs_to_csr(p[:, 0], p[:, 1], shape, sources[s]) for s, p in pairs.items()}
    _check_disjoint(matrices, f"{name} ({Path(sources['train']).parent})")
    order = order_matrix(train[:, 0], train[:, 1], shape) if chronological else None
    return InteractionData(name, matrices["train"], matrices["valid"], matrices["test"], order)


# --------------------------------------------------------------------------- formats


def _load_pairs_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array of (user, item) pairs ({err})") from err
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: dtype {array.dtype}, expected an integer array of ids")
    if array.ndim != 2 or array.shape[1] != 2:
        raise DataError(f"{path}: shape {array.shape}, expected (n_pairs, 2) of (user, item)")
    return array.astype(np.int64, copy=False)


def load_diffrec(directory: str | os.PathLike[str], name: str | None = None) -> InteractionData:
    """DiffRec's ``{train,valid,test}_list.npy``: int (n, 2) arrays of 0-based (user, item),
    chronological within a user (DiffRec's split: valid and test hold the later interactions)."""
    directory = Path(directory)
    sources = {s: str(directory / f"{s}_list.npy") for s in ("train", "valid", "test")}
    pairs = {s: _load_pairs_npy(Path(p)) for s, p in sources.items()}
    return _from_splits(name or directory.name, pairs, sources, chronological=True)


def _read_adjacency_text(path: Path) -> np.ndarray:
    """``user item item ...`` lines -> (n, 2) pairs. Lines with a user and no items are allowed."""
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                ids = np.array(fields, dtype=np.int64)
            except ValueError as err:
                raise DataError(
                    f"{path}:{line_no}: expected integer ids 'user item item ...', got "
                    f"{line.strip()[:60]!r}"
                ) from err
            users.append(np.full(len(ids) - 1, ids[0]))
            items.append(ids[1:])
    if not users:
        return np.empty((0, 2), dtype=np.int64)
    return np.stack([np.concatenate(users), np.concatenate(items)], axis=1)


def carve_validation(pairs: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Split each user's pairs into (train, valid): round(fraction * n_u) random valid items.

    Seeded; a user always keeps at least one training item (users with one item keep it).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    users = pairs[:, 0]
    order = np.lexsort((rng.random(len(pairs)), users))  # by user, random within a user
    counts = np.bincount(users)
    sorted_users = users[order]
    rank = rank_within_user(sorted_users)
    n_valid = np.minimum(np.round(counts * fraction), np.maximum(counts - 1, 0))
    is_valid = np.zeros(len(pairs), dtype=bool)
    is_valid[order] = rank < n_valid[sorted_users]
    return pairs[~is_valid], pairs[is_valid]


def load_lightgcn(
    directory: str | os.PathLike[str],
    name: str | None = None,
    valid_fraction: float = 0.1,
    split_seed: int = 2024,
) -> InteractionData:
    """LightGCN/KGAT text (``train.txt``, ``test.txt``; a ``valid.txt`` is used when present).

    Without ``valid.txt`` (KGAT's Amazon-Book) a validation split is carved from train:
    ``round(valid_fraction * n_u)`` of each user's training items, chosen with ``split_seed``.
    """
    directory = Path(directory)
    train = _read_adjacency_text(directory / "train.txt")
    test = _read_adjacency_text(directory / "test.txt")
    sources = {s: str(directory / f"{s}.txt") for s in ("train", "valid", "test")}
    if (directory / "valid.txt").is_file():
        valid = _read_adjacency_text(directory / "valid.txt")
    else:
        if len(train) == 0:
            raise DataError(f"{sources['train']}: the train split is empty")
        train, valid = carve_validation(train, valid_fraction, split_seed)
        sources["valid"] = f"{sources['train']} (carved validation)"
    # KGAT's files do not document an order within a line: no train_order.
    return _from_splits(name or directory.name, {"train": train, "valid": valid, "test": test},
                        sources, chronological=False)


def load_movielens_ratings(
    path: str | os.PathLike[str],
    name: str = "ml-1m",
    min_rating: int = 4,
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> InteractionData:
    """GroupLens ``ratings.dat`` (``user::movie::rating::timestamp``) -> a DiffRec-style split.

    Preprocessing (ours, after DiffRec's "clean" ML-1M): keep ratings >= ``min_rating``; order
    each user's interactions by time (ties broken by a ``seed``-ed shuffle); the earliest
    ``fractions[0]`` go to train, the next ``fractions[1]`` to valid, the latest to test, each
    user keeping at least one of each (users with fewer than 3 kept ratings are dropped); items
    that never occur in train are dropped; users and items are renumbered densely from 0.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing ratings file {path}")
    try:
        table = np.array(path.read_text().replace("::", " ").split(), dtype=np.int64)
        table = table.reshape(-1, 4)
    except ValueError as err:
        raise DataError(
            f"{path}: expected 'user::movie::rating::timestamp' integer lines ({err})"
        ) from err
    table = table[table[:, 2] >= min_rating]
    rng = np.random.default_rng(seed)
    users, items, times = table[:, 0], table[:, 1], table[:, 3]
    order = np.lexsort((rng.random(len(table)), times, users))
    users, items = users[order], items[order]
    _, users = np.unique(users, return_inverse=True)
    counts = np.bincount(users)
    rank = rank_within_user(users)
    n = counts[users]
    n_test = np.maximum(1, np.floor(n * fractions[2]))
    n_valid = np.maximum(1, np.floor(n * fractions[1]))
    split = np.where(rank >= n - n_test, 2, np.where(rank >= n - n_test - n_valid, 1, 0))
    keep = n >= 3
    users, items, split = users[keep], items[keep], split[keep]
    train_items = np.unique(items[split == 0])
    keep = np.isin(items, train_items)
    users, items, split = users[keep], items[keep], split[keep]
    _, users = np.unique(users, return_inverse=True)
    items = np.searchsorted(train_items, items)
    pairs = {s: np.stack([users[split == k], items[split == k]], axis=1)
             for k, s in enumerate(("train", "valid", "test"))}
    return _from_splits(name, pairs, dict.fromkeys(pairs, str(path)), chronological=True)
