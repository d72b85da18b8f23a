"""Sequential data: DreamRec's pickles, DiffuRec's dataset.pkl, the safe cache, the generator."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from refit_gym.data import (
    BuiltinsUnpickler,
    DataError,
    SequenceData,
    load_dataset,
    load_diffurec,
    make_sequential_synthetic,
    prefix_rows,
)
from refit_gym.data.sequences import last_history_items
from refit_gym.specs import load_env_spec

PAD = 6  # 6 items, ids 0..5
SPLITS = ("train", "valid", "test")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_dreamrec(directory: Path, train_target: str = "tgt") -> dict:
    """A tiny DreamRec-format folder; returns its [dataset] section with pinned checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = {
        "train_data.df": pd.DataFrame({"seq": [[PAD] * 3, [1, PAD, PAD], [1, 2, PAD]],
                                       "seq_len": [1, 1, 2], train_target: [1, 2, 3]}),
        "val_data.df": pd.DataFrame({"seq": [[4, PAD, PAD]], "len_seq": [1], "next": [5]}),
        "test_data.df": pd.DataFrame({"seq": [[4, 5, PAD]], "len_seq": [2], "next": [0]}),
        "data_statis.df": pd.DataFrame({"seq_size": [3], "item_num": [PAD]}),
    }
    for name, frame in frames.items():
        frame.to_pickle(directory / name)
    return {"name": directory.name, "format": "dreamrec",
            "sha256": {name: _sha(directory / name) for name in frames}}


def test_dreamrec_pickles_load_after_their_checksums(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path / "cache"))
    spec = write_dreamrec(tmp_path / "toy")
    data = load_dataset(spec, tmp_path)
    assert isinstance(data, SequenceData) and data.n_items == PAD and data.max_len == 3
    assert data.histories["train"].tolist() == [[PAD] * 3, [1, PAD, PAD], [1, 2, PAD]]
    assert data.targets["train"].tolist() == [1, 2, 3] and data.targets["test"].tolist() == [0]
    batch = data.train_batch(np.array([2, 0]))
    assert batch["history"].tolist() == [[1, 2, PAD], [PAD] * 3]
    assert batch["target"].tolist() == [3, 1]
    assert data.target_in_train("valid").tolist() == [False]
    # The converted cache serves the next load: no pickle is read again.
    monkeypatch.setattr(pd, "read_pickle", lambda *a, **k: pytest.fail("unpickled again"))
    again = load_dataset(spec, tmp_path)
    assert again.histories["train"].tolist() == data.histories["train"].tolist()


def test_dreamrec_bad_inputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path / "cache"))
    spec = write_dreamrec(tmp_path / "toy")
    unpinned = {**spec, "sha256": {}}
    with pytest.raises(DataError, match="no pinned sha256.*unpickling runs code"):
        load_dataset(unpinned, tmp_path)
    # A pickle that would run code: refused on its checksum, before anything is unpickled.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "toy" / "train_data.df").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="does not match the pinned"):
        load_dataset(spec, tmp_path)
    assert not marker.exists()
    (tmp_path / "toy" / "val_data.df").unlink()
    with pytest.raises(DataError, match="missing"):
        load_dataset(spec, tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ("column", "expected columns 'seq'"),
    ("range", "outside"),
    ("empty", "empty"),
])
def test_dreamrec_malformed_frames(tmp_path: Path, monkeypatch, change: str,
                                   message: str) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "toy"
    write_dreamrec(directory)
    if change == "column":
        pd.DataFrame({"items": [[1, 2, 3]], "next": [1]}).to_pickle(directory / "val_data.df")
    elif change == "range":
        pd.DataFrame({"seq": [[4, PAD, PAD]], "next": [PAD + 3]}).to_pickle(
            directory / "val_data.df")
    else:
        pd.DataFrame({"seq": [], "next": []}).to_pickle(directory / "test_data.df")
    spec = {"name": "toy", "format": "dreamrec",
            "sha256": {f.name: _sha(f) for f in directory.iterdir()}}
    with pytest.raises(DataError, match=message):
        load_dataset(spec, tmp_path)


def test_diffurec_rows_as_diffurec_reads_them(tmp_path: Path) -> None:
    raw = {"train": {0: [1, 2, 3, 4], 1: [5, 6]}, "val": {0: [5], 1: [1]},
           "test": {0: [6], 1: [2]}, "umap": {"a": 0, "b": 1}, "smap": {"x": 1}}
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(raw))
    data = load_diffurec(path, _sha(path), "toy", max_len=2)
    n = 6  # ids 1..6 become 0..5; 6 pads
    assert data.n_items == n
    # Every prefix of a training sequence with a non-empty history, latest 2 items.
    assert data.histories["train"].tolist() == [[0, n], [0, 1], [1, 2], [4, n]]
    assert data.targets["train"].tolist() == [1, 2, 3, 5]
    assert data.histories["valid"].tolist() == [[2, 3], [4, 5]]  # the training sequence
    assert data.targets["valid"].tolist() == [4, 0]
    assert data.histories["test"].tolist() == [[3, 4], [5, 0]]  # training + validation
    assert data.targets["test"].tolist() == [5, 1]
    with pytest.raises(DataError, match="does not match the pinned"):
        load_diffurec(path, "0" * 64, "toy")


