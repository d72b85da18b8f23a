"""A user's own dataset: a spec file anywhere, registered from Python or the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import refit_gym
from refit_gym.cli import main
from refit_gym.data import make_synthetic
from refit_gym.specs import SpecError

CF_SPEC = """
id = "MyShop-v0"

[dataset]
name = "myshop"
format = "diffrec"
path = "data/myshop"        # relative to this file

[diffusion]
steps = 5
noise_scale = 0.005
noise_min = 0.005
noise_max = 0.01

[backbone]
type = "diffrec"
dims = [16]

[pretrain]
batch_size = 32
eval_every = 1
max_epochs = 2

[env]
reward = "hit"

[env.reward_params]
k = 5
"""

SEQ_SPEC = """
id = "MySessions-v0"

[dataset]
name = "sessions"
format = "diffurec"
path = "sessions"
max_len = 4

[diffusion]
steps = 10
schedule = "linear"

[backbone]
type = "dreamrec"
max_len = 4
hidden = 8

[pretrain]
batch_size = 16
importance_sampling = false
eval_every = 1
max_epochs = 2
selection_metric = "hr@5"
ks = [5]
final_sampling_seeds = 2

[env]
steps = 5
reward = "collaborative"

[env.reward_params]
tau = 0.5
"""


def _write_cf_data(folder: Path) -> None:
    data = make_synthetic(n_users=40, n_items=30, mean_interactions=6, seed=1)
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        matrix = getattr(data, split).tocoo()
        order = np.lexsort((matrix.col, matrix.row))
        np.save(folder / f"{split}_list.npy",
                np.stack([matrix.row[order], matrix.col[order]], 1).astype(np.int64))


def _write_sessions(folder: Path) -> None:
    rng = np.random.default_rng(0)
    train = {u: [int(i) for i in rng.integers(1, 13, size=rng.integers(3, 8))] for u in range(30)}
    folder.mkdir(parents=True)
    (folder / "dataset.pkl").write_bytes(pickle.dumps({
        "train": train, "val": {u: [int(rng.integers(1, 13))] for u in train},
        "test": {u: [int(rng.integers(1, 13))] for u in train}}))


def test_cf_spec_from_a_folder_of_ones_own(tmp_path: Path, monkeypatch) -> None:
    _write_cf_data(tmp_path / "data" / "myshop")
    (tmp_path / "spec.toml").write_text(CF_SPEC)
    monkeypatch.chdir(tmp_path)
    spec = refit_gym.register_spec(tmp_path / "spec.toml")
    env = gym.make(spec.id)
    obs, _ = env.reset(seed=0)
    assert obs["x"].shape == (30,) and obs["t"] == 5
    report = tmp_path / "eval.json"
    assert main(["pretrain", "--spec", "spec.toml", "--out", "pre", "--quiet"]) == 0
    assert main(["evaluate", "--spec", "spec.toml", "--checkpoint", "pre/denoiser.pt",
                 "--json", str(report), "--quiet"]) == 0
    assert set(json.loads(report.read_text())["test"]) == {
        "recall@10", "recall@20", "ndcg@10", "ndcg@20"}


def test_sequential_spec_from_a_folder_of_ones_own(tmp_path: Path, monkeypatch) -> None:
    _write_sessions(tmp_path / "sessions")
    (tmp_path / "seq.toml").write_text(SEQ_SPEC)
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--spec", "seq.toml", "--quiet"]) == 0  # runs/<id>/pretrain-seed1
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--spec", "seq.toml", "--checkpoint",
                 "runs/MySessions-v0/pretrain-seed1/denoiser.pt", "--json", str(report),
                 "--quiet"]) == 0
    assert set(json.loads(report.read_text())["test"]) == {"hr@5", "ndcg@5"}
    env = gym.make("MySessions-v0")  # the default checkpoint of `refit-gym pretrain`
    obs, _ = env.reset(seed=0)
    assert obs["x"].shape == (8,) and obs["history"].shape == (4,) and obs["t"] == 5


def test_malformed_specs_name_the_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CF_SPEC.replace("batch_size = 32", "batch_sise = 32"))
    with pytest.raises(SpecError, match=r"\[pretrain\]: unknown keys \['batch_sise'\]"):
        refit_gym.register_spec(bad)
    bad.write_text(CF_SPEC.replace('format = "diffrec"', 'format = "parquet"'))
    with pytest.raises(SpecError, match="format.*diffurec"):
        refit_gym.register_spec(bad)
    bad.write_text(CF_SPEC.replace('type = "diffrec"', 'type = "vae"'))
    with pytest.raises(SpecError, match="unknown backbone 'vae'"):
        refit_gym.register_spec(bad)
    bad.write_text(CF_SPEC.replace('id = "MyShop-v0"', 'id = "ReFiT-ML1M-v0"'))
    assert main(["pretrain", "--spec", str(bad), "--quiet"]) == 2
    assert "one of the package's" in capsys.readouterr().err
