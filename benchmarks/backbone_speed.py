"""Evaluation and pretraining overheads against the bare network compute, in one run (ML-1M).

- evaluation: validation + test metrics of all users (one chain, CSR rows densified per batch,
  masking, top-k) against ONE bare T-step reverse chain of the same network over the same users
  from a pre-built dense input;
- pretraining: one epoch of ``train_epoch`` (shuffling, CSR batches, importance sampling, loss
  bookkeeping) against the bare forward + backward + optimiser steps on pre-built dense batches.

    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_speed.py --env ReFiT-ML1M-v0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import best_of, fresh_training, write_result

from refit_gym.data import dense_rows, load_dataset
from refit_gym.metrics import evaluate
from refit_gym.pretrain import train_epoch
from refit_gym.specs import load_env_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    data = load_dataset(spec.dataset)
    model, diffusion, optimizer, sampler, generator = fresh_training(spec, data.n_items)
    config = spec.pretrain
    users = np.arange(data.n_users)

    history = [dense_rows(data.train, users[s : s + config.eval_batch_size])
               for s in range(0, data.n_users, config.eval_batch_size)]

    def bare_chain() -> None:
        model.eval()
        with torch.no_grad():
            for x in history:
                diffusion.ranking_scores(model, x)

    def full_evaluation() -> None:
        evaluate(model, diffusion, data, batch_size=config.eval_batch_size)

    t_chain = best_of(bare_chain, args.repeats)
    t_eval = best_of(full_evaluation, args.repeats)

    batches = [dense_rows(data.train, users[s : s + config.batch_size])
               for s in range(0, data.n_users, config.batch_size)]
    steps = [torch.randint(0, diffusion.steps, (len(b),), generator=generator) for b in batches]
    noises = [torch.randn(b.shape, generator=generator) for b in batches]

    def bare_epoch() -> None:
        model.train()
        for x0, t, noise in zip(batches, steps, noises):
            loss = diffusion.training_loss(model, x0, t, noise, reweight=True).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def real_epoch() -> None:
        train_epoch(model, diffusion, data, optimizer, sampler, config, generator)

    real_epoch()  # fill the sampler's loss history so importance sampling is on
    t_bare = best_of(bare_epoch, args.repeats)
    t_epoch = best_of(real_epoch, args.repeats)

    write_result(f"backbone_speed_{spec.dataset['name']}", f"Backbone speed, {spec.id}", [
        f"{data.summary()}; best of {args.repeats} runs each.", "",
        "| measurement | seconds | ratio | target |",
        "|---|---|---|---|",
        f"| one bare {diffusion.steps}-step chain, all users (batch "
        f"{config.eval_batch_size}) | {t_chain:.2f} | 1.00 | |",
        f"| validation + test evaluation, all users | {t_eval:.2f} | {t_eval / t_chain:.3f} "
        f"| <= 1.2 |",
        f"| bare forward+backward+AdamW, one epoch (batch {config.batch_size}) | {t_bare:.2f} "
        f"| 1.00 | |",
        f"| `train_epoch` (shuffle, CSR batches, importance sampling) | {t_epoch:.2f} "
        f"| {t_epoch / t_bare:.3f} | <= 1.2 |",
    ])


if __name__ == "__main__":
    main()
