"""The sequential denoising MDP: spaces, checkers, seeding, bad input, isolation, SB3 face."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.backbones import CheckpointError, load_backbone
from refit_gym.mdp import ReFiTVecEnv, make_core
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.specs import load_env_spec

SEQ = "ReFiT-SeqSynthetic-v0"


@pytest.fixture
def checkpoint(pretrained_seq_synthetic: Path) -> str:
    return str(pretrained_seq_synthetic)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_spaces_and_both_checkers(checkpoint: str) -> None:
    env = gym.make(SEQ, checkpoint=checkpoint)
    core = env.unwrapped.core
    backbone, _ = load_backbone(checkpoint)
    assert env.observation_space["x"].shape == (backbone.state_dim,) == env.action_space.shape
    assert env.observation_space["t"].n == 20 + 1  # the spec's 20 respaced steps
    history = env.observation_space["history"]
    assert history.shape == (10,) and (history.nvec == core.n_items + 1).all()
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_episode_starts_from_noise_and_rewards_once(checkpoint: str) -> None:
    # The plain log-likelihood (no propagation) of the spec's collaborative reward, tau 0.1.
    env = gym.make(SEQ, checkpoint=checkpoint, steps=5, reward_params={"alphas": []})
    obs, info = env.reset(seed=3, options={"episode": 7})
    core = env.unwrapped.core
    np.testing.assert_array_equal(obs["history"], core.source.histories[7].numpy())
    assert obs["t"] == 5 and info["episode_id"] == 7
    assert abs(obs["x"].std() - 1.0) < 0.5  # x_K ~ N(0, I)
    rewards = []
    for step in range(5):
        obs, reward, terminated, truncated, _ = env.step(obs["x"] * 0.5)
        rewards.append(reward)
        assert terminated == (step == 4) and not truncated
    assert rewards[:-1] == [0.0] * 4 and rewards[-1] < 0  # a log-likelihood
    # The terminal reward is log softmax(x_0 E^T / tau)[target], tau = 0.1 (the spec's).
    embeddings = load_backbone(checkpoint)[0].item_table().detach()
    logits = torch.from_numpy(obs["x"]) @ embeddings.T / 0.1
    target = int(core.source.targets[7])
    assert rewards[-1] == pytest.approx(torch.log_softmax(logits, -1)[target].item(), rel=1e-5)


def test_a_chain_that_stops_early(checkpoint: str) -> None:
    spec = load_env_spec(SEQ)
    steps, stop = spec.diffusion.steps, spec.diffusion.steps - 20  # the spec's K is 20
    _, settings, core = make_core(SEQ, 2, checkpoint=checkpoint, stop_step=stop)
    chain = core.source.chain
    assert core.steps == chain.steps == 20
    np.testing.assert_array_equal(chain.network_t(torch.arange(20)).numpy(),
                                  np.arange(stop, steps))
    # Without a K, every trained step from T - 1 down to the stop.
    assert dataclasses.replace(settings, steps=None).chain_steps(spec) == 20
    assert settings.identity()["stop_step"] == stop
    assert "stop_step" not in make_core(SEQ, 2, checkpoint=checkpoint)[1].identity()
    # The episode's last step returns the denoiser's x_0 prediction at the stop step.
    backbone, _ = load_backbone(checkpoint)
    condition = backbone.encode({"history": core.source.histories[:2].long()})
    x = torch.randn(2, backbone.state_dim)
    torch.testing.assert_close(
        backbone.reverse_mean(x, torch.zeros(2, dtype=torch.long), condition, chain),
        backbone.predict_x0(x, torch.full((2,), stop, dtype=torch.long), condition))
    with pytest.raises(ValueError, match="stop step must be in"):
        make_core(SEQ, 2, checkpoint=checkpoint, stop_step=steps)
    with pytest.raises(ValueError, match="K <= T - stop = 20"):
        make_core(SEQ, 2, checkpoint=checkpoint, stop_step=stop, steps=21)
    with pytest.raises(ValueError, match="sequential ids only"):
        make_core("ReFiT-Synthetic-v0", 2, stop_step=1)


def test_seeding_and_bad_actions(checkpoint: str) -> None:
    def trace(seed: int) -> list[np.ndarray]:
        venv = gym.make_vec(SEQ, num_envs=4, checkpoint=checkpoint)
        obs, _ = venv.reset(seed=seed)
        out = [obs["x"].copy(), obs["history"].copy()]
        obs, reward, *_ = venv.step(obs["x"])
        return [*out, reward]

    a, b, c = trace(1), trace(1), trace(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    env = gym.make(SEQ, checkpoint=checkpoint)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match="floating point"):
        env.step(np.zeros_like(obs["x"], dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full_like(obs["x"], np.nan))


def test_only_training_rows_enter_and_clear_errors(checkpoint: str, tmp_path,
                                                   monkeypatch) -> None:
    _, _, core = make_core(SEQ, 3, checkpoint=checkpoint)
    data = cached_dataset(SEQ, None)
    np.testing.assert_array_equal(core.source.histories.numpy(), data.histories["train"])
    np.testing.assert_array_equal(core.source.targets.numpy(), data.targets["train"])
    assert core.n_episodes == data.n_train_rows
    with pytest.raises(IndexError, match="episode ids"):
        core.reset_rows(torch.arange(3), torch.tensor([0, 1, data.n_train_rows]),
                        torch.Generator())
    monkeypatch.chdir(tmp_path)  # no runs/ folder here: no default checkpoint
    with pytest.raises(CheckpointError, match="refit-gym pretrain --env ReFiT-SeqSynthetic-v0"):
        gym.make(SEQ)
    with pytest.raises(ValueError, match="collaborative-filtering ids only"):
        gym.make(SEQ, checkpoint=checkpoint, holdout_fraction=0.2)


def test_sb3_face_carries_the_history(checkpoint: str) -> None:
    venv = ReFiTVecEnv(SEQ, num_envs=4, seed=0, checkpoint=checkpoint, steps=3, group_size=2)
    obs = venv.reset()
    assert obs["history"].shape == (4, 10)
    np.testing.assert_array_equal(obs["history"][0], obs["history"][1])  # a group: one row
    for _ in range(3):
        venv.step_async(obs["x"])
        obs, _, dones, infos = venv.step_wait()
    assert dones.all()
    final = infos[0]["terminal_observation"]
    assert set(final) == {"x", "t", "history"} and final["history"].shape == (10,)


@pytest.mark.ml1m
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("env_id", ["ReFiT-Zhihu-v0", "ReFiT-Beauty-v0", "ReFiT-Beauty-Concat-v0",
                                    "ReFiT-ML1MSeq-v0", "ReFiT-ML1MSeq-Concat-v0"])
def test_real_sequential_ids_pass_both_checkers(env_id: str, data_dir: Path,
                                                tmp_path: Path) -> None:
    """The real ids with a tiny untrained checkpoint of their backbone (the checkers test the
    interface, not the weights)."""
    from refit_gym.backbones import save_backbone
    from refit_gym.specs import load_env_spec

    spec = load_env_spec(env_id)
    data = cached_dataset(env_id, str(data_dir))
    checkpoint = save_backbone(tmp_path / "tiny.pt", spec.build_backbone(data.n_items), env_id)
    env = gym.make(env_id, checkpoint=str(checkpoint), data_dir=str(data_dir))
    assert env.observation_space["history"].shape == (data.max_len,)
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
