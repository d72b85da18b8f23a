"""The ``stop`` baseline of ``refit-gym bench``: the pretrained sequential backbone, no weights
changed, its reverse chain stopped at the network timestep chosen on validation.

Stopped at s, the chain's last step jumps from x_s to the denoiser's x_0 prediction there (the
environments' ``stop_step``). On a backbone whose chain decides, that prediction is nearer a
mean over the items still likely than one sampled x_0 is, so a sampler setting can give what
fine-tuning gains by damping the chain's noise (RESULTS.md, "Where the chain stops"). The stops
tried are agents/stop.toml's grid, fractions of the id's T (s = 0: the environment's own K-step
chain run to the end, on the 32-step ADRec ids the backbone's own); each is scored on validation
by the backbone's own protocol (``final_sampling_seeds`` sampling seeds), the best kept by the
one selection rule (:class:`~refit_gym.training.selection.Selector`: strictly higher NDCG@20
wins, so the smallest stop of equals), and test is scored at that stop only.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from refit_gym.data import Dataset
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.specs import EnvSpec, load_agent_hyperparams
from refit_gym.training.metrics import SELECTION_METRIC, eval_mode, evaluate
from refit_gym.training.selection import Selector

NAME = "stop"


def check_stoppable(spec: EnvSpec, env_kwargs: dict[str, Any] | None = None) -> None:
    """Refuse an id without a chain to stop, and ``env_kwargs`` that choose the stop."""
    if spec.backbone_type == "diffrec":
        raise ValueError(f"{NAME!r} stops a sequential backbone's chain; {spec.id} is a "
                         "collaborative-filtering id (choose a sequential id, or drop it)")
    if "stop_step" in (env_kwargs or {}):
        raise ValueError(f"{NAME!r} chooses stop_step itself; drop stop_step from --env-kwargs")


def stopped_chain(spec: EnvSpec, stop: int, *, steps: int | None = None,
                  env_kwargs: dict[str, Any] | None = None,
                  device: str = "cpu") -> GaussianDiffusion:
    """The id's chain stopped at network timestep ``stop``: ``steps`` steps, by default the
    id's K (as ``env_kwargs`` may set it), at most the T - s trained steps above the stop.
    Refuses what :func:`check_stoppable` refuses and a stop the chain cannot take."""
    check_stoppable(spec, env_kwargs)
    env_kwargs = {**(env_kwargs or {}), "device": device}
    if steps is None:
        whole = EnvSettings.resolve(spec, env_kwargs).chain_steps(spec)
        steps = max(1, min(whole, spec.diffusion.steps - stop))
    return EnvSettings.resolve(spec, {**env_kwargs, "stop_step": stop, "steps": steps}
                               ).chain(spec)


def stop_grid(spec: EnvSpec) -> list[int]:
    """The stops of agents/stop.toml's grid for the id: each fraction f of its T trained steps
    is s = round(f T), at most T - 1, ascending and distinct. Refuses a grid of anything but
    fractions in [0, 1], in increasing order."""
    params = load_agent_hyperparams(NAME, spec.id)
    fractions = params.get("fractions")
    if (set(params) != {"fractions"} or not isinstance(fractions, list) or not fractions
            or not all(isinstance(f, int | float) and not isinstance(f, bool) and 0 <= f <= 1
                       for f in fractions)
            or any(b <= a for a, b in itertools.pairwise(fractions))):
        raise ValueError(f"agents/stop.toml [{spec.id}]: one key, fractions, a list of "
                         f"increasing numbers in [0, 1] (of T), got {params}")
    steps = spec.diffusion.steps
    return sorted({min(round(f * steps), steps - 1) for f in fractions})


def stopped_chains(spec: EnvSpec, env_kwargs: dict[str, Any] | None = None,
                   device: str = "cpu") -> list[tuple[int, GaussianDiffusion]]:
    """Each stop of :func:`stop_grid` with its :func:`stopped_chain`; refuses, before any work,
    what either refuses."""
    check_stoppable(spec, env_kwargs)
    chains = []
    for stop in stop_grid(spec):
        try:
            chains.append((stop, stopped_chain(spec, stop, env_kwargs=env_kwargs,
                                               device=device)))
        except ValueError as err:  # the grid's stops are valid: the cause is env_kwargs
            raise ValueError(f"{NAME!r} at stop_step {stop} with --env-kwargs "
                             f"{env_kwargs}: {err}") from None
    return chains


def tune_stop(spec: EnvSpec, data: Dataset, checkpoint: Path, seed: int, *,
              env_kwargs: dict[str, Any] | None = None, device: str = "cpu",
              progress: bool = False) -> dict[str, Any]:
    """The backbone at ``checkpoint`` scored at every stop of the grid on validation, and at the
    best one on test (never used to choose). Returns a bench cell: the chosen ``params``, the
    ``grid``'s validation scores, the metrics (with the sequential spreads and target splits),
    and ``wall_time_s``, the whole scan's. ``seed`` labels the cell (the evaluation's sampling
    seeds are the spec's, as for every model); ``progress``: a line per stop."""
    chains = stopped_chains(spec, env_kwargs, device)
    started = time.perf_counter()
    model, _ = spec.load_backbone(checkpoint, data.n_items, device)
    selector = Selector(SELECTION_METRIC, keep_weights=False)
    with eval_mode(model):
        for index, (stop, chain) in enumerate(chains):
            selector.offer(index, evaluate(model, data, spec.pretrain, device=device,
                                           chain=chain, splits=("valid",)))
            if progress:
                print(f"{NAME} {spec.id} seed {seed}: s = {stop} ({chain.steps} of T = "
                      f"{spec.diffusion.steps} steps), valid {SELECTION_METRIC} "
                      f"{selector.curve[-1]['score']:.4f}", flush=True)
        best = selector.best_epoch
        if best is None:
            raise ValueError(f"{spec.id}: every stop of agents/stop.toml scored NaN on "
                             f"validation; the backbone at {checkpoint} does not rank")
        test = evaluate(model, data, spec.pretrain, device=device, chain=chains[best][1],
                        splits=("test",))
    stop, chain = chains[best]
    return {"env": spec.id, "algo": NAME, "seed": seed, "checkpoint": str(checkpoint),
            "params": {"stop_step": stop, "steps": chain.steps},
            "grid": [{"params": {"stop_step": chains[p["epoch"]][0]}, "valid": p["score"]}
                     for p in selector.curve],
            **selector.best_metrics, **test, "wall_time_s": time.perf_counter() - started,
            "history": []}
