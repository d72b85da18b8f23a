"""Fine-tuning a pretrained backbone: the one driver every algorithm runs under.

An algorithm is a plug-in (:class:`~refit_gym.rl.algorithm.Algorithm`: ReFiT, ``continue``,
PPO / A2C / TRPO by name from :mod:`refit_gym.training.algorithms`, or an object of your own,
docs/own_agent.md); it trains one epoch at a time. The driver evaluates the starting model (it
is a candidate: selection may keep it), runs the algorithm's epochs, evaluates on validation
after each, keeps the best by validation NDCG@20, and writes ``finetuned.pt`` and
``metrics.json``. ``state.pt`` in the output folder holds everything needed to resume (weights,
the algorithm's state, the selection so far); rerunning the same command after an interruption
continues from it. Test metrics are recorded, never used.

Under ``torchrun`` the ReFiT agent and ``continue`` split every batch over the ranks and sum their
gradients, evaluation is sharded, and rank 0 alone writes (:mod:`refit_gym.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from refit_gym.backbones import Backbone, save_backbone
from refit_gym.data import (
    Dataset,
    SequenceData,
    default_cache_dir,
    sha256_of,
    write_json,
)
from refit_gym.data.progress import Progress, announce
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.distributed import communication_seconds, current
from refit_gym.mdp.core import DenoisingMDP
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.rl.algorithm import Algorithm, EpochContext, EpochStats, missing_members
from refit_gym.specs import EnvSpec, load_agent_hyperparams
from refit_gym.training.algorithms import ALGOS, CONTINUE_SETTINGS, Setup, build
from refit_gym.training.metrics import SELECTION_METRIC, eval_mode, evaluate
from refit_gym.training.resume import held_out, load_state, save_state
from refit_gym.training.selection import Selector

__all__ = ["ALGOS", "CONTINUE_SETTINGS", "FIXED_EPISODES", "RunState", "evaluate_tuned_chain",
           "finetune", "fixed_episode_reward"]

FIXED_EPISODES = 256  # training episodes of the optimiser's own check
# The layout of state.pt: a state of another layout belongs to another version of the driver.
STATE_FORMAT = 3
# Part of the start-model metrics cache's key: raise it when what fills the cache changes (the
# evaluation's rules or output), so no stale number is paired with a fresh one.
START_METRICS_FORMAT = 2


class RunState:
    """The resumable state of a fine-tuning run, saved atomically to ``out_dir/state.pt``."""

    # What a resumed run takes back (beside the policy's weights).
    FIELDS = ("epoch", "elapsed", "communication", "history", "epoch_rewards", "selection",
              "finished", "final", "algorithm")

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.epoch, self.elapsed = 1, 0.0  # the next epoch; training seconds so far
        self.communication = 0.0  # of elapsed, seconds in collectives (torchrun)
        self.history: list[dict[str, Any]] = []
        self.epoch_rewards: list[float] = []  # batch mean rewards since the last evaluation
        self.selection: dict[str, Any] = {}  # the Selector's state (training.selection)
        self.finished = False
        self.final: dict[str, Any] = {}  # a stochastic backbone's full evaluations, once
        self.algorithm: dict[str, Any] = {}  # the algorithm's state_dict at the last save

    def save(self, model: torch.nn.Module) -> None:
        """Write the state (rank 0 only: every rank holds the same)."""
        save_state(self.path, {"identity": self.identity,
                               **{key: getattr(self, key) for key in self.FIELDS},
                               "model": model.state_dict()})

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


class _Clock:
    """Training seconds and seconds in collectives, banked into ``state`` (checkpoints and
    evaluations inside an epoch do not count)."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.start()

    def start(self) -> None:
        self.started, self.communication = time.perf_counter(), communication_seconds()

    def bank(self, slowest: bool = False) -> float:
        """Add the seconds since :meth:`start` to the state; ``slowest``: the slowest rank's
        (a collective: every rank must agree on when a budget is spent)."""
        spent = time.perf_counter() - self.started
        if slowest:
            spent = current().max_float(spent)
        self.state.elapsed += spent
        self.state.communication += communication_seconds() - self.communication
        return spent


