"""Pretraining a backbone with its own protocol (DiffRec's main.py or DreamRec's, batched).

Per epoch: shuffle the training rows (users or (history, next item) rows), and for each batch
sample t (DiffRec: by the running loss once every step has 10 recorded losses; DreamRec:
uniformly), compute the backbone's own loss, divide by the sampling probability. Every
``eval_every`` epochs (and at the last epoch) evaluate on validation; the project's one
:class:`~refit_gym.training.selection.Selector` keeps the checkpoint with the best validation
``selection_metric`` and stops the run ``patience`` epochs after the best one (that epoch is
not run; see :func:`pretrain_selector`). A stochastic backbone
is selected on a cheaper respaced chain and its selected checkpoint is then evaluated with its
own full sampler over several sampling seeds. A backbone trained in stages (ADRec) says which
rows an epoch passes over, sets its stage before each epoch, and is evaluated and selected from
its last stage on. ``pretrain_state.pt`` holds everything needed to
resume after each epoch: rerunning the same command after an interruption or a kill continues.

Under ``torchrun`` every rank shuffles alike, trains on its share of each batch with its own
noise (seeded by rank: a run is reproducible for a given world size) and the gradients are
summed; rank 0 writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from refit_gym.backbones import Backbone, load_backbone, read_checkpoint, save_backbone
from refit_gym.data import Dataset
from refit_gym.data.progress import Progress, announce
from refit_gym.distributed import Distributed, current
from refit_gym.specs import EnvSpec, PretrainConfig
from refit_gym.training.metrics import evaluate, selection_chain
from refit_gym.training.resume import (
    gather_random_states,
    held_out,
    load_state,
    restore_random_states,
    save_state,
    seed_for,
)
from refit_gym.training.selection import Selector, weights_digest


class LossAwareTimestepSampler:
    """DiffRec's importance sampling of t: p(t) ~ sqrt(E[loss_t^2]) over its last 10 losses.

    Until every step has ``history`` losses recorded, t is uniform (and p = 1).
    """

    uses_losses = True  # record() needs every row's loss (under torchrun: every rank's)

    def __init__(self, steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.steps, self.history, self.uniform_prob = steps, history, uniform_prob
        self.losses = torch.zeros(steps, history, dtype=torch.float64)
        self.counts = torch.zeros(steps, dtype=torch.long)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Timesteps (n,) and their probabilities scaled by T (n,), so uniform gives ones."""
        if not bool((self.counts == self.history).all()):
            return torch.randint(0, self.steps, (n,), generator=generator), torch.ones(n)
        weights = self.losses.pow(2).mean(-1).sqrt()
        probs = weights / weights.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.steps
        t = torch.multinomial(probs, n, replacement=True, generator=generator)
        return t, (probs[t] * self.steps).float()

    def record(self, t: Tensor, losses: Tensor) -> None:
        """Append each row's loss to its step's window, in batch order, keeping the last 10."""
        t, losses = t.cpu(), losses.detach().double().cpu()
        for step in t.unique().tolist():  # at most T steps, never users
            window = torch.cat([self.losses[step, : self.counts[step]], losses[t == step]])
            window = window[-self.history :]
            self.losses[step, : len(window)] = window
            self.counts[step] = len(window)

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


