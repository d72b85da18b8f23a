"""Fine-tuning DreamRec on the sequential MDP: the optimiser's own check and every algorithm
(resume: tests/test_refit_agent.py, for both scenarios)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refit_gym.backbones import load_backbone
from refit_gym.cli import main
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training.finetune import finetune

SEQ = "ReFiT-SeqSynthetic-v0"


@pytest.fixture
def checkpoint(pretrained_seq_synthetic: Path) -> Path:
    return pretrained_seq_synthetic


def test_refit_raises_its_fixed_episode_reward_and_keeps_e(checkpoint: Path, tmp_path) -> None:
    """The reward of the backbone's own chain on fixed training episodes rises."""
    result = finetune(load_env_spec(SEQ), cached_dataset(SEQ, None), checkpoint, "refit",
                      tmp_path, seed=1, hyperparams={"epochs": 2, "users_per_epoch": 768},
                      progress=False)
    fixed = [h["fixed_reward"] for h in result["history"]]
    assert fixed[2] > fixed[1] > fixed[0]
    assert result["tuned_chain"]["steps"] == 20
    assert set(result["start"]) >= {"valid", "test", "tuned_chain", "test_unseen"}
    tuned, _ = load_backbone(tmp_path / "finetuned.pt")
    pretrained, _ = load_backbone(checkpoint)
    assert torch.equal(tuned.item_table(), pretrained.item_table())  # E is the env's, frozen
    if result["best_epoch"] > 0:
        assert not torch.equal(tuned.denoiser.weight, pretrained.denoiser.weight)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "trpo", "continue"])
def test_every_algorithm_runs_on_the_sequential_id(algo: str, checkpoint: Path,
                                                   tmp_path) -> None:
    report = tmp_path / "r.json"
    args = ["finetune", "--env", SEQ, "--algo", algo, "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / algo), "--json", str(report), "--quiet"]
    if algo == "continue":
        args += ["--budget-seconds", "1"]
    else:
        args += ["--set", "epochs=1", "--set", "users_per_epoch=16", "--set", "n_envs=32"]
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert set(result["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (10, 20, 50)}
    assert result["history"][0]["fixed_reward"] < 0 and len(result["history"]) >= 2
    assert result["valid"]["ndcg@20"] >= 0


def test_the_whole_chain_is_evaluated_once(checkpoint: Path, tmp_path, monkeypatch) -> None:
    """When the agents tune every trained step, the tuned chain is the backbone's own: its
    metrics are the own sampler's, evaluated once, not a second time on an equal chain; a
    respaced chain is still evaluated on its own."""
    import importlib

    import numpy as np

    from refit_gym.mdp.gym_env import EnvSettings

    # The module, not the function the package exports under the same name.
    driver = importlib.import_module("refit_gym.training.finetune")

    spec, data = load_env_spec(SEQ), cached_dataset(SEQ, None)
    model, _ = load_backbone(checkpoint, data.n_items)
    model.eval()
    whole = EnvSettings.resolve(spec, {"steps": spec.diffusion.steps,
                                       "checkpoint": str(checkpoint)})
    chain = whole.build_source(spec, data, model.item_table().detach()).chain
    assert chain.timesteps is None  # the shortcut's premise: the same steps and schedule ...
    batch = data.batch("valid", np.arange(32))
    batch["row"] = torch.arange(32)
    torch.testing.assert_close(  # ... draw for draw, the same final states
        model.generate(batch, chain, torch.Generator().manual_seed(3)),
        model.generate(batch, None, torch.Generator().manual_seed(3)), rtol=0, atol=0)

    chains: list = []  # the chain of every evaluation inside the final metrics
    evaluate, final_metrics, inside = driver.evaluate, driver._final_metrics, []

    def counted(*args, **kwargs):
        if inside:
            chains.append(kwargs.get("chain"))
        return evaluate(*args, **kwargs)

    def watched(*args, **kwargs):
        inside.append(True)
        try:
            return final_metrics(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(driver, "evaluate", counted)
    monkeypatch.setattr(driver, "_final_metrics", watched)
    for steps, out in ((spec.diffusion.steps, "whole"), (None, "respaced")):
        chains.clear()
        env_kwargs = {} if steps is None else {"steps": steps}
        result = finetune(spec, data, checkpoint, "continue", tmp_path / out, seed=1,
                          budget_seconds=1, progress=False, env_kwargs=env_kwargs)
        tuned_passes = [c for c in chains if c is not None]
        assert chains  # the final metrics were computed here
        if steps is None:  # the id's 20 respaced steps: their own evaluation
            assert result["tuned_chain"]["steps"] == 20 and tuned_passes
        else:
            assert result["tuned_chain"]["steps"] == spec.diffusion.steps
            assert result["tuned_chain"]["valid"] == result["valid"]
            assert result["tuned_chain"]["test"] == result["test"]
            assert not tuned_passes  # the final metrics' evaluations are the own sampler's only
