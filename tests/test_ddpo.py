"""DDPO: its clipped objective by hand, its update against ReFiT's, and a resumed run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from refit_gym.backbones import DiffRec, DiffRecConfig, load_backbone
from refit_gym.mdp.gym_env import cached_dataset, make_core
from refit_gym.rl.ddpo import DDPOAgent, DDPOConfig, Samples, ddpo_loss
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, policy_step
from refit_gym.specs import agent_tables, load_agent_hyperparams, load_env_spec
from refit_gym.training.finetune import finetune

SYN = "ReFiT-Synthetic-v0"


def test_ddpo_loss_is_the_hand_computed_clipped_objective() -> None:
    ratios = torch.tensor([1.5, 0.5, 1.05, 0.9, 1.3], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 2.0, -0.5, 7.0], dtype=torch.float64)
    old = torch.tensor([-3.0, 2.0, 0.5, -1.0, 4.0], dtype=torch.float64)
    log_prob = (old + ratios.log()).requires_grad_()
    loss, clipped = ddpo_loss(log_prob, old, advantages, clip_range=0.2, advantage_clip=5.0)
    # Per sample min(r A, clip(r, 0.8, 1.2) A), the last advantage clipped from 7 to 5:
    # min(1.5, 1.2), min(-0.5, -0.8), min(2.1, 2.1), min(-0.45, -0.45), min(6.5, 6.0).
    by_hand = (1.2 - 0.8 + 2.1 - 0.45 + 6.0) / 5
    assert loss.item() == pytest.approx(-by_hand, abs=1e-12)
    assert clipped == 3  # |r - 1| > 0.2: 1.5, 0.5 and 1.3
    loss.backward()
    # d(-mean min(...)) / d log pi: -r A / 5 where the unclipped term is the minimum, else 0.
    expected = torch.tensor([0.0, 0.0, -1.05 * 2.0, -0.9 * -0.5, 0.0], dtype=torch.float64) / 5
    torch.testing.assert_close(log_prob.grad, expected, rtol=0, atol=1e-12)


def _agents(core, **overrides):
    torch.manual_seed(0)
    model = DiffRec(DiffRecConfig(n_items=core.n_items, dims=(8,)), load_env_spec(SYN).diffusion)
    settings = {"group_size": 4, "train_steps": 3, "kappa": 5.0, "lr": 1e-3, **overrides}
    ddpo = DDPOAgent(model, copy.deepcopy(model), DDPOConfig(**settings))
    refit = ReFiTAgent(copy.deepcopy(model), copy.deepcopy(model), ReFiTConfig(
        **{k: v for k, v in settings.items() if k not in ("minibatches", "advantage_clip")}))
    return ddpo, refit


def test_one_pass_of_one_minibatch_is_refits_gradient() -> None:
    """Over all samples at once, before any step, DDPO's loss is ReFiT's batch loss (the mean
    of the per-step clipped terms), so the gradients agree."""
    _, _, core = make_core(SYN, 12, reward="neg_mse")
    ddpo, refit = _agents(core, advantage_clip=1e9)
    rollout = ddpo.rollout(core, torch.tensor([3, 0, 7]), torch.Generator().manual_seed(1))
    samples = Samples.of([rollout])
    assert len(samples) == 12 * 3 and samples.row.tolist()[:13] == [*range(12), 0]
    ddpo.optimizer.zero_grad()
    loss, _ = ddpo.minibatch_loss(samples, torch.arange(len(samples)))
    loss.backward()
    refit.policy_gradient([rollout], 12)
    # One forward over every step's samples sums in another order than one per step.
    got = torch.cat([p.grad.flatten() for p in ddpo.model.parameters()])
    want = torch.cat([p.grad.flatten() for p in refit.model.parameters()])
    assert want.norm() > 0 and (got - want).norm() <= 1e-5 * want.norm()


@pytest.mark.parametrize("size", [15, 5])
def test_a_minibatch_encodes_the_fewer_of_its_samples_and_the_trajectories(
        pretrained_seq_synthetic: Path, size: int) -> None:
    """A sequential minibatch runs the history encoder over the trajectories' inputs when it
    holds more samples than there are trajectories, else over its samples' inputs; either way
    every parameter's gradient (the encoder's included) is the per-sample way's."""
    _, _, core = make_core("ReFiT-SeqSynthetic-v0", 8, checkpoint=str(pretrained_seq_synthetic))
    model, _ = load_backbone(pretrained_seq_synthetic)
    ddpo = DDPOAgent(model, copy.deepcopy(model), DDPOConfig(group_size=4, train_steps=3))
    rollout = ddpo.rollout(core, torch.tensor([5, 9]), torch.Generator().manual_seed(3))
    samples = Samples.of([rollout])
    indices = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))[:size]
    cfg = ddpo.config
    ddpo.optimizer.zero_grad()
    rows = samples.row[indices]
    condition = model.encode({key: value[rows] for key, value in samples.batch.items()})
    _, log_prob, _ = policy_step(model, samples.x_t[indices], samples.t[indices], condition,
                                 cfg.kappa, action=samples.action[indices], chain=samples.chain)
    ddpo_loss(log_prob, samples.old_log_prob[indices], samples.advantages[indices],
              cfg.clip_range, cfg.advantage_clip)[0].backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()
                if p.grad is not None}
    ddpo.optimizer.zero_grad()
    encoded_rows = []
    encode = model.encode

    def counted(batch):
        encoded_rows.append(len(batch["history"]))
        return encode(batch)

    model.encode = counted
    ddpo.minibatch_loss(samples, indices)[0].backward()
    del model.encode
    assert len(samples) == 8 * 3 and samples.trajectories == 8
    assert encoded_rows == [min(size, 8)]
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any("encoder" in name for name in got)
    flat = torch.cat([grad.flatten() for grad in expected.values()])
    difference = torch.cat([(got[name] - grad).flatten() for name, grad in expected.items()])
    assert flat.norm() > 0 and difference.norm() <= 1e-6 * flat.norm()