class UniformTimestepSampler:
    """t uniform over [0, T) (DreamRec's training), with the loss-aware sampler's interface."""

    uses_losses = False

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randint(0, self.steps, (n,), generator=generator), torch.ones(n)

    def record(self, t: Tensor, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


TimestepSampler = LossAwareTimestepSampler | UniformTimestepSampler


def make_timestep_sampler(config: PretrainConfig, steps: int) -> TimestepSampler:
    return (LossAwareTimestepSampler(steps) if config.importance_sampling
            else UniformTimestepSampler(steps))


def train_epoch(
    backbone: Backbone,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    sampler: TimestepSampler,
    config: PretrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    noise: torch.Generator | None = None,
) -> float:
    """One pass over all training rows in shuffled batches with the backbone's own loss;
    returns the mean batch loss. The order comes from ``generator`` (CPU), t and the noise
    from ``noise`` (default: ``generator``). Under torchrun each rank trains on its share of
    every batch and the gradients of the batch's mean loss are summed over ranks."""
    backbone.train()
    dist = current()
    noise = generator if noise is None else noise
    params = [p for p in backbone.parameters() if p.requires_grad]
    subset = backbone.training_rows(data)
    n_rows = data.n_train_rows if subset is None else len(subset)
    order = torch.randperm(n_rows, generator=generator).numpy()
    if subset is not None:
        order = subset[order]
    total, n_batches = 0.0, 0
    for start in range(0, n_rows, config.batch_size):
        rows = order[start : start + config.batch_size]
        mine = np.asarray(dist.share(rows))
        batch = data.train_batch(mine, device)
        t, pt = sampler.sample(len(mine), noise)
        t = t.to(device)
        losses = backbone.training_loss(batch, t, noise)
        if sampler.uses_losses:
            sampler.record(dist.gather_rows(t), dist.gather_rows(losses.detach()))
        loss = (losses / pt.to(device)).sum() / len(rows)  # this rank's share of the mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.sum_gradients(params)
        optimizer.step()
        total += loss.item()
        n_batches += 1
    return dist.sum_floats([total])[0] / max(n_batches, 1)


def rank_generator(seed: int, dist: Distributed) -> torch.Generator | None:
    """This rank's generator of t and noise under torchrun (None in one process: the
    shuffling generator draws them too, as it always has)."""
    return torch.Generator().manual_seed(seed_for(seed, dist.rank)) if dist.active else None


def pretrain_selector(config: PretrainConfig, start: int) -> Selector:
    """The selection of a pretraining run whose first selectable epoch is ``start``.

    A spec's ``patience`` P stops the run at epoch best + P (or start - 1 + P while nothing was
    selected) without running it, so P - 1 epochs run past the best; the Selector's patience
    counts the epochs that run (its one definition, in its module), hence P - 1. The report
    records P as ``spec_patience`` beside the Selector's ``patience_epochs``. The checkpoint
    file keeps the best weights, so the Selector keeps only their digest.
    """
    if config.patience < 2:
        raise ValueError(f"pretraining patience must be >= 2 epochs (the run stops at the "
                         f"patience-th epoch after the best without running it), got "
                         f"{config.patience}")
    return Selector(config.selection_metric, patience=config.patience - 1, start=start,
                    keep_weights=False)


def _resumed_selector(state: dict, config: PretrainConfig, start: int,
                      checkpoint: Path) -> Selector:
    """The Selector of a resume state. A state written before pretraining used the Selector
    holds the best epoch (0: none), score and metrics as ``best`` and the curve in
    ``history``; runs of that code may still be resumed, so it is converted here (the digest
    from the checkpoint file, which holds the best weights)."""
    if "selector" in state:
        return Selector.from_state(state["selector"])
    selector, best = pretrain_selector(config, start), state["best"]
    selected = best["epoch"] > 0
    return Selector.from_state({
        **selector.state_dict(),
        "curve": [{"epoch": h["epoch"], "score": float(h["valid"][selector.metric])}
                  for h in state["history"]],
        "best_epoch": best["epoch"] if selected else None,
        "best_score": float(best["score"]),
        "best_metrics": {k: v for k, v in best.items() if k not in ("epoch", "score")},
        "digest": weights_digest(read_checkpoint(checkpoint)["state_dict"]) if selected
        else None})


@dataclass
class PretrainResult:
    checkpoint: Path
    best_epoch: int
    epochs: int
    valid: dict[str, float]
    test: dict[str, float]
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # training and selection passes, before the final evaluation
    extra: dict = field(default_factory=dict)  # spreads and seen/unseen splits (sequential)
    # Selector.summary() (curve, best, digest, its patience) and the spec's patience
    selection: dict = field(default_factory=dict)

    def to_json(self, env_id: str, seed: int) -> dict:
        return {
            "env": env_id, "seed": seed, "checkpoint": str(self.checkpoint),
            "best_epoch": self.best_epoch, "epochs": self.epochs, "valid": self.valid,
            "test": self.test, "wall_time_s": self.wall_time_s,
            "train_seconds": self.train_seconds, "history": self.history,
            "selection": self.selection, **self.extra,
        }


def pretrain(
    spec: EnvSpec,
    data: Dataset,
    out_dir: str | Path,
    *,
    seed: int = 1,
    device: torch.device | str = "cpu",
    max_epochs: int | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train a backbone from scratch and write the best one to ``out_dir/denoiser.pt``.

    Test metrics are recorded at each evaluation for the report, never used for selection.
    """
    config = spec.pretrain
    metric = config.selection_metric
    max_epochs = config.max_epochs if max_epochs is None else max_epochs
    torch.manual_seed(seed)  # weight init and dropout
    generator = torch.Generator().manual_seed(seed)  # shuffling, t, noise, condition dropout
    backbone = spec.build_backbone(data.n_items).to(device)
    optimizer = torch.optim.AdamW(
        backbone.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    sampler = make_timestep_sampler(config, backbone.diffusion.steps)
    dist = current()
    noise = rank_generator(seed, dist)
    checkpoint = Path(out_dir) / "denoiser.pt"
    state_path = Path(out_dir) / "pretrain_state.pt"
    identity = {"env": spec.id, "seed": seed, "world_size": dist.world_size,
                "pretrain": dataclasses.asdict(config), "backbone": spec.backbone,
                "diffusion": dataclasses.asdict(spec.diffusion), **held_out(data)}
    selectable = backbone.selection_start
    selector = pretrain_selector(config, selectable)
    history: list[dict] = []
    epoch, elapsed = 0, 0.0
    resumed = last_state = load_state(state_path, identity, "pretraining")
    if resumed is not None and resumed.get("final_max_epochs", -1) == max_epochs:
        # Finished with this cap: its result, nothing rewritten. A larger cap trains on.
        return PretrainResult(checkpoint=checkpoint, **resumed["final"])
    if resumed is not None:
        epoch, elapsed, history = (resumed[k] for k in ("epoch", "elapsed", "history"))
        selector = _resumed_selector(resumed, config, selectable, checkpoint)
        backbone.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
        sampler.load_state_dict(resumed["sampler"])
        restore_random_states(resumed["random"], dist, noise)
        if progress and dist.is_main:
            announce(f"pretrain {spec.id} seed {seed}: resuming after epoch {epoch} from "
                     f"{state_path} (a new --out starts afresh)")
    started = time.perf_counter() - elapsed
    bar = Progress(max_epochs, f"pretrain {spec.id}", unit="epoch", initial=epoch,
                   enabled=progress and dist.is_main)
    first = epoch + 1
    if max_epochs < selectable:
        raise ValueError(f"max_epochs ({max_epochs}) ends before the model can be selected: "
                         f"{spec.backbone_type}'s last training stage starts at epoch "
                         f"{selectable}; allow at least {selectable} epochs")
    for epoch in range(first, max_epochs + 1):
        if selector.should_stop(epoch):
            epoch -= 1  # the last epoch that ran
            break
        backbone.begin_pretrain_epoch(epoch)
        loss = train_epoch(backbone, data, optimizer, sampler, config, generator, device,
                           noise)
        bar.advance()
        shown = ({f"best valid {metric}": selector.best_score}
                 if selector.best_epoch is not None else {})
        bar.epoch(f"epoch {epoch}", loss=loss, **shown)
        if epoch >= selectable and (epoch % config.eval_every == 0 or epoch == max_epochs):
            metrics = evaluate(backbone, data, config, device=device,
                               chain=selection_chain(backbone, config),
                               sampling_seeds=config.selection_sampling_seeds)
            history.append({"epoch": epoch, "loss": loss, **metrics})
            if selector.offer(epoch, metrics, backbone.state_dict()) and dist.is_main:
                save_backbone(checkpoint, backbone, spec.id, seed=seed, epoch=epoch, **metrics)
        random = gather_random_states(dist, noise)  # a collective: every rank joins
        save_state(state_path, last_state := {
            "identity": identity, "epoch": epoch, "selector": selector.state_dict(),
            "history": history, "elapsed": time.perf_counter() - started,
            "model": backbone.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "random": random, "sampler": sampler.state_dict()})
    bar.close()
    dist.barrier()  # the selected checkpoint is on disk for every rank
    train_seconds = time.perf_counter() - started
    if selector.best_epoch is None:  # no checkpoint was written
        raise RuntimeError(
            f"pretraining {spec.id} selected no epoch by validation {metric} (evaluated: "
            f"{selector.curve}): no score was a number, or the patience ({config.patience}) "
            f"ran out before the first evaluation (every {config.eval_every} epochs from "
            f"epoch {selectable})")
    best = dict(selector.best_metrics)
    if backbone.stochastic_inference:  # the selected model under its own full sampler
        selected, _ = load_backbone(checkpoint, data.n_items, device)
        best.update(evaluate(selected, data, config, device=device,
                             progress=progress and dist.is_main))
        if dist.is_main:
            save_backbone(checkpoint, selected, spec.id, seed=seed,
                          epoch=selector.best_epoch, **best)
    result = PretrainResult(
        checkpoint=checkpoint, best_epoch=selector.best_epoch, epochs=epoch,
        valid=best["valid"], test=best["test"], wall_time_s=time.perf_counter() - started,
        history=history, train_seconds=train_seconds,
        extra={k: v for k, v in best.items() if k not in ("valid", "test")},
        selection={**selector.summary(), "spec_patience": config.patience},
    )
    final = {k: v for k, v in dataclasses.asdict(result).items() if k != "checkpoint"}
    save_state(state_path, {**last_state, "final": final, "final_max_epochs": max_epochs})
    return result

