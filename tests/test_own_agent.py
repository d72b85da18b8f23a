"""An algorithm of one's own under the driver: docs/own_agent.md's REINFORCE runs as written,
is selected, checked and resumed like the built-in ones."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.rl.algorithm import Algorithm
from refit_gym.specs import load_env_spec
from refit_gym.training.finetune import evaluate_tuned_chain, finetune

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_agent.md"
SYN = "ReFiT-Synthetic-v0"


@pytest.fixture
def documented(pretrained_synthetic: Path, tmp_path: Path, monkeypatch) -> dict:
    """The namespace of the document's Python blocks, run in order in a fresh folder that
    holds the checkpoint where the document expects it."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "runs" / SYN / "pretrain-seed1" / "denoiser.pt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(pretrained_synthetic, checkpoint)
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_documented_reinforce_runs_under_the_driver(documented: dict, tmp_path: Path) -> None:
    result = documented["result"]
    assert isinstance(documented["Reinforce"]("runs/ReFiT-Synthetic-v0/pretrain-seed1/"
                                              "denoiser.pt", SYN), Algorithm)
    assert result["algo"] == "reinforce" and result["config"]["epochs"] == 4
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3, 4]
    fixed = [h["fixed_reward"] for h in result["history"]]
    assert fixed[-1] > fixed[0]  # the optimiser raises its own objective
    assert all(h["train_reward"] is not None for h in result["history"][1:])
    best = result["history"][result["best_epoch"]]["valid"]["ndcg@20"]
    assert best == max(h["valid"]["ndcg@20"] for h in result["history"])
    tuned, _ = load_backbone(tmp_path / "runs" / "reinforce" / "finetuned.pt")
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    assert evaluate_tuned_chain(tuned, spec, data)["valid"] == pytest.approx(result["valid"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "reinforce" / "tensorboard"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # Training and validation curves share one x-axis: the epoch (0: the start).
    assert steps["valid/ndcg@20"] == [0, 1, 2, 3, 4]
    assert steps["train/reward"] == steps["train/loss"] == [1, 2, 3, 4]


def test_an_interrupted_own_agent_resumes_to_the_same_weights(documented: dict,
                                                              tmp_path: Path) -> None:
    Reinforce, checkpoint = documented["Reinforce"], documented["checkpoint"]
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    cut = Reinforce(checkpoint, SYN)
    run_epoch = cut.run_epoch

    def interrupted(ctx):
        if ctx.epoch == 3:
            raise KeyboardInterrupt
        return run_epoch(ctx)

    cut.run_epoch = interrupted
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, data, checkpoint, cut, tmp_path / "cut", progress=False)
    resumed = finetune(spec, data, checkpoint, Reinforce(checkpoint, SYN), tmp_path / "cut",
                       progress=False)
    whole = documented["result"]
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k != "elapsed"} for h in resumed["history"]] == strip
    a = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "reinforce" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_driver_names_what_an_algorithm_object_lacks(pretrained_synthetic: Path,
                                                         tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    with pytest.raises(TypeError, match="members of refit_gym.rl.algorithm.Algorithm"):
        finetune(spec, data, pretrained_synthetic, object(), tmp_path)

    class Partial:
        name, policy, config = "partial", None, {}

        def run_epoch(self, ctx):
            return None

    with pytest.raises(TypeError, match=r"Partial lacks \['progress', 'state_dict', "
                       r"'load_state_dict'\]"):
        finetune(spec, data, pretrained_synthetic, Partial(), tmp_path)
    with pytest.raises(ValueError, match="unknown algorithm 'reinforce'"):
        finetune(spec, data, pretrained_synthetic, "reinforce", tmp_path)


def test_an_own_algorithm_gets_one_line_for_a_broken_rule(documented: dict,
                                                         tmp_path: Path) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    checkpoint = "runs/ReFiT-Synthetic-v0/pretrain-seed1/denoiser.pt"
    algo = documented["Reinforce"](checkpoint, SYN)
    algo.config = {**algo.config, "schedule": lambda epoch: 1e-3}
    with pytest.raises(TypeError, match="reinforce.config must be JSON-able"):
        finetune(spec, data, checkpoint, algo, tmp_path / "lambda")
    algo = documented["Reinforce"](checkpoint, SYN)
    algo.run_epoch = lambda ctx: 0.5  # a mean reward, not the EpochStats the driver reads
    with pytest.raises(TypeError, match="reinforce.run_epoch must return an EpochStats"):
        finetune(spec, data, checkpoint, algo, tmp_path / "float", progress=False)
