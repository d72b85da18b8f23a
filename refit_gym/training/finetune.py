"""Fine-tuning a pretrained backbone: the driver shared by every algorithm.

It evaluates the starting model (it is a candidate: selection may keep it), runs the
algorithm, evaluates on validation after each epoch, keeps the best by validation NDCG@20, and
writes ``finetuned.pt`` and ``metrics.json``. ``state.pt`` in the output folder holds everything
needed to resume (weights, optimiser, random state, position in the epoch); rerunning the same
command after an interruption continues from it. Test metrics are recorded, never used.

Under ``torchrun`` the ReFiT agent and ``continue`` split every batch over the ranks and sum their
gradients, evaluation is sharded, and rank 0 alone writes (:mod:`refit_gym.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.logger import Logger
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from refit_gym.backbones import Backbone, load_backbone, save_backbone
from refit_gym.data import (
    Dataset,
    SequenceData,
    atomic_path,
    default_cache_dir,
    sha256_of,
    write_json,
)
from refit_gym.data.progress import Progress
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.distributed import Distributed, communication_seconds, current
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.episodes import EpisodeSource
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.mdp.rewards import Reward
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, user_batches
from refit_gym.rl.sb3_agents import (
    SB3_ALGOS,
    EpisodeRewards,
    episodes_per_epoch,
    make_model,
    make_vec_env,
    split_hyperparams,
)
from refit_gym.specs import EnvSpec, PretrainConfig, load_agent_hyperparams
from refit_gym.training.metrics import SELECTION_METRIC, eval_mode, evaluate
from refit_gym.training.pretrain import make_timestep_sampler, rank_generator, train_epoch
from refit_gym.training.resume import (
    gather_random_states,
    load_state,
    restore_random_states,
    save_state,
    seed_for,
)

ALGOS = ("refit", "continue", *SB3_ALGOS)
FIXED_EPISODES = 256  # training episodes of the optimiser's own check
# What `continue` may change of the spec's [pretrain] protocol (``--set``): the optimiser's steps
# and how often validation interrupts a long run; the rest defines the backbone's own training.
CONTINUE_SETTINGS = ("lr", "weight_decay", "batch_size", "importance_sampling", "eval_every")


class RunState:
    """The resumable state of a fine-tuning run, saved atomically to ``out_dir/state.pt``."""

    # What a resumed run takes back (beside the weights, optimiser and random states).
    FIELDS = ("epoch", "batch", "elapsed", "communication", "history", "epoch_rewards", "best",
              "best_weights", "finished", "final")

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.epoch, self.batch, self.elapsed = 1, 0, 0.0
        self.communication = 0.0  # of elapsed, seconds in collectives (torchrun)
        self.history: list[dict[str, Any]] = []
        self.epoch_rewards: list[float] = []  # batch mean rewards of the epoch under way
        self.best: dict[str, Any] = {}
        self.best_weights: dict[str, torch.Tensor] = {}
        self.finished = False
        self.final: dict[str, Any] = {}  # a stochastic backbone's full evaluations, once

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             generator: torch.Generator | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Write the state (rank 0 only: every rank holds the same)."""
        save_state(self.path, {
            "identity": self.identity, **{key: getattr(self, key) for key in self.FIELDS},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "generator": generator.get_state() if generator is not None else None,
            "extra": extra or {},
        })

    def last_epoch(self) -> dict[str, float]:
        """The latest evaluation's numbers, for a progress line."""
        last = self.history[-1]
        numbers = {"valid ndcg@20": last["valid"]["ndcg@20"], "fixed reward": last["fixed_reward"]}
        if last.get("train_reward") is not None:
            numbers["train reward"] = last["train_reward"]
        return numbers

    def load(self) -> dict[str, Any] | None:
        payload = load_state(self.path, self.identity, "fine-tuning")
        if payload is not None:
            for key in self.FIELDS:
                setattr(self, key, payload[key])
        return payload


