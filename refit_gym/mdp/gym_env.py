"""Gymnasium faces of the denoising MDP: ``ReFiTEnv`` (one user) and ``ReFiTVectorEnv``.

Both wrap :class:`refit_gym.mdp.core.DenoisingMDP`; the vector env steps all N rows in one batched
call (no N sub-environments) and resets finished rows in the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np
import scipy.sparse as sp
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from refit_gym.data import InteractionData, default_cache_dir, load_dataset
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.mdp.core import ACTION_BOUND, DenoisingMDP
from refit_gym.mdp.rewards import Reward, make_reward
from refit_gym.specs import EnvSpec, load_env_spec

USER_SAMPLING = ("uniform", "sequential")


@dataclass(frozen=True)
class EnvSettings:
    """The MDP options of an id, from its spec's [env] section, overridable by keyword."""

    reward: str = "collaborative"
    reward_params: dict[str, Any] = field(default_factory=dict)
    holdout_fraction: float = 0.0
    holdout: str = "random"  # "random" or "temporal" (the latest interactions; core.HOLDOUTS)
    sampling_steps: int = 0
    user_sampling: str = "uniform"  # "uniform" draws users with np_random; "sequential" cycles
    device: str = "cpu"
    data_dir: str | None = None

    @classmethod
    def resolve(cls, spec: EnvSpec, overrides: dict[str, Any]) -> EnvSettings:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise TypeError(f"{spec.id}: unknown keyword arguments {unknown}; "
                            f"allowed: {sorted(allowed)}")
        base = {k: v for k, v in spec.env.items() if k in allowed}
        if "reward" in overrides and overrides["reward"] != base.get("reward"):
            base.pop("reward_params", None)  # the spec's parameters belong to its own reward
        params = {**base.get("reward_params", {}), **overrides.get("reward_params", {})}
        settings = cls(**{**base, **overrides, "reward_params": params})
        if settings.user_sampling not in USER_SAMPLING:
            raise ValueError(f"user_sampling must be one of {USER_SAMPLING}, "
                             f"got {settings.user_sampling!r}")
        return settings

    def build_reward(self, train: sp.csr_matrix) -> Reward:
        """The reward these settings name, over the training matrix ``train``."""
        return make_reward(self.reward, self.reward_params, train, self.device,
                           default_cache_dir())

    def build_core(self, data: InteractionData, diffusion: GaussianDiffusion, reward: Reward,
                   num_rows: int) -> DenoisingMDP:
        """A core of ``num_rows`` rows over ``data.train`` with these settings (rewards can be
        shared by cores)."""
        return DenoisingMDP(data.train, diffusion, reward, num_rows,
                            sampling_steps=self.sampling_steps,
                            holdout_fraction=self.holdout_fraction, holdout=self.holdout,
                            order=data.train_order, device=self.device)


@cache
def cached_dataset(env_id: str, data_dir: str | None = None) -> InteractionData:
    """The dataset of ``env_id``, loaded once per process."""
    return load_dataset(load_env_spec(env_id).dataset, data_dir)


def make_core(env_id: str, num_rows: int, *, data: InteractionData | None = None,
              **overrides: Any) -> tuple[EnvSpec, EnvSettings, DenoisingMDP]:
    """The batched core of ``env_id`` with ``num_rows`` rows (the torch-native path).

    ``data``: the dataset when the caller has loaded it already (otherwise it is read from
    ``data_dir``, once per process); only its training split is used.
    """
    spec = load_env_spec(env_id)
    settings = EnvSettings.resolve(spec, overrides)
    if data is None:
        data = cached_dataset(spec.id, settings.data_dir)
    core = settings.build_core(data, GaussianDiffusion(spec.diffusion, settings.device),
                               settings.build_reward(data.train), num_rows)
    return spec, settings, core


def observation_space(n_items: int, steps: int) -> spaces.Dict:
    return spaces.Dict({
        "x": spaces.Box(-ACTION_BOUND, ACTION_BOUND, (n_items,), np.float32),
        "t": spaces.Discrete(steps + 1),
    })


def action_space(n_items: int) -> spaces.Box:
    return spaces.Box(-ACTION_BOUND, ACTION_BOUND, (n_items,), np.float32)


