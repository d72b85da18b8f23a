"""Gymnasium faces of the denoising MDP: ``ReFiTEnv`` (one episode) and ``ReFiTVectorEnv``.

Both wrap :class:`refit_gym.mdp.core.DenoisingMDP`; the vector env steps all N rows in one batched
call (no N sub-environments) and resets finished rows in the same step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space
from torch import Tensor

from refit_gym.backbones import CheckpointError, default_checkpoint, pretrain_hint
from refit_gym.data import Dataset, InteractionData, default_cache_dir, load_dataset
from refit_gym.data.loading import GENERATED
from refit_gym.diffusion import GaussianDiffusion, spaced_timesteps
from refit_gym.distributed import resolve_device
from refit_gym.mdp.core import ACTION_BOUND, DenoisingMDP
from refit_gym.mdp.episodes import EpisodeSource, InteractionEpisodes, SequenceEpisodes
from refit_gym.mdp.rewards import Reward, make_reward
from refit_gym.specs import (
    EnvSpec,
    check_device,
    check_settings,
    dataclass_hints,
    load_env_spec,
)

USER_SAMPLING = ("uniform", "in_order")
CF_ONLY = ("holdout_fraction", "holdout", "sampling_steps")
SEQUENTIAL_ONLY = ("checkpoint",)


@dataclass(frozen=True)
class EnvSettings:
    """The MDP options of an id, from its spec's [env] section, overridable by keyword."""

    reward: str = "collaborative"
    reward_params: dict[str, Any] = field(default_factory=dict)
    # Collaborative filtering only: a held-out part of the history is the reward's target.
    holdout_fraction: float = 0.0
    holdout: str = "random"  # "random" or "temporal" (the latest interactions)
    sampling_steps: int = 0  # x_K = a draw of q(x_k | h_u) with k = this (0: h_u itself)
    steps: int | None = None  # K, the chain's steps (a respacing of the T trained); None: T
    # Sequential only: the chain stops at this network timestep s, its last step jumping from x_s
    # to the denoiser's x_0 prediction there (0: it runs to the end); K defaults to T - s.
    stop_step: int = 0
    checkpoint: str | None = None  # sequential: the pretrained backbone whose E scores x_0
    user_sampling: str = "uniform"  # episodes (users or rows): "uniform" draws, "in_order"
    device: str = "auto"  # "auto": CUDA when available, else CPU
    data_dir: str | None = None

    @classmethod
    def resolve(cls, spec: EnvSpec, overrides: dict[str, Any]) -> EnvSettings:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise TypeError(f"{spec.id}: unknown keyword arguments {unknown}; "
                            f"allowed: {sorted(allowed)}")
        if isinstance(overrides.get("device"), torch.device):
            overrides = {**overrides, "device": str(overrides["device"])}
        check_settings(overrides, dataclass_hints(cls), f"{spec.id} keyword",
                       minima={"steps": 1, "sampling_steps": 0, "stop_step": 0})
        base = {k: v for k, v in spec.env.items() if k in allowed}
        if "reward" in overrides and overrides["reward"] != base.get("reward"):
            base.pop("reward_params", None)  # the spec's parameters belong to its own reward
        params = {**base.get("reward_params", {}), **overrides.get("reward_params", {})}
        settings = cls(**{**base, **overrides, "reward_params": params})
        device = resolve_device(check_device(settings.device, f"{spec.id} device"))
        settings = dataclasses.replace(settings, device=device)
        if settings.user_sampling not in USER_SAMPLING:
            renamed = (" ('sequential' is now 'in_order': the scenario owns that word)"
                       if settings.user_sampling == "sequential" else "")
            raise ValueError(f"user_sampling must be one of {USER_SAMPLING}, "
                             f"got {settings.user_sampling!r}{renamed}")
        if spec.backbone_type != "diffrec":
            misplaced = [k for k in CF_ONLY if getattr(settings, k) != getattr(cls, k)]
            if misplaced:
                raise ValueError(f"{spec.id}: {misplaced} apply to collaborative-filtering ids "
                                 "only (a sequential episode's target is its next item)")
        elif misplaced := [k for k in SEQUENTIAL_ONLY if getattr(settings, k) != getattr(cls, k)]:
            raise ValueError(f"{spec.id}: {misplaced} applies to sequential ids only (their "
                             "reward scores x_0 with a pretrained model's item table; a "
                             "collaborative-filtering id's reward needs none)")
        if settings.stop_step and spec.backbone_type == "diffrec":
            raise ValueError(f"{spec.id}: stop_step applies to sequential ids only (DiffRec's "
                             "chain runs its mean from the user's own history to the end)")
        try:
            spaced_timesteps(spec.diffusion.steps, settings.chain_steps(spec), settings.stop_step)
        except ValueError as err:
            hint = ("; with stop_step = s, pass steps <= T - s as well (steps = T - s: every "
                    "trained step down to s)" if 0 < settings.stop_step < spec.diffusion.steps
                    else "")
            raise ValueError(f"{spec.id}: {err}{hint}") from None
        if settings.data_dir is not None and spec.dataset["format"] in GENERATED:
            raise ValueError(f"{spec.id}: data_dir applies to ids with data files; this id's "
                             f"dataset is generated ({spec.dataset['format']!r})")
        return settings

    def chain_steps(self, spec: EnvSpec) -> int:
        """K: ``steps``, else every trained step from T - 1 down to ``stop_step``."""
        return self.steps if self.steps is not None else spec.diffusion.steps - self.stop_step

    def chain(self, spec: EnvSpec) -> GaussianDiffusion:
        """The K-step reverse chain of the episodes (all T trained steps unless ``steps`` or
        ``stop_step`` say otherwise)."""
        return GaussianDiffusion(spec.diffusion, self.device, respaced_steps=self.chain_steps(spec),
                                 stop_step=self.stop_step)

    def identity(self) -> dict[str, Any]:
        """The settings as a run's resume identity records them: ``stop_step`` only when set,
        so runs written before it existed still resume."""
        fields = dataclasses.asdict(self)
        if not self.stop_step:
            del fields["stop_step"]
        return fields

    def item_embeddings(self, spec: EnvSpec, data: Dataset) -> Tensor | None:
        """Sequential ids: the frozen item table E of the pretrained backbone (``checkpoint``,
        else the default output of ``refit-gym pretrain``); CF ids: None."""
        if isinstance(data, InteractionData):
            return None
        path = Path(self.checkpoint or default_checkpoint(spec.id)).absolute()
        if not path.is_file():
            fix = (pretrain_hint(spec.id, path) if self.checkpoint else
                   f"run `refit-gym pretrain --env {spec.id} --seed 1` in the current directory "
                   "(it writes there), or pass gym.make(..., checkpoint=PATH)")
            where = ("the path given as checkpoint" if self.checkpoint else
                     f"the default, {default_checkpoint(spec.id)} under the current directory")
            raise CheckpointError(
                f"{spec.id} scores final states with a pretrained model's item embeddings, and "
                f"no checkpoint was found at {path} ({where}): {fix}")
        backbone, _ = spec.load_backbone(path, data.n_items)
        return backbone.item_table().detach().to(self.device)

    def check_reward_params(self, data: Dataset) -> None:
        """Refuse reward parameters that only ``data`` can judge: a cut-off ``k`` outside
        [1, n_items]."""
        k = self.reward_params.get("k")
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool)
                                  and 1 <= k <= data.n_items):
            raise ValueError(f"reward_params k = {k!r}: the ranking cut-off must be an integer "
                             f"in [1, {data.n_items}] (the dataset's items)")

    def build_reward(self, data: Dataset, item_embeddings: Tensor | None = None) -> Reward:
        """The reward these settings name, over ``data``'s training split."""
        self.check_reward_params(data)
        return make_reward(self.reward, self.reward_params, data, self.device,
                           default_cache_dir(), item_embeddings)

    def build_source(self, spec: EnvSpec, data: Dataset,
                     item_embeddings: Tensor | None = None) -> EpisodeSource:
        """The episodes of ``data``'s training split with these settings."""
        chain = self.chain(spec)
        if isinstance(data, InteractionData):
            return InteractionEpisodes(data.train, chain, sampling_steps=self.sampling_steps,
                                       holdout_fraction=self.holdout_fraction,
                                       holdout=self.holdout, order=data.train_order,
                                       device=self.device)
        if item_embeddings is None:
            raise ValueError("a sequential source needs the pretrained item embeddings")
        return SequenceEpisodes(data, chain, item_embeddings, self.device)