def _refit_epochs(spec: EnvSpec, data: Dataset, source: EpisodeSource, reward: Reward,
                  model: Backbone, reference: Backbone, config: ReFiTConfig, seed: int,
                  state: RunState, resumed: dict | None, device,
                  log: Callable[[str, float, int], None], end_of_epoch: Callable[[], bool],
                  progress: bool) -> None:
    dist = current()
    agent = ReFiTAgent(model, reference, config, dist)
    generator = torch.Generator(device)
    if resumed is not None:
        agent.optimizer.load_state_dict(resumed["optimizer"])
    cores: dict[int, DenoisingMDP] = {}
    per_epoch = -(-(config.users_per_epoch or data.n_train_rows) // config.users_per_batch)
    chunk = config.users_per_chunk or (-(-config.users_per_batch // dist.world_size)
                                       if dist.active else 0)
    bar = Progress(config.epochs * per_epoch, f"refit {spec.id}", unit="batch",
                   initial=(state.epoch - 1) * per_epoch + state.batch,
                   enabled=progress and dist.is_main)
    while state.epoch <= config.epochs:
        generator.manual_seed(seed_for(seed, state.epoch))
        batches = user_batches(data.n_train_rows, config.users_per_batch, generator,
                               config.users_per_epoch)
        if state.batch and resumed is not None:
            generator.set_state(resumed["generator"])
        resumed = None
        while state.batch < len(batches):
            users = batches[state.batch].to(device)
            started, communication = time.perf_counter(), communication_seconds()
            rollouts = []
            for index, chunk_users in _my_chunks(users, chunk, dist):
                if chunk:  # seeded by its place: the same draws on whichever rank rolls it out
                    generator.manual_seed(seed_for(seed, state.epoch, state.batch, index))
                rows = len(chunk_users) * config.group_size
                if rows not in cores:
                    cores[rows] = DenoisingMDP(source, reward, rows)
                rollouts.append(agent.rollout(cores[rows], chunk_users, generator))
            stats = agent.update(rollouts, len(users) * config.group_size)
            state.elapsed += time.perf_counter() - started
            state.communication += communication_seconds() - communication
            state.epoch_rewards.append(stats.reward)
            state.batch += 1
            step = (state.epoch - 1) * per_epoch + state.batch
            for key, value in dataclasses.asdict(stats).items():
                log(f"train/{key}", value, step)
            bar.advance()
            if state.batch % config.checkpoint_every == 0 and state.batch < len(batches):
                state.save(model, agent.optimizer, generator)
        state.batch = 0
        state.epoch += 1
        end_of_epoch()
        bar.epoch(f"epoch {state.epoch - 1}/{config.epochs}", **state.last_epoch())
        state.save(model, agent.optimizer, generator)
    bar.close()


def _my_chunks(users: Tensor, chunk: int, dist: Distributed) -> list[tuple[int, Tensor]]:
    """This rank's chunks of a batch of ``users``, with their places in the batch: all of it
    (``chunk`` 0, one process), or every ``world_size``-th chunk of ``chunk`` users."""
    if not chunk:
        return [(0, users)]
    return list(dist.share(list(enumerate(users.split(chunk)))))


def _continue_epochs(spec: EnvSpec, data: Dataset, model: Backbone, budget: float,
                     config: PretrainConfig, seed: int, state: RunState,
                     resumed: dict | None, device, end_of_epoch: Callable[[], bool],
                     progress: bool) -> None:
    """The baseline: more epochs of the backbone's own loss under ``config`` (the spec's
    [pretrain] protocol, as ``--set`` changed it), for ``budget`` training seconds."""
    dist = current()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    sampler = make_timestep_sampler(config, model.diffusion.steps)
    generator = torch.Generator().manual_seed(seed)
    noise = rank_generator(seed, dist)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
        sampler.load_state_dict(resumed["extra"]["sampler"])
        restore_random_states(resumed["extra"]["random"], dist, noise)
    bar = Progress(budget, f"continue {spec.id}", unit="s", initial=state.elapsed,
                   enabled=progress and dist.is_main)
    while state.elapsed < budget:
        started, communication = time.perf_counter(), communication_seconds()
        train_epoch(model, data, optimizer, sampler, config, generator, device, noise)
        # The slowest rank's time: every rank must agree on when the budget is spent.
        spent = dist.max_float(time.perf_counter() - started)
        state.communication += communication_seconds() - communication
        state.elapsed += spent
        state.epoch += 1
        bar.advance(spent)
        if (state.epoch - 1) % config.eval_every == 0 or state.elapsed >= budget:
            end_of_epoch()
            bar.epoch(f"epoch {state.epoch - 1}", **state.last_epoch())
            random = gather_random_states(dist, noise)  # a collective: every rank joins
            state.save(model, optimizer, generator, {"sampler": sampler.state_dict(),
                                                     "random": random})
    bar.close()


def _sb3_epochs(spec: EnvSpec, algo: str, sb3_model, driver: dict[str, Any], steps: int,
                n_episodes: int, state: RunState, out_dir: Path,
                end_of_epoch: Callable[[], bool], progress: bool) -> None:
    """SB3's own ``learn`` for one epoch at a time; the .zip is the resumable state."""
    episodes = episodes_per_epoch(driver, n_episodes)
    callback = EpisodeRewards()
    bar = Progress(driver["epochs"], f"{algo} {spec.id}", unit="epoch",
                   initial=state.epoch - 1, enabled=progress)
    while state.epoch <= driver["epochs"]:
        started = time.perf_counter()
        sb3_model.learn(episodes * steps, callback=callback, reset_num_timesteps=False)
        state.elapsed += time.perf_counter() - started
        state.epoch_rewards, callback.rewards = callback.rewards, []
        state.epoch += 1
        end_of_epoch()
        with atomic_path(out_dir / f"{algo}.zip") as tmp:
            sb3_model.save(tmp.with_suffix(".zip"))
            tmp.with_suffix(".zip").replace(tmp)
        state.save(sb3_model.policy.backbone, sb3_model.policy.optimizer)
        bar.advance()
        bar.epoch(f"epoch {state.epoch - 1}/{driver['epochs']}", **state.last_epoch())
    bar.close()


@torch.no_grad()
def fixed_episode_reward(model: Backbone, core: DenoisingMDP, episodes: Tensor,
                         seed: int = 0) -> float:
    """The optimiser's own check (DESIGN 5): the mean reward of the backbone's own chain (its
    mean chain, or its sampler under a fixed seed) on the fixed training ``episodes``, whose
    starts (holdout, x_K noise) are fixed by ``seed`` too."""
    generator = torch.Generator(core.device).manual_seed(seed)
    core.reset_rows(torch.arange(core.num_rows, device=core.device), episodes, generator)
    with eval_mode(model):
        x0 = model.generate(core.backbone_batch(), core.chain, generator, start=core.x)
    return core.final_reward(x0).mean().item()


def finetune(
    spec: EnvSpec, data: Dataset, checkpoint: str | Path, algo: str, out_dir: str | Path,
    *, seed: int = 1, device: str = "cpu", hyperparams: dict[str, Any] | None = None,
    env_kwargs: dict[str, Any] | None = None, budget_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` with ``algo``; returns (and writes) the metrics payload.

    ``hyperparams`` override agents/<algo>.toml (for ``continue``, the spec's [pretrain] keys in
    :data:`CONTINUE_SETTINGS`); ``env_kwargs`` override the spec's MDP settings (reward,
    reward_params, steps, holdout_fraction, holdout, ...). ``continue`` trains with the
    backbone's own loss until ``budget_seconds`` of wall time have passed.

    Every epoch logs validation metrics on the chain the agents tune (``steps``) and the reward
    of the backbone's own chain on a fixed set of training episodes (``fixed_reward``). A
    stochastic backbone's start and selected models are then evaluated over
    ``final_sampling_seeds`` sampling seeds both with its own full sampler (``valid``, ``test``)
    and with the tuned chain (``tuned_chain``).
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")
    if budget_seconds is not None and algo != "continue":
        raise ValueError(f"a wall-time budget (--budget-seconds) is continue's; {algo} runs the "
                         "epochs of its hyperparameters (--set epochs=N)")
    dist = current()
    if dist.active and algo in SB3_ALGOS:
        raise ValueError(f"{algo} runs in one process only (Stable-Baselines3 has no distributed "
                         "training); start it without torchrun, or use --algo refit or continue")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model, _ = load_backbone(checkpoint, data.n_items, device)
    reference = copy.deepcopy(model)
    overrides = {"device": device, **(env_kwargs or {})}
    if isinstance(data, SequenceData):  # the environment's E: the checkpoint's, frozen
        overrides.setdefault("checkpoint", str(checkpoint))
    settings = EnvSettings.resolve(spec, overrides)
    params = {**load_agent_hyperparams(algo, spec.id, device), **(hyperparams or {})}
    sb3_model = None
    if algo == "refit":
        config: Any = ReFiTConfig(**params)
        identity_config: dict[str, Any] = dataclasses.asdict(config)
    elif algo == "continue":
        if budget_seconds is None:
            raise ValueError("--algo continue needs a wall-time budget (--budget-seconds)")
        if unknown := sorted(set(params) - set(CONTINUE_SETTINGS)):
            raise ValueError(f"continue has no setting {unknown}: it trains with the spec's "
                             f"[pretrain] protocol, of which --set may change "
                             f"{list(CONTINUE_SETTINGS)}")
        config = dataclasses.replace(spec.pretrain, **params)
        identity_config = {"budget_seconds": budget_seconds, **params}
    else:
        driver, sb3_args = split_hyperparams(params)
        config = {"epochs": 1, "users_per_epoch": 0, "n_envs": 16, "group_size": 1, **driver}
        identity_config = {**config, **sb3_args}
    identity = {"env": spec.id, "algo": algo, "seed": seed, "checkpoint": sha256_of(
        Path(checkpoint)), "config": identity_config, "env_kwargs": dataclasses.asdict(settings)}
    state = RunState(out_dir / "state.pt", identity)
    resumed = state.load()
    if algo in SB3_ALGOS:
        venv = make_vec_env(spec, settings, data, config["n_envs"], config["group_size"],
                            seed)
        zip_path = out_dir / f"{algo}.zip"
        if resumed is not None and zip_path.is_file():
            sb3_model = SB3_ALGOS[algo].load(zip_path, env=venv, device=device)
        else:
            sb3_model = make_model(algo, venv, model, sb3_args, seed, device)
        # Metrics go to this run's TensorBoard; without a logger of its own, every `learn`
        # would leave an empty SB3-<date> folder in the system's temporary directory.
        sb3_model.set_logger(Logger(folder=None, output_formats=[]))
        model = sb3_model.policy.backbone  # the actor: evaluated and saved like any backbone
    elif resumed is not None:
        model.load_state_dict(resumed["model"])
    writer = SummaryWriter(str(out_dir / "tensorboard")) if dist.is_main else None
    embeddings = reference.item_table()
    embeddings = None if embeddings is None else embeddings.detach()
    source = settings.build_source(spec, data, embeddings)
    reward = settings.build_reward(data, embeddings)
    chain = source.chain
    check_episodes = torch.randperm(data.n_train_rows, generator=torch.Generator().manual_seed(
        0))[:FIXED_EPISODES].to(device)
    check_core = DenoisingMDP(source, reward, len(check_episodes))

    def log(key: str, value: float, step: int) -> None:
        if writer is not None:
            writer.add_scalar(key, value, step)

    def evaluate_and_select() -> bool:
        metrics = evaluate(model, data, spec.pretrain, device=device, chain=chain,
                           sampling_seeds=spec.pretrain.selection_sampling_seeds)
        epoch = state.epoch - 1
        rewards = state.epoch_rewards
        fixed = fixed_episode_reward(model, check_core, check_episodes)
        state.history.append({"epoch": epoch, "elapsed": state.elapsed, **metrics,
                              "train_reward": sum(rewards) / len(rewards) if rewards else None,
                              "fixed_reward": fixed})
        state.epoch_rewards = []
        log("check/fixed_episode_reward", fixed, epoch)
        for key, value in metrics["valid"].items():
            log(f"valid/{key}", value, epoch)
        if not state.best or metrics["valid"][SELECTION_METRIC] > state.best["valid"][
                SELECTION_METRIC]:
            state.best = {"epoch": epoch, **metrics}
            state.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        return False

    if not state.finished:
        if not state.history:  # the starting model is epoch 0 of the selection
            evaluate_and_select()
        if algo == "refit":
            _refit_epochs(spec, data, source, reward, model, reference, config, seed, state,
                          resumed, device, log, evaluate_and_select, progress)
        elif algo == "continue":
            _continue_epochs(spec, data, model, budget_seconds, config, seed, state, resumed,
                             device, evaluate_and_select, progress)
        else:
            _sb3_epochs(spec, algo, sb3_model, config, chain.steps, data.n_train_rows,
                        state, out_dir, evaluate_and_select, progress)
        state.finished = True
    if writer is not None:
        writer.close()
    model.load_state_dict(state.best_weights)
    best, start = state.best, state.history[0]
    if model.stochastic_inference and not state.final:
        state.final = {"best": _final_metrics(model, data, spec, chain, device)}
        state.final["start"] = (state.final["best"] if best["epoch"] == 0 else
                                _start_metrics(reference, Path(checkpoint), data, spec, chain,
                                               device))
        state.save(model)  # the finished run's evaluations survive an interruption
    if state.final:
        best, start = {**best, **state.final["best"]}, {**start, **state.final["start"]}
    if dist.is_main:
        save_backbone(out_dir / "finetuned.pt", model, spec.id, algo=algo, seed=seed,
                      epoch=best["epoch"], valid=best["valid"], test=best["test"])
    extra = ("tuned_chain", "valid_std", "test_std", "test_seen", "test_unseen")
    payload = {
        "env": spec.id, "algo": algo, "seed": seed, "checkpoint": str(checkpoint),
        "valid": best["valid"], "test": best["test"], "best_epoch": best["epoch"],
        **{k: best[k] for k in extra if k in best},
        "start": {k: start[k] for k in ("valid", "test", *extra) if k in start},
        "wall_time_s": state.elapsed, "communication_s": state.communication,
        "world_size": dist.world_size, "history": state.history,
        "config": identity["config"], "env_kwargs": identity["env_kwargs"],
    }
    if dist.is_main:
        write_json(out_dir / "metrics.json", payload)
    dist.barrier()  # the files exist for every rank once finetune returns
    return payload


def _start_metrics(model: Backbone, checkpoint: Path, data: Dataset, spec: EnvSpec,
                   chain: GaussianDiffusion, device: str) -> dict[str, Any]:
    """:func:`_final_metrics` of the pretrained start, cached under the cache directory by
    checkpoint, spec and chain: every algorithm and seed of a comparison shares its start, and
    the seeded evaluation gives the same numbers each time."""
    key = hashlib.sha256(json.dumps([sha256_of(checkpoint), spec.id, spec.dataset, chain.steps,
                                     dataclasses.asdict(spec.pretrain)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:20]
    path = default_cache_dir() / "evaluations" / f"{key}.json"
    dist = current()
    # Rank 0's answer for all: the evaluation below is shared, so every rank must take it.
    cached = dist.broadcast(json.loads(path.read_text()) if dist.is_main and path.is_file()
                            else None)
    if cached is not None:
        return cached
    metrics = _final_metrics(model, data, spec, chain, device)
    if dist.is_main:
        write_json(path, metrics)
    return metrics


def _final_metrics(model: Backbone, data: Dataset, spec: EnvSpec, chain: GaussianDiffusion,
                   device: str) -> dict[str, Any]:
    """A stochastic backbone over ``final_sampling_seeds``: its own full sampler (``valid``,
    ``test`` and their spreads and splits) and the tuned chain (``tuned_chain``)."""
    own = evaluate(model, data, spec.pretrain, device=device)
    tuned = evaluate(model, data, spec.pretrain, device=device, chain=chain)
    return {**own, "tuned_chain": {"steps": chain.steps, "valid": tuned["valid"],
                                   "test": tuned["test"]}}
