"""The MDP's faces: checkers, spaces, seeding, autoreset, bad input, isolation of valid/test."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.data import InteractionData
from refit_gym.mdp.gym_env import ReFiTEnv, ReFiTVectorEnv, make_core
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv

SYN = "ReFiT-Synthetic-v0"


def _rollout(env: ReFiTEnv, seed: int, actions: list[np.ndarray]):
    obs, info = env.reset(seed=seed)
    trace = [(obs["x"].copy(), obs["t"], info["episode_id"])]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        trace.append((obs["x"].copy(), obs["t"], reward, terminated, truncated))
    return trace


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_both_checkers_pass_on_synthetic() -> None:
    env = gym.make(SYN)
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_make_with_module_prefix_and_spaces() -> None:
    env = gym.make(f"refit_gym:{SYN}", holdout_fraction=0.0)  # the input: the whole history
    core = env.unwrapped.core
    assert env.observation_space["x"].shape == (core.n_items,)
    assert env.observation_space["t"].n == core.steps + 1
    assert env.action_space.shape == (core.n_items,)
    obs, info = env.reset(seed=0, options={"episode": 5})
    assert info["episode_id"] == 5 and obs["t"] == core.steps
    np.testing.assert_array_equal(obs["x"], core.source.train[5].toarray().ravel())


def test_episode_has_t_steps_and_terminal_reward_only() -> None:
    env = gym.make(SYN)
    obs, _ = env.reset(seed=1)
    steps = env.unwrapped.core.steps
    rewards = []
    for i in range(steps):
        obs, reward, terminated, truncated, _info = env.step(obs["x"])
        rewards.append(reward)
        assert obs["t"] == steps - 1 - i and not truncated
        assert terminated == (i == steps - 1)
    assert rewards[:-1] == [0.0] * (steps - 1) and 0.0 <= rewards[-1] <= 1.0  # an NDCG
    with pytest.raises(RuntimeError, match="reset"):
        env.step(obs["x"])


def test_reset_seed_reproduces_episodes_and_arrays_are_fresh() -> None:
    env = ReFiTEnv(SYN, sampling_steps=3, holdout_fraction=0.3)
    rng = np.random.default_rng(0)
    actions = [rng.random(env.action_space.shape).astype(np.float32) for _ in range(10)]
    a, b = _rollout(env, 7, actions), _rollout(env, 7, actions)
    c = _rollout(env, 8, actions)
    for first, second in zip(a, b):
        for u, v in zip(first, second):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0][0], c[0][0])  # another seed: another user or noise
    obs, _ = env.reset(seed=0)
    obs["x"][:] = 99.0
    assert float(env.unwrapped.core.x.max()) <= 1.1


def test_bad_actions_raise_clear_errors() -> None:
    env = ReFiTEnv(SYN)
    env.reset(seed=0)
    n = env.action_space.shape[0]
    with pytest.raises(ValueError, match=r"action shape \(3,\)"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="floating point"):
        env.step(np.zeros(n, np.int64))
    bad = np.zeros(n, np.float32)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        env.step(bad)
    bad[0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        env.step(bad)
    big = np.full(n, 1e6, np.float32)  # finite but out of bounds: clipped (documented)
    obs, *_ = env.step(big)
    assert obs["x"].max() == env.action_space.high.max()


def test_unknown_keyword_and_bad_settings() -> None:
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['rewrd'\]"):
        gym.make(SYN, rewrd="hit")
    with pytest.raises(ValueError, match="user_sampling"):
        gym.make(SYN, user_sampling="random")
    with pytest.raises(ValueError, match="'sequential' is now 'in_order'"):
        gym.make(SYN, user_sampling="sequential")
    with pytest.raises(ValueError, match="holdout_fraction"):
        gym.make(SYN, holdout_fraction=1.5)
    env = gym.make(SYN, reward="hit", reward_params={"k": 5})
    assert env.unwrapped.settings.reward_params == {"k": 5}  # spec's collaborative params dropped


def test_holdout_hides_part_of_history_as_target() -> None:
    _, _, core = make_core(SYN, 64, holdout_fraction=0.5, reward="hit", reward_params={"k": 5})
    users = torch.arange(64)
    core.reset_rows(torch.arange(64), users, torch.Generator().manual_seed(0))
    full = torch.from_numpy(core.source.train[:64].toarray()).float()
    hidden = core.relevance
    assert bool(((core.visible + hidden) == full).all())  # a partition of the history
    assert 0.35 < hidden.sum().item() / full.sum().item() < 0.65


def test_temporal_holdout_hides_each_users_latest_interactions(small_data) -> None:
    _, _, core = make_core(SYN, 40, data=small_data, holdout_fraction=0.25, holdout="temporal",
                           reward="hit", reward_params={"k": 5})  # relevance = the target
    users = torch.arange(40)
    core.reset_rows(users, users, torch.Generator().manual_seed(0))
    order = small_data.train_order[:40].toarray()
    counts = small_data.train[:40].getnnz(axis=1)
    n_hidden = np.minimum(np.round(0.25 * counts), counts - 1)
    expected = (order > (counts - n_hidden)[:, None]).astype(np.float32)
    np.testing.assert_array_equal(core.relevance.numpy(), expected)
    full = small_data.train[:40].toarray()
    np.testing.assert_array_equal(core.visible.numpy() + expected, full)  # a partition
    assert (core.relevance.sum(1).numpy() == n_hidden).all()
    history = core.visible.clone()
    core.reset_rows(users, users, torch.Generator().manual_seed(1))  # nothing is drawn
    assert torch.equal(core.visible, history)


def test_temporal_holdout_needs_an_ordered_dataset(small_data) -> None:
    unordered = InteractionData("unordered", small_data.train, small_data.valid, small_data.test)
    with pytest.raises(ValueError, match=r"chronological order.*holdout='random'"):
        make_core(SYN, 4, data=unordered, holdout_fraction=0.2, holdout="temporal")
    shuffled = InteractionData("bad", small_data.train, small_data.valid, small_data.test,
                               small_data.valid)
    with pytest.raises(ValueError, match="sparsity pattern"):
        make_core(SYN, 4, data=shuffled, holdout_fraction=0.2, holdout="temporal")
    with pytest.raises(ValueError, match="holdout must be one of"):
        make_core(SYN, 4, holdout_fraction=0.2, holdout="latest")


def test_valid_and_test_cannot_influence_observations_or_rewards(small_data, monkeypatch) -> None:
    """Same train, different valid/test: the same seeded episodes, bit for bit."""
    import refit_gym.mdp.gym_env as gym_env

    other = InteractionData("other", small_data.train, small_data.test, small_data.valid)
    assert (other.valid != small_data.valid).nnz > 0
    traces = []
    for data in (small_data, other):
        monkeypatch.setattr(gym_env, "cached_dataset", lambda env_id, data_dir, d=data: d)
        venv = ReFiTVectorEnv(num_envs=6, env_id=SYN, holdout_fraction=0.2, holdout="random")
        obs, _ = venv.reset(seed=4)
        trace = [obs["x"]]
        for _ in range(venv.core.steps):
            obs, rewards, *_ = venv.step(obs["x"] * 0.9)
            trace += [obs["x"], rewards]
        traces.append(trace)
    for a, b in zip(*traces):
        np.testing.assert_array_equal(a, b)
    assert not hasattr(venv.core, "valid") and not hasattr(venv.core, "test")


def test_vector_env_is_native_and_autoresets_same_step() -> None:
    venv = gym.make_vec(SYN, num_envs=5)
    assert isinstance(venv, ReFiTVectorEnv)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, info = venv.reset(seed=2)
    assert obs["x"].shape == (5, venv.single_action_space.shape[0]) and len(info["episode_id"]) == 5
    steps = venv.core.steps
    np.testing.assert_array_equal(info["t"], obs["t"])
    assert info["_t"].all() and info["_episode_id"].all()
    played = info["episode_id"].copy()
    for i in range(steps):
        last = obs
        obs, rewards, terminated, truncated, info = venv.step(obs["x"])
        assert (info["t"] == steps - 1 - i).all()  # as ReFiTEnv's info["t"], after the step
    assert terminated.all() and not truncated.any() and ((rewards >= 0) & (rewards <= 1)).all()
    assert (obs["t"] == steps).all()  # already the next episode
    np.testing.assert_array_equal(info["episode_id"], played)  # the episodes that ended
    np.testing.assert_array_equal(info["final_obs"]["x"], last["x"])  # the mean chain of x
    assert info["_final_obs"].all()
    again = gym.make_vec(SYN, num_envs=5)
    obs2, _ = again.reset(seed=2)
    first, _ = gym.make_vec(SYN, num_envs=5).reset(seed=2)
    np.testing.assert_array_equal(obs2["x"], first["x"])


def test_sb3_vec_env_same_step_autoreset_and_seed() -> None:
    env = ReFiTVecEnv(SYN, num_envs=4)
    env.seed(11)
    obs = env.reset()
    env.seed(11)
    np.testing.assert_array_equal(env.reset()["x"], obs["x"])
    for i in range(env.core.steps):
        prev = obs
        obs, _rewards, dones, infos = env.step(obs["x"])
        assert [info["t"] for info in infos] == [env.core.steps - 1 - i] * 4
    assert dones.all() and (obs["t"] == env.core.steps).all()
    assert all(info["TimeLimit.truncated"] is False for info in infos)
    np.testing.assert_array_equal(infos[0]["terminal_observation"]["x"], prev["x"][0])
    assert env.get_attr("num_envs", [0, 1]) == [4, 4] and env.env_is_wrapped(object) == [False] * 4


def test_sb3_ppo_runs_on_the_vec_env() -> None:
    from stable_baselines3 import PPO

    env = ReFiTVecEnv(SYN, num_envs=8, seed=0)
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=128, n_epochs=1, seed=0)
    model.learn(2048)
    assert model.num_timesteps >= 2048


@pytest.mark.ml1m
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ml1m_env_passes_both_checkers(data_dir) -> None:
    env = gym.make("ReFiT-ML1M-v0", data_dir=str(data_dir))
    assert env.action_space.shape == (2810,) and env.observation_space["t"].n == 41
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_core_rows_reset_independently_and_reward_only_finished_rows() -> None:
    _, _, core = make_core(SYN, 4, reward="neg_mse")
    generator = torch.Generator().manual_seed(0)
    core.reset_rows(torch.arange(4), torch.arange(4), generator)
    handed_out = None
    for i in range(core.steps - 1):
        result = core.step(core.x * 0.5)
        if i == 0:
            handed_out = result.x.clone(), result.x
        if i == 2:  # rows 2 and 3 start over, three steps behind rows 0 and 1
            core.reset_rows(torch.tensor([2, 3]), torch.tensor([7, 8]), generator)
    torch.testing.assert_close(handed_out[1], handed_out[0])  # earlier results never mutate
    result = core.step(core.x * 0.5)
    assert result.terminated.tolist() == [True, True, False, False]
    assert bool((result.reward[:2] < 0).all()) and result.reward[2:].tolist() == [0.0, 0.0]
    assert core.episodes.tolist() == [0, 1, 7, 8]
    with pytest.raises(RuntimeError, match="terminated"):
        core.step(core.x)


@pytest.mark.ml1m
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_amazon_book_env_passes_both_checkers_without_dense_matrices(data_dir) -> None:
    env = gym.make("ReFiT-AmazonBook-v0", data_dir=str(data_dir))
    core = env.unwrapped.core
    assert core.source.train.shape == (70679, 24915)
    assert core.x.shape == (1, 24915)  # state is per row: no users x items tensor anywhere
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_faces_run_on_the_callers_dataset(small_data) -> None:
    """finetune hands its loaded data to the SB3 face (honouring --data-dir, no second load)."""
    venv = ReFiTVecEnv(SYN, num_envs=3, seed=0, data=small_data, reward="neg_mse",
                       holdout_fraction=0.0)
    assert (venv.core.n_episodes, venv.core.n_items) == small_data.train.shape
    venv.reset()
    users = venv.core.episodes.numpy()
    expected = small_data.train[users].toarray().astype(np.float32)
    np.testing.assert_array_equal(venv.core.visible.numpy(), expected)


def test_in_order_sampling_walks_the_episodes_and_wraps() -> None:
    venv = gym.make_vec(SYN, num_envs=4, user_sampling="in_order", group_size=2)
    _, info = venv.reset(seed=0)
    np.testing.assert_array_equal(info["episode_id"], [0, 0, 1, 1])
    n = venv.core.n_episodes
    venv._episodes.picker.next = n - 1  # the walk's end: the next pair wraps to the first
    for _ in range(venv.core.steps):
        venv.step(np.zeros(venv.action_space.shape, np.float32))
    np.testing.assert_array_equal(venv.core.episodes.numpy(), [n - 1, n - 1, 0, 0])
    env = gym.make(SYN, user_sampling="in_order")
    assert [env.reset(seed=0)[1]["episode_id"], env.reset()[1]["episode_id"]] == [0, 1]