def test_diffurec_cache_holds_the_sequences_and_serves_any_max_len(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The cache keeps each user's sequence, not the rows (ML-1M: 2 MB, not 982,089 x 50);
    the rows rebuilt from it equal the converted ones, for any history length."""
    raw = {"train": {0: [1, 2, 3, 4], 1: [5, 6]}, "val": {0: [5], 1: [1]},
           "test": {0: [6], 1: [2]}}
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(raw))
    cache = tmp_path / "cache"
    converted = load_diffurec(path, _sha(path), "toy", max_len=2, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as cached:
        assert sorted(cached.files) == ["lengths", "n_items", "test", "train", "valid"]
        assert cached["train"].tolist() == [0, 1, 2, 3, 4, 5]  # 0-based, users end to end
        assert cached["lengths"].tolist() == [4, 2]
    monkeypatch.setattr(BuiltinsUnpickler, "load", lambda self: pytest.fail("unpickled again"))
    cached = load_diffurec(path, _sha(path), "toy", max_len=2, cache_dir=cache)
    for split in SPLITS:
        for got, want in ((cached.histories, converted.histories),
                          (cached.targets, converted.targets)):
            assert got[split].dtype == want[split].dtype == np.int16
            np.testing.assert_array_equal(got[split], want[split])
    longer = load_diffurec(path, _sha(path), "toy", max_len=3, cache_dir=cache)
    n = 6
    assert longer.histories["train"].tolist() == [[0, n, n], [0, 1, n], [0, 1, 2], [4, n, n]]
    assert longer.histories["test"].tolist() == [[2, 3, 4], [4, 5, 0]]
    assert list(cache.glob("*.npz")) == files


def test_ids_are_held_narrow_and_batched_as_int64() -> None:
    """Ids are held in the narrowest type that holds the pad (int16 up to 32,767 items: a
    quarter of int64's memory) and leave in batches as int64, which cross-entropy needs."""
    for n_items, dtype in ((32767, np.dtype(np.int16)), (32768, np.dtype(np.int32))):
        data = SequenceData("toy", n_items,
                            {s: np.array([[0, n_items - 1, n_items]]) for s in SPLITS},
                            {s: np.array([n_items - 1]) for s in SPLITS})
        assert {a.dtype for a in (*data.histories.values(), *data.targets.values())} == {dtype}
        batch = data.batch("valid", np.array([0]))
        assert batch["history"].dtype == batch["target"].dtype == torch.int64
        assert batch["history"].tolist() == [[0, n_items - 1, n_items]]
        assert batch["target"].tolist() == [n_items - 1]
        assert data.last_items("train").tolist() == [n_items - 1]
    # An id the narrow type would wrap around is refused, not stored as another item.
    with pytest.raises(ValueError, match="do not fit int16"):
        SequenceData("toy", 10, {s: np.array([[70000]]) for s in SPLITS},
                     {s: np.array([1]) for s in SPLITS})


def test_diffurec_refuses_foreign_types_and_bad_structure(tmp_path: Path) -> None:
    from collections import OrderedDict

    path = tmp_path / "dataset.pkl"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for payload in ({"train": Evil()}, OrderedDict(train={})):
        path.write_bytes(pickle.dumps(payload))
        with pytest.raises(DataError, match="only builtin"):
            load_diffurec(path, None, "toy")
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"train": {0: [1, 2]}, "val": {0: [1, 2]}, "test": {0: [3]}}))
    with pytest.raises(DataError, match="exactly one item"):
        load_diffurec(path, None, "toy")
    path.write_bytes(pickle.dumps({"train": {0: [1, 2]}, "val": {0: [3]}}))
    with pytest.raises(DataError, match="'train', 'val' and 'test'"):
        load_diffurec(path, None, "toy")
    path.write_bytes(pickle.dumps({"train": {0: [0, 2]}, "val": {0: [3]}, "test": {0: [4]}}))
    with pytest.raises(DataError, match="start at 1"):
        load_diffurec(path, None, "toy")


def test_prefix_rows_window_and_padding() -> None:
    history, target = prefix_rows([np.array([7, 8, 9]), np.array([1])], max_len=2, pad=10,
                                  first=0)
    # first=0 keeps the empty-history rows (as DreamRec's Zhihu rows do); windows of 2.
    assert history.tolist() == [[10, 10], [7, 10], [7, 8], [10, 10]]
    assert target.tolist() == [7, 8, 9, 1]
    history, target = prefix_rows([np.array([7, 8, 9]), np.array([1])], max_len=1, pad=10)
    assert history.tolist() == [[7], [8]] and target.tolist() == [8, 9]