@cache
def cached_dataset(env_id: str, data_dir: str | None = None) -> Dataset:
    """The dataset of ``env_id``, loaded once per process."""
    return load_dataset(load_env_spec(env_id).dataset, data_dir)


def make_core(env_id: str, num_rows: int, *, data: Dataset | None = None,
              **overrides: Any) -> tuple[EnvSpec, EnvSettings, DenoisingMDP]:
    """The batched core of ``env_id`` with ``num_rows`` rows (the torch-native path).

    ``data``: the dataset when the caller has loaded it already (otherwise it is read from
    ``data_dir``, once per process); only its training split is used. ``overrides``: the
    keyword settings of :class:`EnvSettings` (reward, steps, device, ...).

    Returns ``(spec, settings, core)``: the id's :class:`EnvSpec` as loaded, the
    :class:`EnvSettings` resolved from its [env] section and ``overrides``, and the
    :class:`DenoisingMDP` of ``num_rows`` episode rows on ``settings``' device (states
    ``(num_rows, state_dim)``), its episodes from the training split and rewarded by the
    settings' reward.
    """
    spec = load_env_spec(env_id)
    settings = EnvSettings.resolve(spec, overrides)
    if data is None:
        data = cached_dataset(spec.id, settings.data_dir)
    embeddings = settings.item_embeddings(spec, data)
    core = DenoisingMDP(settings.build_source(spec, data, embeddings),
                        settings.build_reward(data, embeddings), num_rows)
    return spec, settings, core


