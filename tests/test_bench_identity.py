"""Bench cells carry their identity and machine; a cell is reused only under its identity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import refit_gym.training.bench as bench
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec

SYN = "ReFiT-Synthetic-v0"


def test_cells_record_identity_and_are_reused_only_when_it_matches(tmp_path: Path,
                                                                   monkeypatch) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    bench.run_bench(spec, data, ["pop"], [1], tmp_path, progress=False)
    report = tmp_path / "seed1" / "pop" / "metrics.json"
    cell = json.loads(report.read_text())
    assert cell["identity"] == {"algo": "pop", "seed": 1, "hyperparams": [{}],
                                "spec": bench.spec_digest(spec, without=bench.PEER_BLIND),
                                "ks": list(spec.pretrain.ks), "data": bench.data_digest(data),
                                "version": cell["identity"]["version"]}
    assert set(cell["machine"]) == {"cpu", "cpu_capability", "threads", "torch", "device"}
    table = (tmp_path / "results.md").read_text()
    assert "## Cells" in table
    assert f"| 1 | pop | {bench.digest(cell['identity'])[:12]} | {cell['machine']['cpu']} |" \
        in table

    def no_more_work(*args, **kwargs):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(bench, "tune_peer", no_more_work)
    again = bench.run_bench(spec, data, ["pop"], [1], tmp_path, progress=False)
    assert again["cells"]["pop"][0]["test"] == cell["test"]  # reused, not recomputed

    cell["identity"]["data"] = "0" * 64  # as if another dataset had filled it
    report.write_text(json.dumps(cell))
    with pytest.raises(bench.CellMismatch, match=r"seed1/pop was computed with data = ") as err:
        bench.run_bench(spec, data, ["pop"], [1], tmp_path, progress=False)
    assert "\n" not in str(err.value) and "new --out" in str(err.value)
    del cell["identity"]
    report.write_text(json.dumps(cell))
    with pytest.raises(bench.CellMismatch, match="records no identity"):
        bench.run_bench(spec, data, ["pop"], [1], tmp_path, progress=False)


def test_a_changed_hyperparameter_is_named(tmp_path: Path) -> None:
    spec = load_env_spec(SYN)
    identity = {"algo": "refit", "hyperparams": {"epochs": 1, "lr": 1e-4},
                "env_kwargs": {}, "pretrain": {"max_epochs": 5}}
    (tmp_path / "metrics.json").write_text(json.dumps({"identity": identity}))
    assert bench.reuse_cell(tmp_path, identity, spec) == {"identity": identity}
    changed = {**identity, "hyperparams": {"epochs": 2, "lr": 1e-4}}  # --set refit.epochs=2
    with pytest.raises(bench.CellMismatch, match="hyperparams.epochs = 1, this run gives 2"):
        bench.reuse_cell(tmp_path, changed, spec)
    with pytest.raises(bench.CellMismatch, match="env_kwargs.reward = "):
        bench.reuse_cell(tmp_path, {**identity, "env_kwargs": {"reward": "ndcg"}}, spec)
    assert bench.reuse_cell(tmp_path / "absent", identity, spec) is None


def test_a_backbone_pretrained_on_its_own_is_reused_by_bench(tmp_path: Path,
                                                            monkeypatch) -> None:
    from refit_gym.cli import main as refit_gym

    cell = tmp_path / "seed1" / "pretrain"
    assert refit_gym(["pretrain", "--env", SYN, "--seed", "1", "--max-epochs", "2",
                      "--out", str(cell), "--quiet"]) == 0
    written = json.loads((cell / "metrics.json").read_text())
    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    assert written["identity"] == bench.pretrain_identity(spec, data, 1, 2)

    def no_more_work(*args, **kwargs):
        raise AssertionError("the pretrained backbone was trained again")

    monkeypatch.setattr(bench, "pretrain", no_more_work)
    result = bench.run_bench(spec, data, ["pretrained"], [1], tmp_path, progress=False,
                             pretrain_max_epochs=2)
    assert result["cells"]["pretrained"][0]["test"] == written["test"]
    with pytest.raises(bench.CellMismatch, match="max_epochs = 2, this run gives null"):
        bench.run_bench(spec, data, ["pretrained"], [1], tmp_path, progress=False)


def test_the_data_digest_names_the_contents_not_their_storage() -> None:
    import numpy as np

    @dataclasses.dataclass
    class Ids:
        rows: np.ndarray

    ids = np.array([[3, 1], [2, 0]])
    assert bench.data_digest(Ids(ids.astype(np.int16))) == bench.data_digest(Ids(ids))
    assert bench.data_digest(Ids(ids + 1)) != bench.data_digest(Ids(ids))
    # Pinned: every recorded cell identity holds these (changing them refuses every cell).
    assert bench.data_digest(cached_dataset("ReFiT-SeqSynthetic-v0", None)).startswith(
        "3bd668ea2bac98e6")
    assert bench.data_digest(cached_dataset(SYN, None)).startswith("850712ea1986229e")


def test_a_pretrain_identity_names_what_makes_another_model(monkeypatch) -> None:
    from refit_gym.distributed import Distributed

    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    alone = bench.pretrain_identity(spec, data, 1, None)
    assert bench.pretrain_identity(spec, data, 1, spec.pretrain.max_epochs) == alone
    assert bench.pretrain_identity(spec, data, 1, None, "cuda:1") == {**alone, "device": "cuda"}
    monkeypatch.setattr(bench, "current", lambda: Distributed(0, 2))
    assert bench.pretrain_identity(spec, data, 1, None) == {**alone, "world_size": 2}


def test_a_new_default_reward_keeps_the_backbones_not_the_tuned_cells(tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    reward = dataclasses.replace(spec, env={**spec.env, "reward_params": {"tau": 3.0}})
    backbone = bench.pretrain_identity(spec, data, 1, None)
    assert bench.pretrain_identity(reward, data, 1, None) == backbone  # pretraining ignores [env]
    tuned = bench.finetune_identity("refit", 1, {}, None, backbone,
                                    bench.common_identity(spec, data))
    retuned = bench.finetune_identity("refit", 1, {}, None, backbone,
                                      bench.common_identity(reward, data))
    pretrain_cell, refit_cell = tmp_path / "pretrain", tmp_path / "refit"
    for cell, identity in ((pretrain_cell, backbone), (refit_cell, tuned)):
        cell.mkdir()
        (cell / "metrics.json").write_text(json.dumps({"identity": identity}))
    assert bench.reuse_cell(pretrain_cell, backbone, reward) == {"identity": backbone}
    with pytest.raises(bench.CellMismatch, match="computed with spec = "):
        bench.reuse_cell(refit_cell, retuned, reward)

    # Cells written by an earlier version recorded the digest with [env]: read under the same spec,
    # refused under another (what their backbone was trained with cannot be told).
    legacy = {**backbone, "spec": bench.spec_digest(spec)}
    assert legacy["spec"] != backbone["spec"]
    for cell, identity in ((pretrain_cell, legacy), (refit_cell, {**tuned, "pretrain": legacy})):
        (cell / "metrics.json").write_text(json.dumps({"identity": identity}))
    assert bench.reuse_cell(pretrain_cell, backbone, spec) == {"identity": legacy}
    assert bench.reuse_cell(refit_cell, tuned, spec) == {"identity": {**tuned, "pretrain": legacy}}
    with pytest.raises(bench.CellMismatch, match="computed with spec = "):
        bench.reuse_cell(pretrain_cell, backbone, reward)
    with pytest.raises(ValueError, match="not fields of a spec"):
        bench.spec_digest(spec, without=("reward",))


def test_a_new_reward_or_pretraining_setting_keeps_the_peers(tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN, None)
    reward = dataclasses.replace(spec, env={**spec.env, "reward_params": {"tau": 3.0}})
    longer = dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain,
                                                                    max_epochs=7))
    backbone = dataclasses.replace(spec, backbone={**spec.backbone, "time_emb": 7})
    diffusion = dataclasses.replace(spec, diffusion=dataclasses.replace(spec.diffusion,
                                                                        steps=3))
    cutoffs = dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain, ks=(5,)))
    peer = bench.peer_identity("pop", spec, 1, bench.common_identity(spec, data))
    for other in (reward, longer, backbone, diffusion):
        assert bench.peer_identity("pop", other, 1, bench.common_identity(other, data)) == peer
    other_cutoffs = bench.peer_identity("pop", cutoffs, 1, bench.common_identity(cutoffs, data))
    assert other_cutoffs["ks"] == [5]
    assert bench.peer_identity("ease", spec, 1, bench.common_identity(spec, data)) != peer
    cell = tmp_path / "pop"
    cell.mkdir()
    (cell / "metrics.json").write_text(json.dumps({"identity": peer}))
    with pytest.raises(bench.CellMismatch,
                       match=r"computed with ks = \[10, 20\], this run gives \[5\]"):
        bench.reuse_cell(cell, other_cutoffs, cutoffs)
    # Earlier versions recorded the whole spec's digest, then all but [env]'s: read under the
    # same spec, refused under another (what else they read cannot be told).
    for legacy_digest in (bench.spec_digest(spec), bench.spec_digest(spec, without=("env",))):
        legacy = {key: value for key, value in peer.items() if key != "ks"}
        legacy["spec"] = legacy_digest
        (cell / "metrics.json").write_text(json.dumps({"identity": legacy}))
        assert bench.reuse_cell(cell, peer, spec) == {"identity": legacy}
        with pytest.raises(bench.CellMismatch, match="computed with spec = "):
            bench.reuse_cell(cell, peer, longer)
