"""The ReFiT agent: its policy step, its advantages, fine-tuning, resume, and the baseline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from refit_gym import specs
from refit_gym.backbones import CheckpointError, DiffRec, DiffRecConfig, load_backbone
from refit_gym.cli import main
from refit_gym.mdp.gym_env import make_core
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, group_advantages, policy_step
from refit_gym.specs import load_agent_hyperparams, load_env_spec
from refit_gym.training.finetune import finetune
from refit_gym.training.metrics import evaluate

SYN = "ReFiT-Synthetic-v0"


def test_policy_step_samples_and_scores_the_exact_gaussian() -> None:
    torch.manual_seed(0)
    model = DiffRec(DiffRecConfig(n_items=50, dims=(8,)),
                    load_env_spec("ReFiT-ML1M-v0").diffusion).eval()
    x, t = torch.rand(4, 50), torch.tensor([39, 20, 1, 0])
    generator = torch.Generator().manual_seed(1)
    action, log_prob, mean = policy_step(model, x, t, None, kappa=3.0, generator=generator)
    std = 3.0 * model.diffusion.reverse_std(t)
    reference = torch.distributions.Normal(mean.double(), std[:, None]).log_prob(action.double())
    torch.testing.assert_close(log_prob, reference.sum(-1), rtol=0, atol=1e-6)
    z = (action.double() - mean.double()) / std[:, None]
    assert 0.8 < z.std().item() < 1.2  # the sample has the policy's std
    _, rescored, _ = policy_step(model, x, t, None, kappa=3.0, action=action)
    torch.testing.assert_close(rescored, log_prob)


def test_untrained_steps_follow_the_mean_chain_without_exploration() -> None:
    """explore_all_steps=False: steps t >= train_steps are the deterministic mean chain, so two
    rollouts with different noise agree there and differ only on the trained steps."""
    _, _, core = make_core(SYN, 4, reward="neg_mse")
    torch.manual_seed(0)
    model = DiffRec(DiffRecConfig(n_items=core.n_items, dims=(8,)), load_env_spec(SYN).diffusion)
    config = ReFiTConfig(group_size=2, train_steps=2, lr=0.0, explore_all_steps=False)
    agent = ReFiTAgent(model, copy.deepcopy(model), config)
    traces = []
    for seed in (1, 2):
        trace: list[torch.Tensor] = []
        step = core.step
        core.step = lambda action, trace=trace, step=step, **kw: (trace.append(action),
                                                                   step(action, **kw))[1]
        agent.train_batch(core, torch.tensor([0, 1]), torch.Generator().manual_seed(seed))
        del core.step
        traces.append(trace)
    untrained = core.steps - config.train_steps
    for a, b in zip(traces[0][:untrained], traces[1][:untrained]):
        assert torch.equal(a, b)
    for a, b in zip(traces[0][untrained:], traces[1][untrained:]):
        assert not torch.equal(a, b)


def test_steps_below_min_train_step_follow_the_mean_and_are_not_trained() -> None:
    _, _, core = make_core(SYN, 4, reward="neg_mse")
    torch.manual_seed(0)
    model = DiffRec(DiffRecConfig(n_items=core.n_items, dims=(8,)), load_env_spec(SYN).diffusion)
    config = ReFiTConfig(group_size=2, train_steps=core.steps, min_train_step=2, kappa=5.0)
    agent = ReFiTAgent(model, copy.deepcopy(model), config)
    trace: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = core.step
    core.step = lambda action, **kw: (trace.append((core.x.clone(), core.denoiser_timestep(),
                                                    action)), step(action, **kw))[1]
    rollout = agent.rollout(core, torch.tensor([0, 1]), torch.Generator().manual_seed(1))
    del core.step
    assert [int(t[0]) for _, t, _, _ in rollout.steps] == list(range(core.steps - 1, 1, -1))
    with torch.no_grad():
        for x_t, t, action in trace:
            mean = model.reverse_mean(x_t, t, None, core.chain)
            assert torch.equal(action, mean) == (int(t[0]) < 2)
    with pytest.raises(ValueError, match="min_train_step"):
        ReFiTConfig(train_steps=3, min_train_step=3)
    with pytest.raises(ValueError, match="update_epochs"):
        ReFiTConfig(update_epochs=0)


def test_shared_mean_prefix_gives_the_rollout_of_every_row(monkeypatch) -> None:
    """A group with one deterministic start computes its unexplored prefix once per user: the
    same trajectories, rewards and log-probabilities as computing it for every row."""
    from refit_gym.rl import refit_agent

    _, _, core = make_core(SYN, 12)
    torch.manual_seed(0)
    model = DiffRec(DiffRecConfig(n_items=core.n_items, dims=(8,)), load_env_spec(SYN).diffusion)
    config = ReFiTConfig(group_size=4, train_steps=3, kappa=5.0, explore_all_steps=False)
    agent = ReFiTAgent(model, copy.deepcopy(model), config)
    users = torch.tensor([3, 0, 7])
    core.reset_rows(torch.arange(12), users.repeat_interleave(4), torch.Generator())
    assert refit_agent.groups_identical(core.x, 4) and not refit_agent.groups_identical(core.x, 12)
    shared = agent.rollout(core, users, torch.Generator().manual_seed(1))
    monkeypatch.setattr(refit_agent, "groups_identical", lambda x, g: False)
    per_row = agent.rollout(core, users, torch.Generator().manual_seed(1))
    torch.testing.assert_close(shared.reward, per_row.reward)
    for a, b in zip(shared.steps, per_row.steps, strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v)


def test_group_advantages_are_normalised_per_user() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = group_advantages(rewards, 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.2247, 0.0, 1.2247],
                                                     dtype=torch.float64), atol=1e-4, rtol=0)
    assert adv[3:].abs().max() == 0  # equal rewards: no signal, no NaN


def _per_step_encoder_gradients(agent: ReFiTAgent, rollout, denominator: int
                                ) -> dict[str, torch.Tensor]:
    """The update's gradients computed the plain way: every trained step backpropagates through
    the history encoder on its own (the graph of c kept between steps)."""
    cfg = agent.config
    agent.optimizer.zero_grad(set_to_none=True)
    condition = agent.model.encode(rollout.batch)
    for x_t, t, action, old_log_prob in rollout.steps:
        _, log_prob, mean = policy_step(agent.model, x_t, t, condition, cfg.kappa,
                                        action=action, chain=rollout.chain)
        ratio = torch.exp(log_prob - old_log_prob)
        loss = -torch.minimum(ratio * rollout.advantages, ratio.clamp(
            1 - cfg.clip_range, 1 + cfg.clip_range) * rollout.advantages).sum()
        with torch.no_grad():
            ref_mean = agent.reference.reverse_mean(x_t, t, rollout.reference_condition,
                                                    rollout.chain)
        var = (cfg.kappa * agent.model.reverse_std(t, rollout.chain)).pow(2)
        kl = (mean.double() - ref_mean.double()).pow(2).sum(-1) / (2 * var)
        (loss + cfg.kl_coef * kl.sum()).div(denominator).backward(retain_graph=True)
    return {name: p.grad.clone() for name, p in agent.model.named_parameters()
            if p.grad is not None}


def test_encoder_backward_runs_once_per_chunk_with_unchanged_gradients(
        pretrained_seq_synthetic: Path) -> None:
    """Issue 29 item 5: the per-step losses collect d loss / d c on a leaf copy of the
    condition, and the history encoder runs one backward per chunk; every parameter's gradient
    equals the per-step way's (the encoder's included)."""
    seq = "ReFiT-SeqSynthetic-v0"
    _, _, core = make_core(seq, 8, checkpoint=str(pretrained_seq_synthetic))
    model, _ = load_backbone(pretrained_seq_synthetic)
    reference = copy.deepcopy(model)
    torch.manual_seed(0)  # move the policy off the reference so the KL term has a gradient
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = ReFiTConfig(group_size=4, train_steps=6, min_train_step=2, kappa=1.0, kl_coef=0.1)
    agent = ReFiTAgent(model, reference, config)
    rollout = agent.rollout(core, torch.tensor([5, 9]), torch.Generator().manual_seed(3))
    denominator = 8 * len(rollout.steps)
    expected = _per_step_encoder_gradients(agent, rollout, denominator)
    encoder_backwards = []
    encode = model.encode

    def counted(batch):  # counts the backward passes that reach the encoder's output
        condition = encode(batch)
        condition.register_hook(lambda grad: encoder_backwards.append(grad.shape))
        return condition

    model.encode = counted
    agent.policy_gradient([rollout], 8)
    del model.encode
    assert len(rollout.steps) == 4 and len(encoder_backwards) == 1
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any("encoder" in name for name in got)
    # Relative to the whole gradient: some entries are zero in exact arithmetic (an attention
    # key's bias cancels in the softmax), where both ways hold only rounding noise.
    scale = max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():
        assert (got[name] - grad).abs().max().item() <= 1e-6 * scale, name
    flat = torch.cat([grad.flatten() for grad in expected.values()])
    difference = torch.cat([(got[name] - grad).flatten() for name, grad in expected.items()])
    assert difference.norm() <= 1e-6 * flat.norm()


@pytest.fixture
def pretrained(pretrained_synthetic: Path) -> Path:
    return pretrained_synthetic


SMALL = {"epochs": 2, "users_per_batch": 64, "group_size": 4, "checkpoint_every": 3,
         "lr": 1e-3, "train_steps": 3}


def test_a_device_table_replaces_the_id_defaults_on_that_device() -> None:
    cpu = load_agent_hyperparams("refit", "ReFiT-ML1M-v0")
    gpu = load_agent_hyperparams("refit", "ReFiT-ML1M-v0", "cuda:0")
    assert (cpu["users_per_batch"], cpu["group_size"], cpu["train_steps"]) == (64, 8, 10)
    assert (gpu["users_per_batch"], gpu["group_size"], gpu["train_steps"]) == (512, 32, 5)
    assert gpu["explore_all_steps"] is False and "explore_all_steps" not in cpu
    for params in (cpu, gpu):  # the sub-table itself is no hyperparameter
        ReFiTConfig(**params)
    zhihu = load_agent_hyperparams("refit", "ReFiT-Zhihu-v0")
    assert load_agent_hyperparams("refit", "ReFiT-Zhihu-v0", "cuda") == zhihu


def test_only_a_device_types_sub_table_is_a_device_table(tmp_path, monkeypatch) -> None:
    (tmp_path / "ppo.toml").write_text('["X-v0"]\nlr = 1e-4\n["X-v0".policy_kwargs]\n'
                                       'net_arch = [8]\n["X-v0".cuda]\nlr = 1e-3\n')
    monkeypatch.setattr(specs.resources, "files", lambda package: tmp_path)
    expected = {"lr": 1e-4, "policy_kwargs": {"net_arch": [8]}}
    assert load_agent_hyperparams("ppo", "X-v0") == expected
    assert load_agent_hyperparams("ppo", "X-v0", "cuda:1") == {**expected, "lr": 1e-3}


def test_finetune_selects_by_validation_and_writes_outputs(pretrained: Path, tmp_path) -> None:
    spec = load_env_spec(SYN)
    from refit_gym.mdp.gym_env import cached_dataset

    data = cached_dataset(SYN, None)
    result = finetune(spec, data, pretrained, "refit", tmp_path, seed=3, hyperparams=SMALL,
                      progress=False)
    valid = [h["valid"]["ndcg@20"] for h in result["history"]]
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert result["valid"]["ndcg@20"] == max(valid)  # the start model is a candidate
    assert result["valid"]["ndcg@20"] >= result["start"]["valid"]["ndcg@20"]
    assert result["best_epoch"] == valid.index(max(valid))
    model, meta = load_backbone(tmp_path / "finetuned.pt", data.n_items)
    assert meta["extra"]["epoch"] == result["best_epoch"]
    again = evaluate(model, data, spec.pretrain)
    assert again["valid"] == pytest.approx(result["valid"], abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text())["valid"] == result["valid"]
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize(("env_id", "checkpoint_fixture", "hyperparams", "cut_at"), [
    (SYN, "pretrained_synthetic", SMALL, 15),  # mid second epoch, two batches after a save
    ("ReFiT-SeqSynthetic-v0", "pretrained_seq_synthetic",
     {"epochs": 2, "users_per_epoch": 96, "users_per_batch": 32, "checkpoint_every": 2}, 6),
])
def test_interrupted_run_resumes_to_the_same_result(env_id, checkpoint_fixture, hyperparams,
                                                    cut_at, tmp_path, monkeypatch,
                                                    request) -> None:
    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.rl import refit_agent

    pretrained = request.getfixturevalue(checkpoint_fixture)
    spec, data = load_env_spec(env_id), cached_dataset(env_id, None)
    whole = finetune(spec, data, pretrained, "refit", tmp_path / "whole", seed=5,
                     hyperparams=hyperparams, progress=False)

    original = refit_agent.ReFiTAgent.update
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == cut_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(refit_agent.ReFiTAgent, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, data, pretrained, "refit", tmp_path / "cut", seed=5,
                 hyperparams=hyperparams, progress=False)
    monkeypatch.setattr(refit_agent.ReFiTAgent, "update", original)
    assert (tmp_path / "cut" / "state.pt").is_file()
    resumed = finetune(spec, data, pretrained, "refit", tmp_path / "cut", seed=5,
                       hyperparams=hyperparams, progress=False)
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k != "elapsed"} for h in resumed["history"]] == strip
    assert resumed["test"] == whole["test"]
    a, _ = load_backbone(tmp_path / "whole" / "finetuned.pt")
    b, _ = load_backbone(tmp_path / "cut" / "finetuned.pt")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(CheckpointError,
                       match=r"another fine-tuning run.s state \(seed = \d+, this run gives 6\)"):
        finetune(spec, data, pretrained, "refit", tmp_path / "cut", seed=6,
                 hyperparams=hyperparams, progress=False)


def test_continue_baseline_and_cli(pretrained: Path, tmp_path) -> None:
    report = tmp_path / "continue.json"
    assert main(["finetune", "--env", SYN, "--algo", "continue", "--checkpoint", str(pretrained),
                 "--budget-seconds", "1", "--out", str(tmp_path / "c"), "--json", str(report),
                 "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["wall_time_s"] >= 1 and result["history"][0]["epoch"] == 0
    assert result["valid"]["ndcg@20"] >= result["start"]["valid"]["ndcg@20"]
    assert main(["finetune", "--env", SYN, "--algo", "continue", "--checkpoint",
                 str(pretrained), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert main(["finetune", "--env", SYN, "--algo", "refit", "--checkpoint", str(pretrained),
                 "--set", "kapa=3", "--out", str(tmp_path / "e"), "--quiet"]) == 2


def test_continue_takes_the_protocol_settings_it_names(pretrained: Path, tmp_path) -> None:
    """--set changes continue's [pretrain] protocol (here: validation every 3 epochs); a key
    outside CONTINUE_SETTINGS, or a budget given to another algorithm, is refused."""
    report = tmp_path / "c.json"
    assert main(["finetune", "--env", SYN, "--algo", "continue", "--checkpoint", str(pretrained),
                 "--budget-seconds", "2", "--set", "eval_every=3", "--out", str(tmp_path / "c"),
                 "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["config"] == {"budget_seconds": 2.0, "eval_every": 3}
    passes = [h["epoch"] for h in result["history"]][:-1]  # the last: where the budget ran out
    assert passes[:2] == [0, 3]  # the id's own eval_every is 5
    assert all(epoch % 3 == 0 for epoch in passes)
    assert main(["finetune", "--env", SYN, "--algo", "continue", "--checkpoint", str(pretrained),
                 "--budget-seconds", "1", "--set", "kappa=3", "--out", str(tmp_path / "d"),
                 "--quiet"]) == 2
    assert main(["finetune", "--env", SYN, "--algo", "refit", "--checkpoint", str(pretrained),
                 "--budget-seconds", "1", "--out", str(tmp_path / "e"), "--quiet"]) == 2