def test_sequential_synthetic_is_seeded_and_follows_its_chain() -> None:
    a = make_sequential_synthetic(n_items=60, n_communities=3, n_sessions=300, seed=1)
    b = make_sequential_synthetic(n_items=60, n_communities=3, n_sessions=300, seed=1)
    c = make_sequential_synthetic(n_items=60, n_communities=3, n_sessions=300, seed=2)
    assert np.array_equal(a.histories["train"], b.histories["train"])
    assert not np.array_equal(a.targets["train"], c.targets["train"])
    assert all(len(a.targets[s]) > 0 for s in ("train", "valid", "test"))
    # The next item mostly stays in the last item's community (items i % 3): the chain's signal.
    same = np.mean(a.last_items("train") % 3 == a.targets["train"] % 3)
    assert same > 0.8  # stay = 0.85 of in-community steps, plus chance jumps (1/3 of 0.15)


@pytest.mark.ml1m
def test_real_sequential_sets(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFIT_CACHE_DIR", str(tmp_path))
    zhihu = load_dataset(load_env_spec("ReFiT-Zhihu-v0").dataset, data_dir)
    assert zhihu.n_items == 4838 and zhihu.max_len == 10
    assert [len(zhihu.targets[s]) for s in ("train", "valid", "test")] == [61641, 8160, 7911]
    empty = [int((zhihu.histories[s] == 4838).all(1).sum()) for s in ("train", "valid", "test")]
    assert empty == [9371, 1171, 1172]  # ../shared/data/README.md
    beauty = load_dataset(load_env_spec("ReFiT-Beauty-v0").dataset, data_dir)
    assert beauty.n_items == 12101 and beauty.max_len == 50
    assert len(beauty.targets["valid"]) == len(beauty.targets["test"]) == 22363
    # 153,776 training interactions over 22,363 users: one row per item after the first.
    assert beauty.n_train_rows == 153776 - 22363
    ml1m = load_dataset(load_env_spec("ReFiT-ML1MSeq-v0").dataset, data_dir)
    assert ml1m.n_items == 3706 and ml1m.max_len == 50
    assert len(ml1m.targets["valid"]) == len(ml1m.targets["test"]) == 6040
    assert ml1m.n_train_rows == 988129 - 6040
    # ADRec's epoch: one row per user, its latest 50 items and their successor.
    ends = ml1m.sequence_end_rows
    assert len(ends) == 6040 and ends[-1] == ml1m.n_train_rows - 1
    # int16 ids: 94 MiB of ML-1M rows (int64: 375 MiB); the caches hold DiffuRec's sequences,
    # not its rows (the ML-1M rows alone took 405 MB here before).
    assert ml1m.histories["train"].dtype == np.int16
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.npz")) < 10 * 2**20


def test_transitions_count_consecutive_training_pairs() -> None:
    histories = {s: np.array([[0, 1, 4], [4, 4, 4], [2, 4, 4], [2, 4, 4]])
                 for s in ("train", "valid", "test")}
    targets = {s: np.array([2, 3, 1, 1]) for s in ("train", "valid", "test")}
    data = SequenceData("toy", 4, histories, targets)
    assert data.last_items("train").tolist() == [1, -1, 2, 2]
    as_tensor = last_history_items(torch.from_numpy(histories["train"]), 4)  # the same, in torch
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.tolist() == [1, -1, 2, 2]
    expected = np.zeros((4, 4))
    expected[1, 2] = 1  # 0 1 -> 2
    expected[2, 1] = 2  # 2 -> 1, twice; the empty history adds nothing
    np.testing.assert_array_equal(data.transitions().toarray(), expected)


def test_a_new_cache_format_is_a_new_cache(tmp_path: Path, monkeypatch) -> None:
    """A bumped CACHE_FORMAT never reads the old conversion: the files are converted again."""
    import refit_gym.data.sequences as sequences

    cache = tmp_path / "cache"
    monkeypatch.setenv("REFIT_CACHE_DIR", str(cache))
    spec = write_dreamrec(tmp_path / "toy")
    load_dataset(spec, tmp_path)
    first = {p.name for p in cache.rglob("*.npz")}
    assert len(first) == 1
    key = sequences._cache_key(["abc"], {"format": "dreamrec"})
    monkeypatch.setattr(sequences, "CACHE_FORMAT", sequences.CACHE_FORMAT + 1)
    assert sequences._cache_key(["abc"], {"format": "dreamrec"}) != key
    load_dataset(spec, tmp_path)
    assert len({p.name for p in cache.rglob("*.npz")} - first) == 1
