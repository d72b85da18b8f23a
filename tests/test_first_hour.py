"""A researcher's first hour (issue 28): the env works with plain SB3 and Gymnasium's wrappers,
and bad settings get one clear line before any work starts."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecMonitor

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv

SYN = "ReFiT-Synthetic-v0"
STEPS = 10  # the synthetic id's chain length (envs/synthetic.toml [diffusion] steps)


@pytest.mark.parametrize("wrap", [lambda env: env, Monitor], ids=["plain", "monitor"])
def test_plain_sb3_ppo_learns_on_gym_make(wrap) -> None:
    """SB3 keeps its episode statistics under info["episode"]; the env must not use that key."""
    model = PPO("MultiInputPolicy", wrap(gym.make(SYN)), n_steps=20, batch_size=20, n_epochs=1,
                seed=0, device="cpu")
    model.learn(40)
    episodes = list(model.ep_info_buffer)
    assert len(episodes) == 40 // STEPS
    assert all(ep["l"] == STEPS and 0.0 <= ep["r"] <= 1.0 for ep in episodes)


def test_record_episode_statistics_wraps_the_env() -> None:
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(SYN))
    obs, info = env.reset(seed=0, options={"episode": 3})
    assert info["episode_id"] == 3 and "episode" not in info
    for _ in range(STEPS):
        obs, reward, terminated, _, info = env.step(obs["x"])
    assert terminated and info["episode_id"] == 3
    assert info["episode"]["l"] == STEPS and info["episode"]["r"] == pytest.approx(reward)


def test_make_vec_sync_with_wrappers() -> None:
    venv = gym.make_vec(SYN, num_envs=2, vectorization_mode="sync",
                        wrappers=[gym.wrappers.RecordEpisodeStatistics])
    obs, info = venv.reset(seed=0)
    assert info["episode_id"].shape == (2,)
    for _ in range(STEPS):
        obs, rewards, terminated, _, info = venv.step(obs["x"])
    assert terminated.all() and info["_episode"].all()
    np.testing.assert_array_equal(info["episode"]["l"], [STEPS, STEPS])
    np.testing.assert_allclose(info["episode"]["r"], rewards)


def test_make_vec_entry_point_with_vector_episode_statistics() -> None:
    venv = gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec(SYN, num_envs=3))
    obs, info = venv.reset(seed=0, options={"episodes": [4, 5, 6]})
    np.testing.assert_array_equal(info["episode_id"], [4, 5, 6])
    for _ in range(STEPS):
        obs, rewards, terminated, _, info = venv.step(obs["x"])
    assert terminated.all() and info["_episode"].all()
    np.testing.assert_array_equal(info["episode_id"], [4, 5, 6])  # the episodes that ended
    np.testing.assert_array_equal(info["episode"]["l"], [STEPS] * 3)
    np.testing.assert_allclose(info["episode"]["r"], rewards)


def test_sb3_vec_monitor_over_the_batched_vec_env() -> None:
    venv = VecMonitor(ReFiTVecEnv(SYN, num_envs=2, seed=0))
    obs = venv.reset()
    for _ in range(STEPS):
        obs, rewards, dones, infos = venv.step(obs["x"])
    assert dones.all()
    assert [info["episode"]["l"] for info in infos] == [STEPS, STEPS]
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], rewards, rtol=1e-5)
    assert all(isinstance(info["episode_id"], int) for info in infos)