class _UserPicker:
    """Chooses the users of new episodes, drawing only from the env's ``np_random``."""

    def __init__(self, n_users: int, mode: str) -> None:
        self.n_users, self.mode, self.next = n_users, mode, 0

    def __call__(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        if self.mode == "uniform":
            return torch.from_numpy(rng.integers(0, self.n_users, size=k))
        users = (self.next + np.arange(k)) % self.n_users
        self.next = int(users[-1] + 1) % self.n_users
        return torch.from_numpy(users)


def _torch_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator seeded from ``rng``, so every draw traces back to ``np_random``."""
    return torch.Generator(device).manual_seed(int(rng.integers(2**63)))


class BatchedEpisodes:
    """The vector faces' shared bookkeeping: whole-batch resets, same-step restarts of
    finished rows, and numpy observations; every draw comes from the ``rng`` passed in."""

    def __init__(self, core: DenoisingMDP, user_sampling: str, group_size: int = 1) -> None:
        if group_size < 1 or core.num_rows % group_size:
            raise ValueError(f"num_envs ({core.num_rows}) must be a positive multiple of "
                             f"group_size ({group_size})")
        self.core, self.group_size = core, group_size
        self.picker = _UserPicker(core.n_users, user_sampling)
        self.all_rows = torch.arange(core.num_rows, device=core.device)

    def users(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        """Users of ``k`` new episodes: k / group_size draws, each repeated group_size times."""
        if k % self.group_size:
            raise RuntimeError(f"{k} rows finished, not whole groups of {self.group_size}: "
                               "grouped rows must start together")
        return self.picker(k // self.group_size, rng).repeat_interleave(self.group_size)

    def obs(self) -> dict[str, np.ndarray]:
        return {"x": self.core.x.cpu().numpy().copy(), "t": self.core.t.cpu().numpy().copy()}

    def reset_all(self, rng: np.random.Generator, users: Any = None) -> None:
        picked = self.users(self.core.num_rows, rng)
        if users is not None:
            picked = torch.as_tensor(np.asarray(users), dtype=torch.long)
        self.core.reset_rows(self.all_rows, picked, _torch_generator(rng, self.core.device))

    def restart(self, terminated: torch.Tensor, rng: np.random.Generator) -> None:
        rows = terminated.nonzero().squeeze(-1)
        self.core.reset_rows(rows, self.users(len(rows), rng),
                             _torch_generator(rng, self.core.device))


def _as_action_tensor(action: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    array = np.asarray(action)
    if array.shape != shape:
        raise ValueError(f"action shape {array.shape} != expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"actions must be floating point, got dtype {array.dtype}")
    return torch.tensor(array, dtype=torch.float32, device=device)  # a copy: the core keeps it


class ReFiTEnv(gym.Env):
    """One user per episode: T denoising steps from x_T = h_u; reward at the last step.

    Observation ``{"x": float32 (n_items,), "t": int}``; action: x_{t-1}, float32 (n_items,).
    ``reset(options={"user": u})`` picks the user; otherwise users follow ``user_sampling``.
    """

    metadata = {"render_modes": []}

    def __init__(self, env_id: str = "ReFiT-Synthetic-v0", **overrides: Any) -> None:
        self.spec_, self.settings, self.core = make_core(env_id, 1, **overrides)
        self.observation_space = observation_space(self.core.n_items, self.core.steps)
        self.action_space = action_space(self.core.n_items)
        self._users = _UserPicker(self.core.n_users, self.settings.user_sampling)

    def _obs(self) -> dict[str, Any]:
        return {"x": self.core.x[0].cpu().numpy().copy(), "t": int(self.core.t[0])}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "user" in options:
            user = torch.tensor([int(options["user"])])
        else:
            user = self._users(1, self.np_random)
        generator = _torch_generator(self.np_random, self.core.device)
        self.core.reset_rows(torch.tensor([0]), user, generator)
        return self._obs(), {"user": int(user[0]), "t": self.core.steps}

    def step(self, action: Any):
        tensor = _as_action_tensor(action, self.action_space.shape, self.core.device)
        result = self.core.step(tensor.unsqueeze(0))
        terminated = bool(result.terminated[0])
        info = {"user": int(self.core.users[0]), "t": int(result.t[0])}
        if terminated:
            info["reward_name"] = self.settings.reward
        return self._obs(), float(result.reward[0]), terminated, False, info


class ReFiTVectorEnv(gym.vector.VectorEnv):
    """N episodes stepped as one batch, with same-step autoreset.

    When rows terminate, the returned observation of those rows is already the first of their
    next episode; their final observation is in ``info["final_obs"]`` (batched like the
    observation, valid where ``info["_final_obs"]`` is True).
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, env_id: str = "ReFiT-Synthetic-v0",
                 **overrides: Any) -> None:
        self.spec_, self.settings, self.core = make_core(env_id, num_envs, **overrides)
        self.num_envs = num_envs
        self.single_observation_space = observation_space(self.core.n_items, self.core.steps)
        self.single_action_space = action_space(self.core.n_items)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._episodes = BatchedEpisodes(self.core, self.settings.user_sampling)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._episodes.reset_all(self.np_random, (options or {}).get("users"))
        return self._episodes.obs(), {"user": self.core.users.cpu().numpy().copy()}

    def step(self, actions: Any):
        tensor = _as_action_tensor(actions, self.action_space.shape, self.core.device)
        result = self.core.step(tensor)
        terminated = result.terminated.cpu().numpy()
        info: dict[str, Any] = {"user": self.core.users.cpu().numpy().copy()}
        if terminated.any():
            info["final_obs"] = {"x": result.x.cpu().numpy(), "t": result.t.cpu().numpy()}
            info["_final_obs"] = terminated.copy()
            self._episodes.restart(result.terminated, self.np_random)
        rewards = result.reward.cpu().numpy().astype(np.float64)
        return self._episodes.obs(), rewards, terminated, np.zeros_like(terminated), info
