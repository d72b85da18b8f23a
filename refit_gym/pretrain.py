"""Pretraining the DiffRec backbone with DiffRec's protocol (its main.py, made batched).

Per epoch: shuffle users, and for each batch sample t (by the running loss once every step has
10 recorded losses), noise the history to x_t, regress f(x_t, t) on x_0 with SNR reweighting,
divide by the sampling probability. Every ``eval_every`` epochs evaluate; keep the checkpoint
with the best validation Recall@20; stop after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from refit_gym.checkpoint import save_denoiser
from refit_gym.data import InteractionData, dense_rows
from refit_gym.denoiser import MLPDenoiser
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.metrics import evaluate
from refit_gym.specs import EnvSpec, PretrainConfig

SELECTION_METRIC = "recall@20"  # DiffRec selects by validation Recall@20


class LossAwareTimestepSampler:
    """DiffRec's importance sampling of t: p(t) ~ sqrt(E[loss_t^2]) over its last 10 losses.

    Until every step has ``history`` losses recorded, t is uniform (and p = 1).
    """

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


def train_epoch(
    denoiser: MLPDenoiser,
    diffusion: GaussianDiffusion,
    data: InteractionData,
    optimizer: torch.optim.Optimizer,
    sampler: LossAwareTimestepSampler | None,
    config: PretrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> float:
    """One pass over all users in shuffled batches; returns the mean batch loss."""
    denoiser.train()
    order = torch.randperm(data.n_users, generator=generator).numpy()
    total, n_batches = 0.0, 0
    for start in range(0, data.n_users, config.batch_size):
        x0 = dense_rows(data.train, order[start : start + config.batch_size], device)
        if sampler is not None:
            t, pt = sampler.sample(len(x0), generator)
        else:
            t, pt = torch.randint(0, diffusion.steps, (len(x0),), generator=generator), None
        t = t.to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        losses = diffusion.training_loss(denoiser, x0, t, noise, config.reweight)
        if sampler is not None:
            sampler.record(t, losses)
            losses = losses / pt.to(device)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        n_batches += 1
    return total / max(n_batches, 1)


@dataclass
class PretrainResult:
    checkpoint: Path
    best_epoch: int
    epochs: int
    valid: dict[str, float]
    test: dict[str, float]
    wall_time_s: float
    history: list[dict] = field(default_factory=list)

    def to_json(self, env_id: str, seed: int) -> dict:
        return {
            "env": env_id, "seed": seed, "checkpoint": str(self.checkpoint),
            "best_epoch": self.best_epoch, "epochs": self.epochs, "valid": self.valid,
            "test": self.test, "wall_time_s": self.wall_time_s, "history": self.history,
        }


def pretrain(
    spec: EnvSpec,
    data: InteractionData,
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
    max_epochs = config.max_epochs if max_epochs is None else max_epochs
    torch.manual_seed(seed)  # weight init and dropout
    generator = torch.Generator().manual_seed(seed)  # shuffling, t and noise
    denoiser = MLPDenoiser(spec.denoiser_config(data.n_items)).to(device)
    diffusion = GaussianDiffusion(spec.diffusion, device)
    optimizer = torch.optim.AdamW(
        denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    sampler = LossAwareTimestepSampler(diffusion.steps) if config.importance_sampling else None
    checkpoint = Path(out_dir) / "denoiser.pt"
    best: dict = {"epoch": 0, "score": -np.inf, "valid": {}, "test": {}}
    history: list[dict] = []
    started = time.perf_counter()
    epoch = 0
    bar = tqdm(total=max_epochs, desc=f"pretrain {spec.id}", disable=not progress)
    for epoch in range(1, max_epochs + 1):
        if epoch - best["epoch"] >= config.patience:
            epoch -= 1
            break
        loss = train_epoch(denoiser, diffusion, data, optimizer, sampler, config, generator, device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", best=f"{best['score']:.4f}@{best['epoch']}")
        if epoch % config.eval_every and epoch != max_epochs:
            continue
        metrics = evaluate(denoiser, diffusion, data, batch_size=config.eval_batch_size,
                           sampling_steps=spec.env.get("sampling_steps", 0), device=device)
        history.append({"epoch": epoch, "loss": loss, **metrics})
        if metrics["valid"][SELECTION_METRIC] > best["score"]:
            best = {"epoch": epoch, "score": metrics["valid"][SELECTION_METRIC], **metrics}
            save_denoiser(checkpoint, denoiser, spec.id, seed=seed, epoch=epoch, **metrics)
    bar.close()
    return PretrainResult(
        checkpoint=checkpoint, best_epoch=best["epoch"], epochs=epoch, valid=best["valid"],
        test=best["test"], wall_time_s=time.perf_counter() - started, history=history,
    )
