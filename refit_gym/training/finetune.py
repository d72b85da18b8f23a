"""Fine-tuning a pretrained backbone: the driver shared by every algorithm.

It evaluates the starting model (it is a candidate: selection may keep it), runs the
algorithm, evaluates on validation after each epoch, keeps the best by validation NDCG@20, and
writes ``finetuned.pt`` and ``metrics.json``. ``state.pt`` in the output folder holds everything
needed to resume (weights, optimiser, random state, position in the epoch); rerunning the same
command after an interruption continues from it. Test metrics are recorded, never used.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from refit_gym.backbones import Backbone, CheckpointError, load_backbone, save_backbone
from refit_gym.data import InteractionData, atomic_path, sha256_of, write_json
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.rl.refit_agent import ReFiTAgent, ReFiTConfig, epoch_seed, user_batches
from refit_gym.rl.sb3_agents import (
    SB3_ALGOS,
    EpisodeRewards,
    episodes_per_epoch,
    make_model,
    make_vec_env,
    split_hyperparams,
)
from refit_gym.specs import EnvSpec, load_agent_hyperparams
from refit_gym.training.metrics import evaluate
from refit_gym.training.pretrain import make_timestep_sampler, train_epoch

SELECTION_METRIC = "ndcg@20"
ALGOS = ("refit", "continue", *SB3_ALGOS)


class RunState:
    """The resumable state of a fine-tuning run, saved atomically to ``out_dir/state.pt``."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.epoch, self.batch, self.elapsed = 1, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.epoch_rewards: list[float] = []  # batch mean rewards of the epoch under way
        self.best: dict[str, Any] = {}
        self.best_weights: dict[str, torch.Tensor] = {}
        self.finished = False

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, extra: dict[str, Any] | None = None) -> None:
        payload = {
            "identity": self.identity, "epoch": self.epoch, "batch": self.batch,
            "elapsed": self.elapsed, "history": self.history, "best": self.best,
            "epoch_rewards": self.epoch_rewards,
            "best_weights": self.best_weights, "finished": self.finished,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "extra": extra or {},
        }
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"resume state {self.path} is corrupt ({err}); delete it to "
                                  "start the run over") from err
        if payload["identity"] != self.identity:
            raise CheckpointError(
                f"{self.path.parent} holds a different run ({payload['identity']}); use another "
                "--out folder, or delete it to start over")
        for key in ("epoch", "batch", "elapsed", "history", "epoch_rewards", "best",
                    "best_weights", "finished"):
            setattr(self, key, payload[key])
        return payload