@torch.no_grad()
def fixed_episode_reward(model: Backbone, core: DenoisingMDP, episodes: Tensor,
                         seed: int = 0) -> float:
    """The optimiser's own check: the mean reward of the backbone's own chain (its
    mean chain, or its sampler under a fixed seed) on the fixed training ``episodes``, whose
    starts (holdout, x_K noise) are fixed by ``seed`` too."""
    generator = torch.Generator(core.device).manual_seed(seed)
    core.reset_rows(torch.arange(core.num_rows, device=core.device), episodes, generator)
    with eval_mode(model):
        x0 = model.generate(core.backbone_batch(), core.chain, generator, start=core.x)
    return core.final_reward(x0).mean().item()


def finetune(
    spec: EnvSpec, data: Dataset, checkpoint: str | Path, algo: str | Algorithm,
    out_dir: str | Path, *, seed: int = 1, device: str = "cpu",
    hyperparams: dict[str, Any] | None = None, env_kwargs: dict[str, Any] | None = None,
    budget_seconds: float | None = None, progress: bool = True, test_curve: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` with ``algo``; returns (and writes) the metrics payload.

    ``algo``: a built-in algorithm's name (:data:`ALGOS`), or an object implementing
    :class:`~refit_gym.rl.algorithm.Algorithm` whose ``policy`` starts as ``checkpoint``
    (docs/own_agent.md). ``hyperparams`` override agents/<algo>.toml (for ``continue``, the
    spec's [pretrain] keys in :data:`CONTINUE_SETTINGS`); ``env_kwargs`` override the spec's
    MDP settings (reward, reward_params, steps, holdout_fraction, holdout, ...). ``continue``
    trains with the backbone's own loss until ``budget_seconds`` of wall time have passed.

    Every epoch logs validation metrics on the chain the agents tune (``steps``) and the reward
    of the backbone's own chain on a fixed set of training episodes (``fixed_reward``). Test is
    evaluated for the start and the selected model only (``test_curve``: on every selection
    pass too, for a learning-curve report). A stochastic backbone's start and selected models
    are evaluated over ``final_sampling_seeds`` sampling seeds both with its own full sampler
    (``valid``, ``test``) and with the tuned chain (``tuned_chain``).
    """
    named = isinstance(algo, str)
    if named and algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")
    if not named:
        _check_own_algorithm(algo, hyperparams, budget_seconds)
    dist = current()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model, _ = spec.load_backbone(checkpoint, data.n_items, device)
    reference = copy.deepcopy(model)
    overrides = {"device": device, **(env_kwargs or {})}
    if isinstance(data, SequenceData):  # the environment's E: the checkpoint's, frozen
        overrides.setdefault("checkpoint", str(checkpoint))
    settings = EnvSettings.resolve(spec, overrides)
    embeddings = reference.item_table()
    embeddings = None if embeddings is None else embeddings.detach()
    source = settings.build_source(spec, data, embeddings)
    reward = settings.build_reward(data, embeddings)
    chain = source.chain
    if named:
        params = {**load_agent_hyperparams(algo, spec.id, device), **(hyperparams or {})}
        algo = build(algo, Setup(spec, data, settings, source, reward, model, reference, params,
                                 seed, device, out_dir, budget_seconds))
    identity = {"env": spec.id, "algo": algo.name, "seed": seed, "checkpoint": sha256_of(
        Path(checkpoint)), "config": algo.config, "env_kwargs": settings.identity(),
        "state_format": STATE_FORMAT, **held_out(data)}
    state = RunState(out_dir / "state.pt", identity)
    resumed = state.load()
    if resumed is not None:
        algo.load_state_dict(state.algorithm)  # may rebuild the policy (SB3 loads its .zip)
        if progress and dist.is_main and not state.finished:
            announce(f"{algo.name} {spec.id} seed {seed}: resuming at epoch {state.epoch} "
                     f"from {state.path} (a new --out starts afresh)")
    model = algo.policy
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    writer = SummaryWriter(str(out_dir / "tensorboard")) if dist.is_main else None
    check_episodes = torch.randperm(source.n_episodes, generator=torch.Generator().manual_seed(
        0))[:FIXED_EPISODES].to(device)
    check_core = DenoisingMDP(source, reward, len(check_episodes))
    # By validation NDCG@20, strictly better wins (the earliest of equals: the start first).
    selector = (Selector.from_state(state.selection) if state.selection
                else Selector(SELECTION_METRIC))

    def log(key: str, value: float, step: int) -> None:
        if writer is not None:
            writer.add_scalar(key, value, step)

    def evaluate_and_select() -> None:
        epoch = state.epoch - 1
        # A deterministic start's test comes from its pass; a stochastic one's from the final
        # evaluation over several sampling seeds.
        with_test = test_curve or (epoch == 0 and not model.stochastic_inference)
        metrics = _selection_pass(model, data, spec, chain, device, with_test)
        recorded = {k: v for k, v in metrics.items() if with_test or not k.startswith("test")}
        rewards = state.epoch_rewards
        fixed = fixed_episode_reward(model, check_core, check_episodes)
        state.history.append({"epoch": epoch, "elapsed": state.elapsed, **recorded,
                              "train_reward": sum(rewards) / len(rewards) if rewards else None,
                              "fixed_reward": fixed})
        state.epoch_rewards = []
        # Every curve the driver logs is by epoch (0: the start), training and validation alike.
        if rewards:
            log("train/reward", state.history[-1]["train_reward"], epoch)
        log("check/fixed_episode_reward", fixed, epoch)
        for key, value in metrics["valid"].items():
            log(f"valid/{key}", value, epoch)
        selector.offer(epoch, metrics, model.state_dict())
        state.selection = selector.state_dict()

    def save() -> None:
        state.algorithm = algo.state_dict()  # on every rank: it may gather the ranks' states
        state.save(model)

    already_finished = state.finished  # a rerun of a finished run reports it, trains nothing
    if not state.finished:
        if not state.history:  # the starting model is epoch 0 of the selection
            evaluate_and_select()
        extent = algo.progress(state.epoch - 1, state.elapsed)
        bar = Progress(extent.total, f"{algo.name} {spec.id}", unit=extent.unit,
                       initial=extent.done, enabled=progress and dist.is_main)
        clock = _Clock(state)

        def save_inside_epoch() -> None:
            clock.bank()
            save()
            clock.start()

        while extent.done < extent.total:
            clock.start()
            stats = algo.run_epoch(EpochContext(state.epoch, log, save_inside_epoch, bar.advance))
            if not isinstance(stats, EpochStats):
                raise TypeError(f"{algo.name}.run_epoch must return an EpochStats "
                                f"(refit_gym.rl.algorithm), got {type(stats).__name__}")
            clock.bank(slowest=True)
            state.epoch += 1
            state.epoch_rewards.extend(stats.rewards)
            extent = algo.progress(state.epoch - 1, state.elapsed)
            bar.advance(extent.done - bar.done)
            if stats.evaluate or extent.done >= extent.total:
                evaluate_and_select()
                bar.epoch(f"epoch {state.epoch - 1}", **state.last_epoch())
                save()
        bar.close()
        state.finished = True
        save()  # a rerun of this run then knows it finished
    if writer is not None:
        writer.close()
    model.load_state_dict(selector.best_weights)
    best, start = {"epoch": selector.best_epoch, **selector.best_metrics}, state.history[0]
    if model.stochastic_inference and not state.final:
        state.final = {"best": _final_metrics(model, data, spec, chain, device)}
        state.final["start"] = (state.final["best"] if best["epoch"] == 0 else
                                _start_metrics(reference, Path(checkpoint), data, spec, chain,
                                               device))
        state.save(model)  # the finished run's evaluations survive an interruption
    elif "test" not in best and not state.final:  # the selected model's test, once
        state.final = {"best": evaluate(model, data, spec.pretrain, device=device, chain=chain),
                       "start": {}}
        state.save(model)
    if state.final:
        best, start = {**best, **state.final["best"]}, {**start, **state.final["start"]}
    if dist.is_main:
        save_backbone(out_dir / "finetuned.pt", model, spec.id, algo=algo.name, seed=seed,
                      epoch=best["epoch"], valid=best["valid"], test=best["test"])
    extra = ("tuned_chain", "valid_std", "test_std", "test_seen", "test_unseen")
    payload = {
        "env": spec.id, "algo": algo.name, "seed": seed, "checkpoint": str(checkpoint),
        "valid": best["valid"], "test": best["test"], "best_epoch": best["epoch"],
        **{k: best[k] for k in extra if k in best},
        "start": {k: start[k] for k in ("valid", "test", *extra) if k in start},
        "wall_time_s": state.elapsed, "communication_s": state.communication,
        "already_finished": already_finished,
        "world_size": dist.world_size, "history": state.history,
        "selection": {k: v for k, v in selector.summary().items() if k != "curve"},
        "config": identity["config"], "env_kwargs": identity["env_kwargs"],
    }
    if dist.is_main:
        write_json(out_dir / "metrics.json", payload)
    dist.barrier()  # the files exist for every rank once finetune returns
    return payload


def evaluate_tuned_chain(model: Backbone, spec: EnvSpec, data: Dataset, *,
                         env_kwargs: dict[str, Any] | None = None, device: str = "cpu",
                         sampling_seeds: int | None = None) -> dict[str, dict[str, float]]:
    """``model``'s validation and test metrics on the chain the agents tune: the id's
    ``steps`` (as ``env_kwargs`` may change them), through the backbone's own evaluation
    protocol (:func:`~refit_gym.training.metrics.evaluate`; a stochastic backbone over
    ``sampling_seeds`` seeds, default the spec's ``final_sampling_seeds``). It is what the
    driver's selection passes measure, for a model tuned anywhere.

    Returns ``{"valid": {"ndcg@20": ...}, "test": {...}}`` (sequential ids add spreads and the
    seen / unseen split)."""
    settings = EnvSettings.resolve(spec, {"device": device, **(env_kwargs or {})})
    return evaluate(model, data, spec.pretrain, device=device, chain=settings.chain(spec),
                    sampling_seeds=sampling_seeds)


def _selection_pass(model: Backbone, data: Dataset, spec: EnvSpec, chain: GaussianDiffusion,
                    device: str, with_test: bool) -> dict[str, Any]:
    """A selection pass on the tuned chain over ``selection_sampling_seeds``: validation, and
    test ``with_test``. A CF pass scores test from the same chain as validation (no second
    chain), so its numbers come along; a sequential pass without test skips the test rows."""
    config = spec.pretrain
    return evaluate(model, data, config, device=device, chain=chain,
                    sampling_seeds=config.selection_sampling_seeds,
                    splits=("valid", "test") if with_test else ("valid",))


def _start_metrics(model: Backbone, checkpoint: Path, data: Dataset, spec: EnvSpec,
                   chain: GaussianDiffusion, device: str) -> dict[str, Any]:
    """:func:`_final_metrics` of the pretrained start, cached under the cache directory by
    checkpoint, spec and chain: every algorithm and seed of a comparison shares its start, and
    the seeded evaluation gives the same numbers each time."""
    # A stopping chain adds its stop step; the key of one that runs to the end is as it was.
    length = [chain.steps, chain.stop_step] if chain.stop_step else chain.steps
    key = hashlib.sha256(json.dumps([START_METRICS_FORMAT, sha256_of(checkpoint), spec.id,
                                     spec.dataset, length,
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
    # A chain that is neither respaced nor stopped, on the backbone's schedule, is its own.
    own_chain = chain.timesteps is None and chain.config == model.diffusion.config
    tuned = own if own_chain else evaluate(model, data, spec.pretrain, device=device, chain=chain)
    stop = {"stop_step": chain.stop_step} if chain.stop_step else {}
    return {**own, "tuned_chain": {"steps": chain.steps, **stop, "valid": tuned["valid"],
                                   "test": tuned["test"]}}


def _check_own_algorithm(algo: Any, hyperparams: dict[str, Any] | None,
                         budget_seconds: float | None) -> None:
    """Refuse, before any work, an own algorithm object that breaks the driver's rules: every
    :class:`Algorithm` member, a ``config`` that enters the run's identity and metrics.json as
    JSON, and no settings meant for a built-in algorithm."""
    if missing := missing_members(algo):
        raise TypeError(f"algo must be one of {ALGOS} or an object with the members of "
                        f"refit_gym.rl.algorithm.Algorithm; {type(algo).__name__} lacks "
                        f"{missing} (docs/own_agent.md)")
    try:
        json.dumps(algo.config)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{algo.name}.config must be JSON-able (numbers, strings, bools, None, "
                        f"lists and dicts of them): {err}") from err
    if hyperparams or budget_seconds is not None:
        raise ValueError(f"hyperparams and budget_seconds configure a built-in algorithm; "
                         f"{algo.name} holds its own settings")
