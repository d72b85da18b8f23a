"""The Stable-Baselines3 face: a ``VecEnv`` over the batched core (SB3 does not accept
Gymnasium vector envs). Same-step autoreset; a finished row's last observation is in its
info's ``terminal_observation``, as SB3's own vectorised envs do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from refit_gym.mdp.gym_env import (
    BatchedEpisodes,
    _as_action_tensor,
    action_space,
    make_core,
    observation_space,
)


class ReFiTVecEnv(VecEnv):
    """``num_envs`` rows of ``env_id``'s MDP for SB3 algorithms; keywords as for ``gym.make``
    (and ``data``, as for :func:`refit_gym.mdp.gym_env.make_core`).

    ``group_size`` G > 1 plays each drawn episode (user or row) in G consecutive rows at once
    (rows [0, G) share it, then [G, 2G), ...), each with its own noise and holdout draw: the
    groups a group-relative baseline needs (:class:`refit_gym.rl.sb3_agents.GroupRelativeReward`).
    Each row's info names its episode of the step in ``"episode_id"`` and its steps left after
    it in ``"t"`` (``"episode"`` is left to SB3's ``VecMonitor``).
    """

    def __init__(self, env_id: str = "ReFiT-Synthetic-v0", num_envs: int = 8,
                 seed: int | None = None, group_size: int = 1, **overrides: Any) -> None:
        self.spec_, self.settings, self.core = make_core(env_id, num_envs, **overrides)
        self.render_mode = None
        super().__init__(num_envs, observation_space(self.core), action_space(self.core))
        self._episodes = BatchedEpisodes(self.core, self.settings.user_sampling, group_size)
        self._rng = np.random.default_rng(seed)
        self._actions: np.ndarray | None = None

    @property
    def group_size(self) -> int:
        return self._episodes.group_size

    def reset(self) -> dict[str, np.ndarray]:
        if self._seeds[0] is not None:
            self._rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._episodes.reset_all(self._rng)
        self.reset_infos = self._start_infos(range(self.num_envs))
        return self._episodes.obs()

    def _start_infos(self, rows: Iterable[int]) -> list[dict[str, int]]:
        """The reset info of each of ``rows``' new episodes: its id and steps left."""
        episodes, t = self.core.episodes.cpu().numpy(), self.core.t.cpu().numpy()
        return [{"episode_id": int(episodes[row]), "t": int(t[row])} for row in rows]

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        result = self.core.step(_as_action_tensor(
            self._actions, (self.num_envs, self.core.state_dim), self.core.device))
        dones = result.terminated.cpu().numpy()
        infos: list[dict[str, Any]] = [
            {"episode_id": int(episode), "t": int(t)}
            for episode, t in zip(self.core.episodes.cpu().numpy(), result.t.cpu().numpy())]
        if dones.any():
            final, finished = self._episodes.obs(), np.flatnonzero(dones)
            for row in finished:  # SB3 wants one info dict per finished row
                infos[row].update({"terminal_observation": {k: v[row] for k, v in final.items()},
                                   "TimeLimit.truncated": False})
            self._episodes.restart(result.terminated, self._rng)
            for row, info in zip(finished, self._start_infos(finished)):
                self.reset_infos[row] = info
        return self._episodes.obs(), result.reward.cpu().numpy(), dones, infos

    def close(self) -> None:
        pass

    def _indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else indices

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None,
                   **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]
