"""Shared fixtures. Real-data tests read REFIT_DATA_DIR; in CI (CI=true) they must run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from refit_gym.data import InteractionData, load_dataset
from refit_gym.data.synthetic import make_synthetic
from refit_gym.specs import load_env_spec


def _data_dir() -> Path:
    if os.environ.get("REFIT_DATA_DIR"):
        return Path(os.environ["REFIT_DATA_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def sb3_log_dir(tmp_path_factory) -> Iterator[None]:
    """SB3's `learn` without a logger of its own makes an SB3-<date> folder in the system's
    temporary directory on every call; the tests' go to one folder of the session's instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3-logs")))
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    directory = _data_dir()
    if not (directory / "ml-1m_clean" / "train_list.npy").is_file():
        message = f"reference data not found under {directory}; set REFIT_DATA_DIR"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (in CI the real-data tests must run, not skip)")
        pytest.skip(message)
    return directory


@pytest.fixture(scope="session")
def ml1m(data_dir: Path) -> InteractionData:
    return load_dataset(load_env_spec("ReFiT-ML1M-v0").dataset, data_dir)


@pytest.fixture(scope="session")
def small_data() -> InteractionData:
    return make_synthetic(n_users=120, n_items=80, n_communities=4, mean_interactions=12, seed=3)


def _pretrained(tmp_path_factory, env_id: str, epochs: int) -> Path:
    """``env_id``'s backbone pretrained for ``epochs`` epochs through the CLI (its denoiser.pt)."""
    from refit_gym.cli import main

    out = tmp_path_factory.mktemp(env_id)
    assert main(["pretrain", "--env", env_id, "--seed", "1", "--out", str(out),
                 "--max-epochs", str(epochs), "--quiet"]) == 0
    return out / "denoiser.pt"


@pytest.fixture(scope="session")
def pretrained_synthetic(tmp_path_factory) -> Path:
    return _pretrained(tmp_path_factory, "ReFiT-Synthetic-v0", 10)


@pytest.fixture(scope="session")
def pretrained_seq_synthetic(tmp_path_factory) -> Path:
    return _pretrained(tmp_path_factory, "ReFiT-SeqSynthetic-v0", 5)