def observation_space(core: DenoisingMDP) -> spaces.Dict:
    """``x`` (the state), ``t`` (steps left) and the source's inputs (sequential: history)."""
    return spaces.Dict({
        "x": spaces.Box(-ACTION_BOUND, ACTION_BOUND, (core.state_dim,), np.float32),
        "t": spaces.Discrete(core.steps + 1),
        **core.source.input_spaces(),
    })


def action_space(core: DenoisingMDP) -> spaces.Box:
    return spaces.Box(-ACTION_BOUND, ACTION_BOUND, (core.state_dim,), np.float32)


class _EpisodePicker:
    """Chooses the episode ids (users or rows) of new episodes, drawing only from the env's
    ``np_random``."""

    def __init__(self, n_episodes: int, mode: str) -> None:
        self.n_episodes, self.mode, self.next = n_episodes, mode, 0

    def __call__(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        if self.mode == "uniform":
            return torch.from_numpy(rng.integers(0, self.n_episodes, size=k))
        picked = (self.next + np.arange(k)) % self.n_episodes
        self.next = int(picked[-1] + 1) % self.n_episodes
        return torch.from_numpy(picked)


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
        self.picker = _EpisodePicker(core.n_episodes, user_sampling)
        self.all_rows = torch.arange(core.num_rows, device=core.device)

    def users(self, k: int, rng: np.random.Generator) -> torch.Tensor:
        """Episode ids of ``k`` new episodes: k / group_size draws, each repeated group_size
        times."""
        if k % self.group_size:
            raise RuntimeError(f"{k} rows finished, not whole groups of {self.group_size}: "
                               "grouped rows must start together")
        return self.picker(k // self.group_size, rng).repeat_interleave(self.group_size)

    def obs(self) -> dict[str, np.ndarray]:
        return observe(self.core, slice(None))

    def reset_all(self, rng: np.random.Generator, episodes: Any = None) -> None:
        picked = self.users(self.core.num_rows, rng)
        if episodes is not None:
            picked = torch.as_tensor(np.asarray(episodes), dtype=torch.long)
            groups = picked.view(-1, self.group_size)
            if not bool((groups == groups[:, :1]).all()):
                raise ValueError(
                    f"with group_size {self.group_size}, reset option 'episodes' must repeat "
                    f"each id over its {self.group_size} consecutive rows (the rows a group "
                    f"baseline compares): pass np.repeat(ids, {self.group_size})")
        self.core.reset_rows(self.all_rows, picked, _torch_generator(rng, self.core.device))

    def restart(self, terminated: torch.Tensor, rng: np.random.Generator) -> None:
        rows = terminated.nonzero().squeeze(-1)
        self.core.reset_rows(rows, self.users(len(rows), rng),
                             _torch_generator(rng, self.core.device))


def observe(core: DenoisingMDP, rows: Any) -> dict[str, Any]:
    """The observation of ``rows`` (an index or a slice): numpy copies of x, t and inputs."""
    obs = {"x": core.x[rows].cpu().numpy().copy(), "t": core.t[rows].cpu().numpy().copy()}
    for key in core.source.input_spaces():
        obs[key] = core.inputs[key][rows].cpu().numpy().copy()
    return obs


RESET_OPTIONS = ("episode",)  # ReFiTEnv.reset(options=...): the episode (user or row) id
VECTOR_RESET_OPTIONS = ("episodes",)  # ReFiTVectorEnv.reset(options=...): one id per row


def _reset_options(options: dict[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``options`` (None: none), refusing keys a reset would silently ignore."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"reset(options=...): unknown keys {unknown}; allowed: {list(allowed)}")
    return options


def _as_action_tensor(action: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    array = np.asarray(action)
    if array.shape != shape:
        raise ValueError(f"action shape {array.shape} != expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"actions must be floating point, got dtype {array.dtype}: the action is "
                        "the next state x_(t-1); pass np.asarray(action, dtype=np.float32)")
    return torch.tensor(array, dtype=torch.float32, device=device)  # a copy: the core keeps it


class ReFiTEnv(gym.Env):
    """One episode (a user, or a training row) at a time: K denoising steps from x_K; reward at
    the last step.

    Observation ``{"x": float32 (d,), "t": int}`` plus, for a sequential id, ``"history"``
    (L item ids, padded with n_items); action: x_{t-1}, float32 (d,).
    ``reset(options={"episode": i})`` picks the episode; otherwise they follow ``user_sampling``.
    ``info["episode_id"]`` names it (``info["episode"]`` is left to Gymnasium's and SB3's
    episode statistics, ``RecordEpisodeStatistics`` and ``Monitor``).
    """

    metadata = {"render_modes": []}

    def __init__(self, env_id: str = "ReFiT-Synthetic-v0", **overrides: Any) -> None:
        self.spec_, self.settings, self.core = make_core(env_id, 1, **overrides)
        self.observation_space = observation_space(self.core)
        self.action_space = action_space(self.core)
        self._picker = _EpisodePicker(self.core.n_episodes, self.settings.user_sampling)

    def _obs(self) -> dict[str, Any]:
        obs = observe(self.core, 0)
        obs["t"] = int(obs["t"])
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = _reset_options(options, RESET_OPTIONS)
        if "episode" in options:
            episode = torch.tensor([int(options["episode"])])
        else:
            episode = self._picker(1, self.np_random)
        generator = _torch_generator(self.np_random, self.core.device)
        self.core.reset_rows(torch.tensor([0]), episode, generator)
        return self._obs(), {"episode_id": int(episode[0]), "t": self.core.steps}

    def step(self, action: Any):
        tensor = _as_action_tensor(action, self.action_space.shape, self.core.device)
        result = self.core.step(tensor.unsqueeze(0))
        terminated = bool(result.terminated[0])
        info = {"episode_id": int(self.core.episodes[0]), "t": int(result.t[0])}
        if terminated:
            info["reward_name"] = self.settings.reward
        return self._obs(), float(result.reward[0]), terminated, False, info


class ReFiTVectorEnv(gym.vector.VectorEnv):
    """N episodes stepped as one batch, with same-step autoreset.

    When rows terminate, the returned observation of those rows is already the first of their
    next episode; their final observation is in ``info["final_obs"]`` (batched like the
    observation, valid where ``info["_final_obs"]`` is True). ``info["episode_id"]`` and
    ``info["t"]`` (N,) are each row's episode and steps left after the step just taken (a
    finished row's: the episode that ended, t = 0), as ``ReFiTEnv``'s info has them;
    ``reset(options={"episodes": ids})`` starts the N given ones.

    ``group_size`` G > 1 plays each drawn episode in G consecutive rows at once (rows [0, G)
    share one, then [G, 2G), ...), each with its own noise: the groups a group-relative
    baseline needs, as :class:`refit_gym.mdp.ReFiTVecEnv`'s (``gym.make_vec(id, num_envs=64,
    group_size=8)``).
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, env_id: str = "ReFiT-Synthetic-v0", num_envs: int = 1,
                 group_size: int = 1, **overrides: Any) -> None:
        self.spec_, self.settings, self.core = make_core(env_id, num_envs, **overrides)
        self.num_envs = num_envs
        self.single_observation_space = observation_space(self.core)
        self.single_action_space = action_space(self.core)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._episodes = BatchedEpisodes(self.core, self.settings.user_sampling, group_size)

    @property
    def group_size(self) -> int:
        return self._episodes.group_size

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (list, tuple, np.ndarray)):
            raise TypeError(f"reset(seed=...) takes one int here: the {self.num_envs} rows are one "
                            f"batch drawing from one generator (got a {type(seed).__name__}); "
                            "gym.make_vec(..., vectorization_mode='sync') seeds each env")
        super().reset(seed=int(seed) if isinstance(seed, np.integer) else seed)
        episodes = _reset_options(options, VECTOR_RESET_OPTIONS).get("episodes")
        if episodes is not None and np.shape(episodes) != (self.num_envs,):
            raise ValueError(f"reset option 'episodes' must hold one episode id per row, shape "
                             f"({self.num_envs},), got shape {np.shape(episodes)}")
        self._episodes.reset_all(self.np_random, episodes)
        return self._episodes.obs(), self._episode_info(self.core.t)

    def _episode_info(self, t: torch.Tensor) -> dict[str, Any]:
        """Each row's episode id and steps left ``t``, with the mask Gymnasium's vector infos
        carry per key."""
        every_row = np.ones(self.num_envs, dtype=bool)
        return {"episode_id": self.core.episodes.cpu().numpy().copy(), "_episode_id": every_row,
                "t": t.cpu().numpy().copy(), "_t": every_row.copy()}

    def step(self, actions: Any):
        tensor = _as_action_tensor(actions, self.action_space.shape, self.core.device)
        result = self.core.step(tensor)
        terminated = result.terminated.cpu().numpy()
        info = self._episode_info(result.t)
        if terminated.any():
            info["final_obs"] = self._episodes.obs()
            info["_final_obs"] = terminated.copy()
            self._episodes.restart(result.terminated, self.np_random)
        rewards = result.reward.cpu().numpy().astype(np.float64)
        return self._episodes.obs(), rewards, terminated, np.zeros_like(terminated), info
