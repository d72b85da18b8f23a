"""Pretraining a backbone with its own protocol (DiffRec's main.py or DreamRec's, batched).

Per epoch: shuffle the training rows (users or (history, next item) rows), and for each batch
sample t (DiffRec: by the running loss once every step has 10 recorded losses; DreamRec:
uniformly), compute the backbone's own loss, divide by the sampling probability. Every
``eval_every`` epochs evaluate on validation; keep the checkpoint with the best validation
``selection_metric``; stop after ``patience`` epochs without improvement. A stochastic backbone
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

from refit_gym.backbones import Backbone, load_backbone, save_backbone
from refit_gym.data import Dataset
from refit_gym.data.progress import Progress
from refit_gym.distributed import Distributed, current
from refit_gym.specs import EnvSpec, PretrainConfig
from refit_gym.training.metrics import evaluate, selection_chain
from refit_gym.training.resume import (
    gather_random_states,
    load_state,
    restore_random_states,
    save_state,
    seed_for,
)


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

    def to_json(self, env_id: str, seed: int) -> dict:
        return {
            "env": env_id, "seed": seed, "checkpoint": str(self.checkpoint),
            "best_epoch": self.best_epoch, "epochs": self.epochs, "valid": self.valid,
            "test": self.test, "wall_time_s": self.wall_time_s,
            "train_seconds": self.train_seconds, "history": self.history, **self.extra,
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
                "diffusion": dataclasses.asdict(spec.diffusion)}
    best: dict = {"epoch": 0, "score": -np.inf, "valid": {}, "test": {}}
    history: list[dict] = []
    epoch, elapsed = 0, 0.0
    resumed = load_state(state_path, identity, "pretraining")
    if resumed is not None:
        epoch, elapsed, best, history = (resumed[k] for k in ("epoch", "elapsed", "best",
                                                               "history"))
        backbone.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
        sampler.load_state_dict(resumed["sampler"])
        restore_random_states(resumed["random"], dist, noise)
    started = time.perf_counter() - elapsed
    bar = Progress(max_epochs, f"pretrain {spec.id}", unit="epoch", initial=epoch,
                   enabled=progress and dist.is_main)
    first, selectable = epoch + 1, backbone.selection_start
    if max_epochs < selectable:
        raise ValueError(f"max_epochs ({max_epochs}) ends before the model can be selected: "
                         f"{spec.backbone_type}'s last training stage starts at epoch "
                         f"{selectable}; allow at least {selectable} epochs")
    for epoch in range(first, max_epochs + 1):
        if epoch - max(best["epoch"], selectable - 1) >= config.patience:
            epoch -= 1
            break
        backbone.begin_pretrain_epoch(epoch)
        loss = train_epoch(backbone, data, optimizer, sampler, config, generator, device,
                           noise)
        bar.advance()
        shown = {f"best valid {metric}": best["score"]} if best["epoch"] else {}
        bar.epoch(f"epoch {epoch}", loss=loss, **shown)
        if epoch >= selectable and (epoch % config.eval_every == 0 or epoch == max_epochs):
            metrics = evaluate(backbone, data, config, device=device,
                               chain=selection_chain(backbone, config),
                               sampling_seeds=config.selection_sampling_seeds)
            history.append({"epoch": epoch, "loss": loss, **metrics})
            if metrics["valid"][metric] > best["score"]:
                best = {"epoch": epoch, "score": metrics["valid"][metric], **metrics}
                if dist.is_main:
                    save_backbone(checkpoint, backbone, spec.id, seed=seed, epoch=epoch,
                                  **metrics)
        random = gather_random_states(dist, noise)  # a collective: every rank joins
        save_state(state_path, {
            "identity": identity, "epoch": epoch, "best": best, "history": history,
            "elapsed": time.perf_counter() - started, "model": backbone.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "random": random, "sampler": sampler.state_dict()})
    bar.close()
    dist.barrier()  # the selected checkpoint is on disk for every rank
    train_seconds = time.perf_counter() - started
    if backbone.stochastic_inference:  # the selected model under its own full sampler
        selected, _ = load_backbone(checkpoint, data.n_items, device)
        best.update(evaluate(selected, data, config, device=device,
                             progress=progress and dist.is_main))
        if dist.is_main:
            save_backbone(checkpoint, selected, spec.id, seed=seed, epoch=best["epoch"],
                          **{k: v for k, v in best.items() if k not in ("epoch", "score")})
    return PretrainResult(
        checkpoint=checkpoint, best_epoch=best["epoch"], epochs=epoch, valid=best["valid"],
        test=best["test"], wall_time_s=time.perf_counter() - started, history=history,
        train_seconds=train_seconds,
        extra={k: v for k, v in best.items() if k not in ("epoch", "score", "valid", "test")},
    )

