"""SB3 / sb3-contrib agents with the pretrained diffusion actor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from refit_gym.backbones import load_backbone
from refit_gym.cli import main
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.rl.sb3_agents import SB3_ALGOS, GroupRelativeReward, make_model

SYN = "ReFiT-Synthetic-v0"


@pytest.fixture
def pretrained(pretrained_synthetic: Path) -> Path:
    return pretrained_synthetic


def _model(algo: str, pretrained: Path, **sb3_args):
    venv = ReFiTVecEnv(SYN, num_envs=4, seed=0)
    backbone, _ = load_backbone(pretrained, venv.core.n_items)
    args = {"n_steps": 10, **sb3_args}
    return make_model(algo, venv, backbone, args, seed=0, device="cpu"), backbone, venv


def _untrained_sequential_model(algo: str, env_id: str, tmp_path: Path,
                                env_kwargs: dict | None = None, **sb3_args):
    """An SB3 model on 4 environments of ``env_id`` (300 items; ``env_kwargs`` as for
    gym.make) whose actor is a seeded, untrained backbone of the id's type; also that backbone
    and the environments."""
    from refit_gym.backbones import save_backbone
    from refit_gym.specs import load_env_spec

    torch.manual_seed(0)
    backbone = load_env_spec(env_id).build_backbone(300)
    save_backbone(tmp_path / "b.pt", backbone, env_id, seed=0, epoch=0)
    venv = ReFiTVecEnv(env_id, num_envs=4, seed=0, checkpoint=str(tmp_path / "b.pt"),
                       **(env_kwargs or {}))
    return make_model(algo, venv, backbone, sb3_args, seed=0, device="cpu"), backbone, venv


def test_actor_is_the_pretrained_chain_with_exact_log_density(pretrained: Path) -> None:
    model, backbone, venv = _model("ppo", pretrained, batch_size=40)
    obs = venv.reset()
    obs_t, _ = model.policy.obs_to_tensor(obs)
    dist = model.policy.get_distribution(obs_t)
    t = torch.as_tensor(obs["t"]) - 1
    expected_mean = backbone.eval().reverse_mean(torch.as_tensor(obs["x"]), t, None)
    torch.testing.assert_close(dist.mean, expected_mean)
    std = 10.0 * backbone.diffusion.reverse_std(t)  # kappa = 10
    actions = dist.mean + torch.randn_like(dist.mean) * std.float()[:, None] * 3
    reference = torch.distributions.Normal(dist.mean.double(), std[:, None]).log_prob(
        actions.double()).sum(-1)
    torch.testing.assert_close(dist.log_prob(actions), reference.float(), rtol=1e-6, atol=0.05)
    _, log_prob, _ = model.policy.evaluate_actions(obs_t, actions)
    torch.testing.assert_close(log_prob, dist.log_prob(actions))


def test_actions_stay_in_space_and_save_load_round_trip(pretrained: Path, tmp_path) -> None:
    model, _, venv = _model("ppo", pretrained, batch_size=40)
    obs = venv.reset()
    obs["x"] = obs["x"] * 1e4  # a wild input: the mean leaves the box, predict clips
    actions, _ = model.predict(obs, deterministic=False)
    space = venv.action_space
    assert actions.shape == (4, space.shape[0])
    assert (actions >= space.low).all() and (actions <= space.high).all()
    model.learn(40)
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip", env=venv)
    obs = venv.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0],
                                  loaded.predict(obs, deterministic=True)[0])
    for key, value in model.policy.state_dict().items():
        assert torch.equal(value, loaded.policy.state_dict()[key]), key


@pytest.mark.parametrize("algo", sorted(SB3_ALGOS))
def test_each_algorithm_finetunes_through_the_cli(algo: str, pretrained: Path,
                                                  tmp_path) -> None:
    report = tmp_path / f"{algo}.json"
    sets = ["n_envs=8", "n_steps=10", "epochs=2", "users_per_epoch=5"]
    if algo != "a2c":
        sets.append("batch_size=40")
    args = ["finetune", "--env", SYN, "--algo", algo, "--checkpoint", str(pretrained), "--out",
            str(tmp_path / algo), "--json", str(report), "--quiet"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert all(0.0 <= h["train_reward"] <= 1.0 for h in result["history"][1:])  # NDCG@20
    assert result["valid"]["ndcg@20"] >= result["start"]["valid"]["ndcg@20"]
    assert (tmp_path / algo / f"{algo}.zip").is_file()
    assert (tmp_path / algo / "finetuned.pt").is_file()


def test_a_resumed_run_refuses_a_zip_it_did_not_write(pretrained: Path, tmp_path) -> None:
    """Issue 31 item 8: SB3 unpickles its .zip, so the run state records its sha256 and a
    resumed (or rerun) run loads only that file."""
    from refit_gym.backbones import CheckpointError
    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.specs import load_env_spec
    from refit_gym.training.finetune import finetune

    spec, data = load_env_spec(SYN), cached_dataset(SYN)
    settings = {"n_envs": 8, "n_steps": 10, "batch_size": 40, "epochs": 1, "users_per_epoch": 5}
    first = finetune(spec, data, pretrained, "ppo", tmp_path, hyperparams=settings,
                     progress=False)
    again = finetune(spec, data, pretrained, "ppo", tmp_path, hyperparams=settings,
                     progress=False)  # the zip it wrote: accepted
    assert again["valid"] == first["valid"]
    zip_path = tmp_path / "ppo.zip"
    written = zip_path.read_bytes()
    zip_path.write_bytes(written + b"\0")
    with pytest.raises(CheckpointError, match="ppo.zip is not the SB3 model this run wrote"):
        finetune(spec, data, pretrained, "ppo", tmp_path, hyperparams=settings, progress=False)
    zip_path.unlink()
    with pytest.raises(CheckpointError, match="ppo.zip is missing"):
        finetune(spec, data, pretrained, "ppo", tmp_path, hyperparams=settings, progress=False)


def test_unknown_sb3_argument_is_a_clear_error(pretrained: Path, tmp_path, capsys) -> None:
    assert main(["finetune", "--env", SYN, "--algo", "ppo", "--checkpoint", str(pretrained),
                 "--out", str(tmp_path / "bad"), "--quiet", "--set", "n_stepz=3"]) == 2
    assert "n_stepz" in capsys.readouterr().err


def test_group_rows_share_a_user_and_rewards_are_leave_one_out_centred() -> None:
    venv = ReFiTVecEnv(SYN, num_envs=8, seed=3, group_size=4, holdout_fraction=0.3,
                       holdout="random", reward="hit", reward_params={"k": 20})
    wrapped = GroupRelativeReward(venv)
    obs = wrapped.reset()
    users = venv.core.episodes.numpy().reshape(2, 4)
    assert (users == users[:, :1]).all() and users[0, 0] != users[1, 0]
    assert not np.array_equal(venv.core.visible[0].numpy(), venv.core.visible[1].numpy())
    rng = np.random.default_rng(0)
    for _ in range(venv.core.steps):
        action = obs["x"] + rng.normal(0, 0.3, obs["x"].shape).astype(np.float32)
        obs, rewards, dones, infos = wrapped.step(action)
    assert dones.all()
    raw = np.array([info["raw_reward"] for info in infos]).reshape(2, 4)
    assert raw.std() > 0
    others = (raw.sum(1, keepdims=True) - raw) / 3
    np.testing.assert_allclose(rewards.reshape(2, 4), raw - others, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rewards.reshape(2, 4).sum(1), 0.0, atol=1e-6)
    new_users = venv.core.episodes.numpy().reshape(2, 4)  # same-step restart keeps the groups
    assert (new_users == new_users[:, :1]).all()


def test_group_size_must_divide_num_envs() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        ReFiTVecEnv(SYN, num_envs=6, group_size=4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        GroupRelativeReward(ReFiTVecEnv(SYN, num_envs=4))


def test_group_relative_ppo_raises_the_synthetic_reward(pretrained: Path, tmp_path) -> None:
    """The acceptance behaviour at a small budget: group-centred PPO learns, seeded."""
    report = tmp_path / "ppo.json"
    args = ["finetune", "--env", SYN, "--algo", "ppo", "--checkpoint", str(pretrained),
            "--out", str(tmp_path / "ppo"), "--json", str(report), "--quiet",
            "--set", "epochs=3"]
    assert main(args) == 0
    rewards = [h["train_reward"] for h in json.loads(report.read_text())["history"][1:]]
    assert rewards[-1] > rewards[0] + 0.01, rewards  # NDCG@20 (measured 0.155 -> 0.178)


def test_ml1m_gpu_tables_sample_as_refits_gpu_pick() -> None:
    """Issue 30 item 3: on CUDA each SB3 algorithm samples ReFiT's trajectories per update (one
    whole-episode rollout of n_envs episodes) and per run, with the group-relative reward."""
    from refit_gym.mdp.gym_env import EnvSettings
    from refit_gym.specs import load_agent_hyperparams, load_env_spec

    ml1m = "ReFiT-ML1M-v0"
    spec = load_env_spec(ml1m)
    steps = EnvSettings.resolve(spec, {}).chain(spec).steps
    refit = load_agent_hyperparams("refit", ml1m, "cuda")
    for algo in ("ppo", "a2c", "trpo"):
        params = load_agent_hyperparams(algo, ml1m, "cuda")
        assert params["n_steps"] == steps  # one rollout = one episode per environment
        assert params["n_envs"] == refit["users_per_batch"] * refit["group_size"], algo
        assert params["group_size"] == refit["group_size"] > 1
        assert params["epochs"] == refit["epochs"]
        assert params["users_per_epoch"] == refit.get("users_per_epoch", 0)
        assert load_agent_hyperparams(algo, ml1m)["n_envs"] == 64  # the CPU table stays


def test_the_critic_reads_adrecs_row_summary_not_its_cache(tmp_path) -> None:
    # ADRec's condition carries its decoder's keys and values (tens of thousands of numbers on
    # Beauty); the value head reads the last position's representation only.
    model, backbone, _ = _untrained_sequential_model("ppo", "ReFiT-SeqSynthetic-v1", tmp_path,
                                                     n_steps=32, batch_size=64)
    width = model.policy.value_net[0].in_features
    assert width == backbone.state_dim + 33 + backbone.config.hidden < backbone.condition_dim
    model.learn(64)  # two episodes of the 32-step chain per environment


def test_every_adrec_id_takes_the_sb3_tables_of_beauty_v1() -> None:
    # The rule agents/{ppo,a2c,trpo}.toml state: whole 32-step episodes, the sampler's own
    # noise; an id left out would fall back to the CF default (kappa 10, 10-step rollouts).
    from refit_gym.specs import all_env_specs, load_agent_hyperparams

    adrec = [i for i, s in all_env_specs().items() if s.backbone_type in ("adrec", "adrec_concat")]
    assert len(adrec) >= 6
    for algo in ("ppo", "a2c", "trpo"):
        table = load_agent_hyperparams(algo, "ReFiT-Beauty-v1")
        assert table["n_steps"] == 32 and table["policy_kwargs"]["kappa"] == 1.0
        for env_id in adrec:
            assert load_agent_hyperparams(algo, env_id) == table, (algo, env_id)
    assert (load_agent_hyperparams("refit", "ReFiT-ML1MSeq-Concat-v0")
            == load_agent_hyperparams("refit", "ReFiT-Beauty-Concat-v0"))


def test_the_actor_walks_the_environments_stopped_chain(tmp_path) -> None:
    # With stop_step the policy's chain is the environment's: at its last step the mean is the
    # denoiser's x_0 prediction at the stop, not a step of the chain that runs to the end.
    model, backbone, venv = _untrained_sequential_model(
        "ppo", "ReFiT-SeqSynthetic-Concat-v0", tmp_path, {"stop_step": 24, "steps": 8},
        n_steps=8, batch_size=32)
    steps = torch.arange(8)
    assert torch.equal(model.policy.chain.network_t(steps), venv.core.chain.network_t(steps))
    assert model.policy.chain.network_t(steps)[0] == 24
    obs = venv.reset()
    for _ in range(7):  # to the last step
        obs, *_ = venv.step(np.zeros((4, backbone.state_dim), np.float32))
    model.policy.set_training_mode(False)  # as SB3's rollout
    obs_t, _ = model.policy.obs_to_tensor(obs)
    x, _, t, condition = model.policy._unpack(obs_t)
    assert t.tolist() == [0] * 4
    mean = model.policy.get_distribution(obs_t).mean
    torch.testing.assert_close(mean, backbone.eval().predict_x0(x, torch.full((4,), 24),
                                                                condition))


def test_trpo_updates_an_actor_with_attention(tmp_path) -> None:
    # TRPO's KL Hessian-vector product differentiates the policy twice; PyTorch's fused
    # attention kernels (ADRec's encoder) have no second derivative: a RuntimeError there
    # until the update ran on the math kernel.
    model, _, _ = _untrained_sequential_model("trpo", "ReFiT-SeqSynthetic-Concat-v0", tmp_path,
                                              n_steps=32, batch_size=64)
    before = [p.detach().clone() for p in model.policy.backbone.parameters()]
    model.learn(32)  # one episode of the 32-step chain per environment, then one update
    assert any(not torch.equal(b, a) for b, a in zip(before, model.policy.backbone.parameters()))


@pytest.mark.parametrize("env_id", ["ReFiT-SeqSynthetic-v0", "ReFiT-SeqSynthetic-v1"])
def test_the_update_scores_the_rollouts_actions_as_the_rollout_did(env_id: str,
                                                                   tmp_path) -> None:
    # SB3 puts the policy in training mode for its update: the backbone's dropout (DreamRec's
    # and ADRec's) must stay off there, or the first importance ratio is already noise.
    model, _, venv = _untrained_sequential_model("ppo", env_id, tmp_path, n_steps=4,
                                                 batch_size=16)
    obs_t, _ = model.policy.obs_to_tensor(venv.reset())
    model.policy.set_training_mode(False)  # as SB3's rollout
    actions, _, rollout_log_prob = model.policy(obs_t)
    model.policy.set_training_mode(True)  # as SB3's update
    assert model.policy.training and not model.policy.backbone.training
    _, update_log_prob, _ = model.policy.evaluate_actions(obs_t, actions)
    torch.testing.assert_close(update_log_prob, rollout_log_prob)


def test_the_update_scores_the_rollouts_actions_as_the_rollout_did_cf(pretrained: Path) -> None:
    model, _, venv = _model("ppo", pretrained, batch_size=40)  # DiffRec: input dropout 0.5
    obs_t, _ = model.policy.obs_to_tensor(venv.reset())
    model.policy.set_training_mode(False)
    actions, _, rollout_log_prob = model.policy(obs_t)
    model.policy.set_training_mode(True)
    _, update_log_prob, _ = model.policy.evaluate_actions(obs_t, actions)
    torch.testing.assert_close(update_log_prob, rollout_log_prob)
