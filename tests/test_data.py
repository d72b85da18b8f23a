from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from refit_gym.data import (
    DataError,
    atomic_path,
    carve_validation,
    dense_rows,
    load_dataset,
    load_diffrec,
    load_lightgcn,
    load_movielens_ratings,
    write_json,
)
from refit_gym.data.synthetic import make_synthetic
from refit_gym.specs import load_env_spec


def write_diffrec(directory: Path, train, valid, test) -> Path:
    """Write DiffRec-format split files (lists of (user, item) pairs) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", train), ("valid", valid), ("test", test)):
        np.save(directory / f"{split}_list.npy", np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    return directory


TRAIN = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 3)]
VALID = [(0, 2), (1, 0), (2, 1)]
TEST = [(0, 3), (1, 3), (2, 2)]


def test_diffrec_loads_sparse_splits(tmp_path: Path) -> None:
    data = load_diffrec(write_diffrec(tmp_path / "tiny", TRAIN, VALID, TEST))
    assert (data.name, data.n_users, data.n_items) == ("tiny", 3, 4)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (6, 3, 3)
    rows = dense_rows(data.train, np.array([2, 0]))
    assert rows.dtype.is_floating_point and rows.shape == (2, 4)
    assert rows.tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]


def test_train_order_is_the_listed_order_within_each_user(tmp_path: Path) -> None:
    # User 0 lists items 3, 0, 2 (in that order); user 1's pairs are interleaved with user 0's.
    train = [(0, 3), (1, 1), (0, 0), (1, 0), (0, 2)]
    data = load_diffrec(write_diffrec(tmp_path / "order", train, [(0, 1)], [(1, 2)]))
    order = data.train_order
    assert order is not None
    assert (order.indptr.tolist(), order.indices.tolist()) == (
        data.train.indptr.tolist(), data.train.indices.tolist())
    assert order[0].toarray().tolist() == [[2, 0, 3, 1]]  # items 0, 2, 3 came 2nd, 3rd, 1st
    assert order[1].toarray().tolist() == [[2, 1, 0, 0]]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "valid_list.npy").unlink(), "missing data file"),
        (lambda d: np.save(d / "train_list.npy", np.zeros((3, 2), np.float32)), "dtype float32"),
        (lambda d: np.save(d / "train_list.npy", np.zeros((3, 3), np.int64)), "shape (3, 3)"),
        (lambda d: np.save(d / "test_list.npy", np.array([[0, -1]])), "negative item id"),
        (lambda d: np.save(d / "test_list.npy", np.array([[0, 9]])), "unknown item id 9"),
        (lambda d: np.save(d / "valid_list.npy", np.array([[7, 0]])), "unknown user id 7"),
        (lambda d: np.save(d / "test_list.npy", np.zeros((0, 2), np.int64)), "test split is empty"),
        (lambda d: np.save(d / "train_list.npy", np.array([*TRAIN, (0, 1)])), "duplicate"),
        (lambda d: np.save(d / "test_list.npy", np.array([(0, 0)])), "in both train and test"),
        (lambda d: np.save(d / "train_list.npy", np.array([None, 1], dtype=object),
                           allow_pickle=True), "not a readable .npy"),
    ],
)
def test_diffrec_bad_files_raise_clear_errors(tmp_path: Path, mutate, message: str) -> None:
    directory = write_diffrec(tmp_path / "bad", TRAIN, VALID, TEST)
    mutate(directory)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_diffrec(directory)


def test_lightgcn_text_and_carved_validation(tmp_path: Path) -> None:
    directory = tmp_path / "book"
    directory.mkdir()
    (directory / "train.txt").write_text(
        "0 0 1 2 3 4 5 6 7 8 9\n1 2 3 4 5 6 7 8 9 10 11\n2 5 6\n3 1\n"
    )
    (directory / "test.txt").write_text("0 10\n1 0\n2\n3 4\n")  # user 2 has an empty test line
    data = load_lightgcn(directory, valid_fraction=0.2, split_seed=7)
    assert (data.n_users, data.n_items) == (4, 12)
    assert data.valid.getnnz(axis=1).tolist() == [2, 2, 0, 0]  # round(0.2 n), >= 1 kept in train
    assert data.train.nnz + data.valid.nnz == 23
    assert data.train.multiply(data.valid).nnz == 0
    assert data.train_order is None  # KGAT's lines record no chronological order
    again = load_lightgcn(directory, valid_fraction=0.2, split_seed=7)
    other = load_lightgcn(directory, valid_fraction=0.2, split_seed=8)
    assert (again.valid != data.valid).nnz == 0
    assert (other.valid != data.valid).nnz > 0


def test_lightgcn_uses_valid_file_and_rejects_garbage(tmp_path: Path) -> None:
    directory = tmp_path / "withvalid"
    directory.mkdir()
    (directory / "train.txt").write_text("0 0 1\n1 1 2\n")
    (directory / "valid.txt").write_text("0 2\n1 0\n")
    (directory / "test.txt").write_text("0 x\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected integer ids"):
        load_lightgcn(directory)
    (directory / "test.txt").write_text("1 3\n")
    with pytest.raises(DataError, match="unknown item id 3"):
        load_lightgcn(directory)
    (directory / "test.txt").write_text("0 2\n")
    with pytest.raises(DataError, match="in both valid and test"):
        load_lightgcn(directory)


def test_carve_validation_keeps_one_training_item_per_user() -> None:
    pairs = np.array([(0, 0), (1, 0), (1, 1)])
    train, valid = carve_validation(pairs, 0.9, seed=0)
    assert sorted(map(tuple, train)) in ([(0, 0), (1, 0)], [(0, 0), (1, 1)])
    assert len(valid) == 1


def test_movielens_ratings_preprocessing(tmp_path: Path) -> None:
    lines = []
    for k in range(10):  # time 1000 + k; user 2 watches the movies in reverse order
        rating = 2 if k == 4 else 5  # one low rating per user is dropped
        lines.append(f"1::{100 + k}::{rating}::{1000 + k}")
        lines.append(f"2::{109 - k}::{rating}::{1000 + k}")
    lines += ["3::100::5::1", "4::100::5::1", "4::101::4::2", "4::200::5::3"]
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n")
    data = load_movielens_ratings(tmp_path / "ratings.dat")
    assert data.n_users == 3  # user 3 has one kept rating: dropped
    # 9 kept ratings: 1 test (floor(0.9) -> 1), 1 valid (floor(1.8)), the 7 earliest train.
    assert data.train.getnnz(axis=1).tolist() == [7, 7, 1]
    assert data.valid.getnnz(axis=1).tolist() == [1, 1, 1]
    # Movie 200 occurs only in user 4's test: an item never in train is dropped.
    assert data.test.getnnz(axis=1).tolist() == [1, 1, 0]
    assert data.n_items == 10
    first_user_train = data.train[0].indices.tolist()
    assert data.valid[0].indices.tolist() == [8] and data.test[0].indices.tolist() == [9]
    assert first_user_train == [0, 1, 2, 3, 5, 6, 7]
    # User 2 watched items 9, 8, 7, 6, 4 (movies 109, 108, ...; 105 rated low): by time.
    assert data.train_order[1].toarray().ravel()[[9, 8, 7, 6, 4]].tolist() == [1, 2, 3, 4, 5]
    (tmp_path / "bad.dat").write_text("1::2::5\n")
    with pytest.raises(DataError, match="user::movie::rating::timestamp"):
        load_movielens_ratings(tmp_path / "bad.dat")


def test_load_dataset_errors_say_where_and_how(tmp_path: Path) -> None:
    spec = {k: v for k, v in load_env_spec("ReFiT-ML1M-v0").dataset.items() if k != "sha256"}
    with pytest.raises(DataError, match=r"\(data of ReFiT-ML1M-v0\).*REFIT_DATA_DIR.*DiffRec"):
        load_dataset(spec, tmp_path)
    with pytest.raises(DataError, match=r"run `refit-gym download --env ReFiT-Zhihu-v0`"):
        load_dataset(load_env_spec("ReFiT-Zhihu-v0").dataset, tmp_path)
    write_diffrec(tmp_path / "ml-1m_clean", TRAIN, VALID, TEST)
    pinned = {**spec, "sha256": {"train_list.npy": "0" * 64}}
    with pytest.raises(DataError, match="does not match the pinned") as error:
        load_dataset(pinned, tmp_path)
    # gym.make and the CLI have no verify=False to offer; the message names none
    assert "verify" not in str(error.value)
    assert str(error.value).endswith("replace it with the published file.")
    downloadable = {**pinned, "urls": {"train_list.npy": "https://example.org/train_list.npy"}}
    with pytest.raises(DataError, match=r"\(`refit-gym download --env ReFiT-ML1M-v0` fetches"):
        load_dataset(downloadable, tmp_path)
    assert load_dataset(pinned, tmp_path, verify=False).n_users == 3
    with pytest.raises(DataError, match="unknown dataset format"):
        load_dataset({"name": "x", "format": "parquet"}, tmp_path)


def test_synthetic_is_seeded_and_structured() -> None:
    a = make_synthetic(n_users=200, n_items=150, mean_interactions=10, seed=1)
    b = make_synthetic(n_users=200, n_items=150, mean_interactions=10, seed=1)
    c = make_synthetic(n_users=200, n_items=150, mean_interactions=10, seed=2)
    assert (a.train != b.train).nnz == 0 and (a.test != b.test).nnz == 0
    assert (a.train != c.train).nnz > 0
    assert a.valid.getnnz(axis=1).min() >= 1 and a.test.getnnz(axis=1).min() >= 1
    assert a.train.multiply(a.test).nnz == 0 and a.train.multiply(a.valid).nnz == 0
    # Community structure: items co-occur far more often than under independence.
    co = (a.train.T @ a.train).toarray()
    np.fill_diagonal(co, 0)
    pop = np.asarray(a.train.sum(0)).ravel()
    expected = np.outer(pop, pop) / a.n_users
    top = co > np.quantile(co, 0.99)
    assert co[top].sum() > 2 * expected[top].sum()


def test_synthetic_drift_moves_the_latest_interactions_only() -> None:
    args = {"n_users": 200, "n_items": 150, "mean_interactions": 10, "seed": 1}
    still, drifting = make_synthetic(**args), make_synthetic(**args, drift=0.5)
    again = make_synthetic(**args, drift=0.5)
    assert (make_synthetic(**args, drift=0.0).train != still.train).nnz == 0
    assert (drifting.train != again.train).nnz == 0 and (drifting.test != again.test).nnz == 0
    total = [sum(m.getnnz(axis=1) for m in (d.train, d.valid, d.test))
             for d in (still, drifting)]
    np.testing.assert_array_equal(*total)  # each user keeps their number of interactions
    assert drifting.train.multiply(drifting.test).nnz == 0  # still no repeats across splits
    # Interests move over time: each user's held-out items overlap less with what the user's
    # earliest interactions co-occur with than without drift.
    def early_overlap(d) -> float:
        order = d.train_order.tocsr()
        early = order.copy()
        early.data = (early.data <= 4).astype(np.float64)
        early.eliminate_zeros()
        neighbours = early @ (d.train.T @ d.train)
        return float(neighbours.multiply(d.test).sum() / neighbours.sum())
    assert early_overlap(drifting) < 0.8 * early_overlap(still)
    with pytest.raises(ValueError, match="drift"):
        make_synthetic(**args, drift=1.0)


@pytest.mark.ml1m
def test_ml1m_reference_split(ml1m) -> None:
    assert (ml1m.n_users, ml1m.n_items) == (5949, 2810)
    assert (ml1m.train.nnz, ml1m.valid.nnz, ml1m.test.nnz) == (403277, 110722, 57532)
    assert ml1m.valid.getnnz(axis=1).min() >= 1 and ml1m.test.getnnz(axis=1).min() >= 1
    # train_list.npy lists user 0's 30 training items as 0, 1, ..., 29 (first seen first).
    assert ml1m.train_order[0, :30].toarray().ravel().tolist() == list(range(1, 31))


def test_written_files_are_as_readable_as_the_umask_says(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "shared.json", {"a": 1})
        with atomic_path(tmp_path / "shared.bin") as tmp:
            tmp.write_bytes(b"weights")
        os.umask(0o077)
        write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source, target) -> None:
        events.append(("replace", str(source)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_json(tmp_path / "result.json", {"a": 1})
    renamed = [path for kind, path in events if kind == "replace"]
    assert len(renamed) == 1 and ("fsync", renamed[0]) in events, events
    assert events.index(("fsync", renamed[0])) < events.index(("replace", renamed[0]))
    assert json.loads((tmp_path / "result.json").read_text()) == {"a": 1}
