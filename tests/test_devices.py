"""CPU and GPU give the same results up to floating-point order (run by benchmarks/gpu_check.sh
on a GPU machine; without CUDA these tests are skipped, saying why)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training.metrics import evaluate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
@pytest.mark.parametrize("env_id", ["ReFiT-Synthetic-v0", "ReFiT-SeqSynthetic-v0"])
def test_evaluation_matches_across_devices(env_id: str, pretrained_synthetic: Path,
                                           pretrained_seq_synthetic: Path) -> None:
    checkpoint = pretrained_synthetic if env_id == "ReFiT-Synthetic-v0" else (
        pretrained_seq_synthetic)
    spec, data = load_env_spec(env_id), cached_dataset(env_id, None)
    results = {}
    for device in ("cpu", "cuda"):
        model, _ = load_backbone(checkpoint, data.n_items, device)
        results[device] = evaluate(model, data, spec.pretrain, device=device, sampling_seeds=1)
    if model.stochastic_inference:  # different generators: the same distribution, not draws
        assert results["cuda"]["test"]["hr@20"] == pytest.approx(
            results["cpu"]["test"]["hr@20"], abs=0.03)
    else:
        assert results["cuda"]["test"] == pytest.approx(results["cpu"]["test"], abs=1e-4)


@cuda
def test_refit_batch_runs_on_cuda(pretrained_synthetic: Path) -> None:
    import copy

    from refit_gym.mdp import make_core
    from refit_gym.rl import ReFiTAgent, ReFiTConfig

    model, _ = load_backbone(pretrained_synthetic, device="cuda")
    agent = ReFiTAgent(model, copy.deepcopy(model), ReFiTConfig(group_size=4))
    _, _, core = make_core("ReFiT-Synthetic-v0", 32, device="cuda")
    stats = agent.train_batch(core, torch.arange(8, device="cuda"),
                              torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(torch.tensor(stats.reward))


@cuda
@pytest.mark.parametrize("algo", ["refit", "continue", "ppo"])
def test_finetune_runs_on_cuda(algo: str, pretrained_synthetic: Path, tmp_path: Path) -> None:
    """The whole fine-tuning path on the GPU: user batches, rollouts, updates, checkpoints."""
    from refit_gym.training.finetune import finetune

    hyperparams = {"refit": {"epochs": 1, "users_per_epoch": 64, "users_per_batch": 32},
                   "continue": {}, "ppo": {"epochs": 1, "users_per_epoch": 64}}[algo]
    result = finetune(load_env_spec("ReFiT-Synthetic-v0"),
                      cached_dataset("ReFiT-Synthetic-v0", None), pretrained_synthetic, algo,
                      tmp_path, device="cuda", hyperparams=hyperparams,
                      budget_seconds=1.0 if algo == "continue" else None, progress=False)
    assert 0.0 <= result["test"]["ndcg@20"] <= 1.0
    assert (tmp_path / "finetuned.pt").is_file()