def _refit_epochs(spec: EnvSpec, data: InteractionData, settings: EnvSettings, model: Backbone,
                  reference: Backbone, config: ReFiTConfig, seed: int, state: RunState,
                  resumed: dict | None, device, log: Callable[[str, float, int], None],
                  end_of_epoch: Callable[[], bool], progress: bool) -> None:
    agent = ReFiTAgent(model, reference, config)
    reward = settings.build_reward(data.train)
    generator = torch.Generator(device)
    if resumed is not None:
        agent.optimizer.load_state_dict(resumed["optimizer"])
    cores: dict[int, DenoisingMDP] = {}
    per_epoch = -(-(config.users_per_epoch or data.n_users) // config.users_per_batch)
    bar = tqdm(total=config.epochs * per_epoch, initial=(state.epoch - 1) * per_epoch
               + state.batch, desc=f"refit {spec.id}", disable=not progress)
    while state.epoch <= config.epochs:
        generator.manual_seed(epoch_seed(seed, state.epoch))
        batches = user_batches(data.n_users, config.users_per_batch, generator,
                               config.users_per_epoch)
        if state.batch and resumed is not None:
            generator.set_state(resumed["generator"])
        resumed = None
        while state.batch < len(batches):
            users = batches[state.batch].to(device)
            rows = len(users) * config.group_size
            if rows not in cores:
                cores[rows] = settings.build_core(data, model.diffusion, reward, rows)
            started = time.perf_counter()
            stats = agent.train_batch(cores[rows], users, generator)
            state.elapsed += time.perf_counter() - started
            state.epoch_rewards.append(stats.reward)
            state.batch += 1
            step = (state.epoch - 1) * per_epoch + state.batch
            for key, value in dataclasses.asdict(stats).items():
                log(f"train/{key}", value, step)
            bar.update(1)
            bar.set_postfix(reward=f"{stats.reward:.4f}")
            if state.batch % config.checkpoint_every == 0 and state.batch < len(batches):
                state.save(model, agent.optimizer, generator)
        state.batch = 0
        state.epoch += 1
        end_of_epoch()
        state.save(model, agent.optimizer, generator)
    bar.close()


def _continue_epochs(spec: EnvSpec, data: InteractionData, model: Backbone, budget: float,
                     seed: int, state: RunState, resumed: dict | None, device,
                     end_of_epoch: Callable[[], bool], progress: bool) -> None:
    """The baseline: more epochs of the backbone's own loss, for ``budget`` training seconds."""
    config = spec.pretrain
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    sampler = make_timestep_sampler(config, model.diffusion.steps)
    generator = torch.Generator().manual_seed(seed)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
        sampler.load_state_dict(resumed["extra"]["sampler"])
    bar = tqdm(total=round(budget), initial=round(state.elapsed), unit="s",
               desc=f"continue {spec.id}", disable=not progress)
    while state.elapsed < budget:
        started = time.perf_counter()
        train_epoch(model, data, optimizer, sampler, config, generator, device)
        spent = time.perf_counter() - started
        state.elapsed += spent
        state.epoch += 1
        bar.update(round(spent))
        if (state.epoch - 1) % config.eval_every == 0 or state.elapsed >= budget:
            end_of_epoch()
            state.save(model, optimizer, generator, {"sampler": sampler.state_dict()})
    bar.close()


def _sb3_epochs(spec: EnvSpec, algo: str, sb3_model, driver: dict[str, Any], steps: int,
                n_users: int, state: RunState, out_dir: Path,
                end_of_epoch: Callable[[], bool], progress: bool) -> None:
    """SB3's own ``learn`` for one epoch at a time; the .zip is the resumable state."""
    episodes = episodes_per_epoch(driver, n_users)
    callback = EpisodeRewards()
    bar = tqdm(total=driver["epochs"], initial=state.epoch - 1, desc=f"{algo} {spec.id}",
               disable=not progress)
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
        state.save(sb3_model.policy.backbone, sb3_model.policy.optimizer, torch.Generator())
        bar.update(1)
    bar.close()


def finetune(
    spec: EnvSpec, data: InteractionData, checkpoint: str | Path, algo: str, out_dir: str | Path,
    *, seed: int = 1, device: str = "cpu", hyperparams: dict[str, Any] | None = None,
    env_kwargs: dict[str, Any] | None = None, budget_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` with ``algo``; returns (and writes) the metrics payload.

    ``hyperparams`` override agents/<algo>.toml; ``env_kwargs`` override the spec's MDP
    settings (reward, reward_params, holdout_fraction, holdout, ...). ``continue`` trains with the
    backbone's own loss until ``budget_seconds`` of wall time have passed.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model, _ = load_backbone(checkpoint, data.n_items, device)
    reference = copy.deepcopy(model)
    settings = EnvSettings.resolve(spec, {"device": device, **(env_kwargs or {})})
    params = {**load_agent_hyperparams(algo, spec.id), **(hyperparams or {})}
    sb3_model = None
    if algo == "refit":
        config: Any = ReFiTConfig(**params)
        identity_config: dict[str, Any] = dataclasses.asdict(config)
    elif algo == "continue":
        if budget_seconds is None:
            raise ValueError("--algo continue needs a wall-time budget (--budget-seconds)")
        config = identity_config = {"budget_seconds": budget_seconds}
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
        model = sb3_model.policy.backbone  # the actor: evaluated and saved like any backbone
    elif resumed is not None:
        model.load_state_dict(resumed["model"])
    writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(key: str, value: float, step: int) -> None:
        writer.add_scalar(key, value, step)

    def evaluate_and_select() -> bool:
        metrics = evaluate(model, data, spec.pretrain, device=device)
        epoch = state.epoch - 1
        rewards = state.epoch_rewards
        state.history.append({"epoch": epoch, "elapsed": state.elapsed, **metrics,
                              "train_reward": sum(rewards) / len(rewards) if rewards else None})
        state.epoch_rewards = []
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
            _refit_epochs(spec, data, settings, model, reference, config, seed, state, resumed,
                          device, log, evaluate_and_select, progress)
        elif algo == "continue":
            _continue_epochs(spec, data, model, config["budget_seconds"], seed, state, resumed,
                             device, evaluate_and_select, progress)
        else:
            _sb3_epochs(spec, algo, sb3_model, config, model.diffusion.steps, data.n_users,
                        state, out_dir, evaluate_and_select, progress)
        state.finished = True
    writer.close()
    model.load_state_dict(state.best_weights)
    start = state.history[0]
    save_backbone(out_dir / "finetuned.pt", model, spec.id, algo=algo, seed=seed,
                  epoch=state.best["epoch"], valid=state.best["valid"], test=state.best["test"])
    payload = {
        "env": spec.id, "algo": algo, "seed": seed, "checkpoint": str(checkpoint),
        "valid": state.best["valid"], "test": state.best["test"],
        "best_epoch": state.best["epoch"], "start": {"valid": start["valid"],
                                                     "test": start["test"]},
        "wall_time_s": state.elapsed, "history": state.history,
        "config": identity["config"], "env_kwargs": identity["env_kwargs"],
    }
    write_json(out_dir / "metrics.json", payload)
    return payload