def test_update_steps_once_per_minibatch_and_sees_each_sample_once_a_pass() -> None:
    _, _, core = make_core(SYN, 8, reward="neg_mse")
    ddpo, _ = _agents(core, update_epochs=3, minibatches=4)
    rollout = ddpo.rollout(core, torch.tensor([1, 2]), torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    loss_of = ddpo.minibatch_loss
    ddpo.minibatch_loss = lambda samples, indices: (seen.append(indices), loss_of(
        samples, indices))[1]
    before = [p.detach().clone() for p in ddpo.model.parameters()]
    stats = ddpo.update([rollout], 8)
    assert len(seen) == 3 * 4 and {len(i) for i in seen} == {6}  # 24 samples / 4
    for epoch in range(3):
        assert sorted(torch.cat(seen[4 * epoch: 4 * epoch + 4]).tolist()) == list(range(24))
    assert stats.reward == pytest.approx(rollout.reward.mean().item())
    assert 0 <= stats.clip_fraction <= 1
    assert any(not torch.equal(a, p) for a, p in zip(before, ddpo.model.parameters()))


def test_ddpo_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="ddpo kl_coef = 0.1"):
        DDPOConfig(kl_coef=0.1)
    with pytest.raises(ValueError, match="ddpo minibatches = 0"):
        DDPOConfig(minibatches=0)
    ids = set(agent_tables("refit"))
    assert {SYN, "ReFiT-SeqSynthetic-v0", "ReFiT-Beauty-Concat-v0"} <= ids  # the tables are read
    for env_id in ids:
        for device in ("cpu", "cuda"):  # every id builds, and samples and steps as ReFiT's
            ddpo = load_agent_hyperparams("ddpo", env_id, device)
            refit = load_agent_hyperparams("refit", env_id, device)
            DDPOConfig(**ddpo)
            assert {k: ddpo[k] for k in refit} == refit
            assert {k: ddpo[k] for k in set(ddpo) - set(refit)} == {
                "update_epochs": 4, "minibatches": 4, "clip_range": 0.2, "advantage_clip": 5.0}


def test_an_interrupted_ddpo_run_resumes_to_the_same_result(pretrained_synthetic: Path,
                                                             tmp_path: Path,
                                                             monkeypatch) -> None:
    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    settings = {"epochs": 2, "users_per_epoch": 48, "users_per_batch": 16, "group_size": 4,
                "checkpoint_every": 1, "update_epochs": 2, "minibatches": 2}
    whole = finetune(spec, data, pretrained_synthetic, "ddpo", tmp_path / "whole", seed=3,
                     hyperparams=settings, progress=False)
    update, calls = DDPOAgent.update, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 5:  # the second batch of epoch 2
            raise KeyboardInterrupt
        return update(self, *args)

    monkeypatch.setattr(DDPOAgent, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, data, pretrained_synthetic, "ddpo", tmp_path / "cut", seed=3,
                 hyperparams=settings, progress=False)
    monkeypatch.setattr(DDPOAgent, "update", update)
    resumed = finetune(spec, data, pretrained_synthetic, "ddpo", tmp_path / "cut", seed=3,
                       hyperparams=settings, progress=False)
    assert resumed["algo"] == "ddpo" and len(resumed["history"]) == 3
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k != "elapsed"} for h in resumed["history"]] == strip
    a, _ = load_backbone(tmp_path / "whole" / "finetuned.pt")
    b, _ = load_backbone(tmp_path / "cut" / "finetuned.pt")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
