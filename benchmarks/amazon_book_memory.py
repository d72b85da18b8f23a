"""Amazon-Book at scale: load the KGAT split and run pretraining epochs; report peak RSS.

A dense 70,679 x 24,915 float32 matrix would take 7.0 GB; the data layer keeps CSR and
densifies one batch at a time.

    REFIT_DATA_DIR=../shared/data python benchmarks/amazon_book_memory.py --epochs 1
"""

from __future__ import annotations

import argparse
import time

from common import fresh_training, peak_rss_mib, write_result

from refit_gym.data import load_dataset
from refit_gym.pretrain import train_epoch
from refit_gym.specs import load_env_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="ReFiT-AmazonBook-v0")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    spec = load_env_spec(args.env)
    start = time.perf_counter()
    data = load_dataset(spec.dataset)
    t_load, rss_load = time.perf_counter() - start, peak_rss_mib()
    model, diffusion, optimizer, sampler, generator = fresh_training(spec, data.n_items)
    epoch_times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        loss = train_epoch(model, diffusion, data, optimizer, sampler, spec.pretrain, generator)
        epoch_times.append(time.perf_counter() - start)
    dense_gb = data.n_users * data.n_items * 4 / 1e9
    n_params = sum(p.numel() for p in model.parameters())
    write_result("amazon_book_memory", f"Memory at scale, {spec.id}", [
        data.summary() + ".", "",
        "| measurement | value |", "|---|---|",
        f"| load + validate + carve validation | {t_load:.1f} s |",
        f"| peak RSS after loading | {rss_load:.0f} MiB |",
        f"| denoiser parameters (dims {list(spec.denoiser['dims'])}) | {n_params / 1e6:.1f} M |",
        f"| pretraining epoch(s) | {', '.join(f'{t:.0f} s' for t in epoch_times)} "
        f"(last loss {loss:.4f}) |",
        f"| peak RSS, whole run | {peak_rss_mib():.0f} MiB |",
        f"| a dense users x items float32 matrix, for comparison | {dense_gb:.1f} GB |",
    ])


if __name__ == "__main__":
    main()
