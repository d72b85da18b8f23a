"""Evaluation and pretraining overheads against the bare network compute, in one run, for any id.

- evaluation: validation + test metrics of every row (CF: one chain per user, CSR rows densified
  per batch, masking, top-k; sequential: one sampling seed of the backbone's own T-step chain
  over the validation and test rows, target ranks) against the bare chain of the same network
  over the same rows from pre-built input tensors;
- pretraining: one epoch of ``train_epoch`` (shuffling, batches built from the dataset,
  t-sampling, loss bookkeeping) against the bare forward + backward + optimiser steps on
  pre-built batches and pre-drawn timesteps.

    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_speed.py --env ReFiT-ML1M-v0
    REFIT_DATA_DIR=../shared/data python benchmarks/backbone_speed.py --env ReFiT-Zhihu-v0 \
        --repeats 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import best_of, fresh_training, write_result

from refit_gym.data import InteractionData, load_dataset
from refit_gym.specs import load_env_spec
from refit_gym.training.metrics import evaluate_cf, evaluate_sequential
from refit_gym.training.pretrain import train_epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-ML1M-v0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    data = load_dataset(spec.dataset)
    model, optimizer, sampler, generator = fresh_training(spec, data.n_items)
    config = spec.pretrain
    size = config.eval_batch_size
    cf = isinstance(data, InteractionData)

    if cf:
        users = np.arange(data.n_users)
        eval_batches = [data.train_batch(users[s : s + size]) for s in range(0, len(users), size)]
    else:
        eval_batches = [data.batch(split, np.arange(s, min(s + size, len(data.targets[split]))))
                        for split in ("valid", "test")
                        for s in range(0, len(data.targets[split]), size)]

    def bare_chain() -> None:
        model.eval()
        chain_generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for batch in eval_batches:
                model.generate(batch, generator=chain_generator)

    def full_evaluation() -> None:
        if cf:
            evaluate_cf(model, data, ks=config.ks, batch_size=size)
        else:
            evaluate_sequential(model, data, ks=config.ks, batch_size=size, sampling_seeds=(0,))

    t_chain = best_of(bare_chain, args.repeats)
    t_eval = best_of(full_evaluation, args.repeats)

    order = np.arange(data.n_train_rows)
    batches = [data.train_batch(order[s : s + config.batch_size])
               for s in range(0, data.n_train_rows, config.batch_size)]
    steps = [torch.randint(0, model.diffusion.steps, (len(b["history"]),), generator=generator)
             for b in batches]

    def bare_epoch() -> None:
        model.train()
        for batch, t in zip(batches, steps):
            loss = model.training_loss(batch, t, generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def real_epoch() -> None:
        train_epoch(model, data, optimizer, sampler, config, generator)

    real_epoch()  # fill a loss-aware sampler's history so importance sampling is on
    t_bare = best_of(bare_epoch, args.repeats)
    t_epoch = best_of(real_epoch, args.repeats)

    rows = "all users" if cf else "validation + test rows, one sampling seed"
    write_result(f"backbone_speed_{spec.dataset['name'].replace('/', '-')}",
                 f"Backbone speed, {spec.id} ({model.name})", [
        f"{data.summary()}; best of {args.repeats} runs each; {torch.get_num_threads()} "
        "torch threads.", "",
        "| measurement | seconds | ratio | target |",
        "|---|---|---|---|",
        f"| bare {model.diffusion.steps}-step chain, {rows} (batch {size}) | {t_chain:.2f} "
        "| 1.00 | |",
        f"| evaluation of the same rows (metrics, masks or target ranks) | {t_eval:.2f} "
        f"| {t_eval / t_chain:.3f} | <= 1.2 |",
        f"| bare forward+backward+AdamW, one epoch (batch {config.batch_size}) | {t_bare:.2f} "
        "| 1.00 | |",
        f"| `train_epoch` (shuffle, dataset batches, t-sampling) | {t_epoch:.2f} "
        f"| {t_epoch / t_bare:.3f} | <= 1.2 |",
    ])


if __name__ == "__main__":
    main()
