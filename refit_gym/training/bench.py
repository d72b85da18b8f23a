"""``refit-gym bench``: pretrain (or reuse), fine-tune each algorithm over seeds, and compare.

Layout under ``--out``: ``seed<S>/pretrain`` and ``seed<S>/<algo>`` (each with metrics.json;
an interrupted cell resumes), then ``results.json``, ``results.md``, ``learning_curves.png`` and
``metrics.png``.

Every cell's metrics.json records its ``identity`` (what decides its numbers: the algorithm and
seed, its hyperparameters after ``--set``, env kwargs, the digests of the spec (of only what the
cell reads: a pretrain cell's without [env], a peer's of its id and [dataset], plus the metrics'
cut-offs) and of the data, the project version, and for a fine-tuned cell its pretrain cell's
identity) and the ``machine`` it ran on (CPU model, torch's CPU capability, threads, torch
version, device). A finished cell is reused only when its identity is the one this bench would
give it; otherwise bench refuses, before any work, with one line naming the first key that
differs. The machine is not part of the identity (a cell computed elsewhere is reused), so
results.md lists every cell with where it ran.
``pretrained`` is the backbone itself; ``stop`` (sequential ids) is the same weights with the
chain stopped at the step chosen on validation; ``continue`` trains it with its own loss for
the wall time the ReFiT run of the same seed took; the peers (pop, itemknn, ..., sasrec) are
tuned on validation over their agents/<peer>.toml grids.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import refit_gym
from refit_gym.data import Dataset, atomic_path, write_json
from refit_gym.distributed import current
from refit_gym.specs import EnvSpec, load_agent_hyperparams
from refit_gym.training.chain_stop import NAME as STOP
from refit_gym.training.chain_stop import stopped_chains, tune_stop
from refit_gym.training.finetune import ALGOS, finetune
from refit_gym.training.identity import (
    data_digest,
    describe_difference,
    digest,
    machine,
    spec_digest,
)
from refit_gym.training.metrics import sample_std
from refit_gym.training.peers import PEER_NAMES, grid, tune_peer
from refit_gym.training.pretrain import pretrain

ORDER = ("pretrained", STOP, "refit", "ddpo", "ppo", "a2c", "trpo", "continue", *PEER_NAMES)
# Plot colours go by the order the algorithms joined the project, so one that joins later (the
# stop) takes the next shade and no committed plot changes colour on a rerun.
COLOUR_ORDER = (*(algo for algo in ORDER if algo != STOP), STOP)
# Sequential ids split test by whether the row's target was ever a training target: on Zhihu
# DreamRec's hits all come from never-trained targets (RESULTS.md).
TARGET_SPLITS = {"test_seen": "trained", "test_unseen": "never trained"}


def metric_keys(cells: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The metrics the results hold (recall/ndcg or hr/ndcg at the spec's K), grouped."""
    keys = list(next(iter(cells.values()))[0]["test"])
    names = list(dict.fromkeys(k.split("@")[0] for k in keys))
    return sorted(keys, key=lambda k: (names.index(k.split("@")[0]), int(k.split("@")[1])))


class CellMismatch(ValueError):
    """A finished cell was computed with another identity than this bench would give it."""


def reuse_cell(cell: Path, identity: dict[str, Any], spec: EnvSpec) -> dict[str, Any] | None:
    """The finished cell's metrics if its recorded identity is ``identity``; None if the cell
    is not finished; :class:`CellMismatch` (one line naming the key) if it differs. ``spec``:
    the bench's, to read identities recorded before the digests left out what a cell never reads."""
    report = cell / "metrics.json"
    if not report.is_file():
        return None
    result = json.loads(report.read_text())
    # JSON turns tuples into lists: compare what the file would hold.
    wanted = json.loads(json.dumps(identity, default=str))
    recorded = result.get("identity")
    if recorded is None:
        raise CellMismatch(f"{cell} records no identity (written before bench recorded one); "
                           "use a new --out, or delete the cell to recompute it")
    recorded = _upgraded(recorded, spec)
    if (difference := describe_difference(recorded, wanted)) is not None:
        raise CellMismatch(f"{cell} was computed with {difference}; use a new --out, or delete "
                           "the cell to recompute it")
    return result


def pretrain_identity(spec: EnvSpec, data: Dataset, seed: int, max_epochs: int | None,
                      device: str = "cpu") -> dict[str, Any]:
    """What decides a pretrained backbone: written by ``refit-gym pretrain`` and by bench alike,
    so a backbone pretrained on its own is reused by a bench whose ``seed<S>/pretrain`` it is.

    Pretraining never reads the MDP's settings, so the spec's digest leaves out [env]: a new
    default reward reuses the backbones (its fine-tuned cells, whose digest has [env], do not).
    A GPU or several processes draw other random streams, so they make another model: they are
    part of the identity when used (left out on one CPU process, so earlier cells still match).
    ``max_epochs`` equal to the spec's is the default (None)."""
    identity: dict[str, Any] = {
        "algo": "pretrain", "seed": seed,
        "max_epochs": None if max_epochs == spec.pretrain.max_epochs else max_epochs,
        **common_identity(spec, data), "spec": spec_digest(spec, without=("env",))}
    if (kind := torch.device(device).type) != "cpu":
        identity["device"] = kind
    if current().world_size > 1:
        identity["world_size"] = current().world_size
    return identity


# What a peer never reads of a spec: it is fitted and evaluated on the data alone, so neither a
# new default reward nor a new backbone or pretraining setting recomputes the peers (of
# [pretrain] it reads only the cut-offs, named apart, and the evaluation batch size, which does
# not change results).
PEER_BLIND = ("diffusion", "backbone", "pretrain", "env")


def peer_identity(algo: str, spec: EnvSpec, seed: int, common: dict[str, Any]) -> dict[str, Any]:
    """What decides a peer's cell: its grid and seed, ``common`` (:func:`common_identity`) with
    the digest of what a peer reads of the spec (its id and [dataset]), and the metrics'
    cut-offs."""
    return {"algo": algo, "seed": seed, "hyperparams": grid(algo, spec.id), **common,
            **_peer_reads(spec)}


def _peer_reads(spec: EnvSpec) -> dict[str, Any]:
    """What a peer reads of ``spec``: the digest of its id and [dataset], and the cut-offs."""
    return {"spec": spec_digest(spec, without=PEER_BLIND), "ks": list(spec.pretrain.ks)}


def finetune_identity(algo: str, seed: int, hyperparams: dict[str, Any],
                      env_kwargs: dict[str, Any] | None, pretrain: dict[str, Any],
                      common: dict[str, Any]) -> dict[str, Any]:
    """What decides a fine-tuned cell: the algorithm, seed and settings, and the identity of
    the pretrain cell it starts from (``common``: :func:`common_identity`)."""
    return {"algo": algo, "seed": seed, "hyperparams": hyperparams,
            "env_kwargs": env_kwargs or {}, "pretrain": pretrain, **common}


def _upgraded(recorded: dict[str, Any], spec: EnvSpec) -> dict[str, Any]:
    """``recorded`` with a pretrain or peer identity written by an earlier version, whose spec
    digest covered more of ``spec`` (pretrain: [env] too; peer: the whole spec, or all but
    [env]), read as today's when that digest is ``spec``'s (the same cell)."""
    whole, without_env = spec_digest(spec), spec_digest(spec, without=("env",))

    def upgraded(identity: Any) -> Any:
        if not isinstance(identity, dict):
            return identity
        if identity.get("algo") == "pretrain" and identity.get("spec") == whole:
            return {**identity, "spec": without_env}
        if identity.get("algo") in PEER_NAMES and "ks" not in identity:
            # Its digest covered the cut-offs too: it alone decides, so a refusal names the spec.
            now = _peer_reads(spec)
            if identity.get("spec") not in (whole, without_env):
                now["spec"] = identity.get("spec")
            return {**identity, **now}
        return identity

    recorded = upgraded(recorded)
    if "pretrain" in recorded:  # a fine-tuned or stopped cell names the backbone it started from
        recorded = {**recorded, "pretrain": upgraded(recorded["pretrain"])}
    return recorded


def common_identity(spec: EnvSpec, data: Dataset) -> dict[str, Any]:
    return {"spec": spec_digest(spec), "data": data_digest(data),
            "version": refit_gym.__version__}


def record_cell(cell: Path, result: dict[str, Any], identity: dict[str, Any],
                device: str) -> dict[str, Any]:
    """``result`` with its identity and machine, as the cell's metrics.json holds it (rank 0
    writes it)."""
    result = json.loads(json.dumps({**result, "identity": identity, "machine": machine(device)},
                                   default=str))
    if current().is_main:
        write_json(cell / "metrics.json", result)
    return result


def order_algos(algos: Sequence[str]) -> list[str]:
    """``algos`` in the table's order (:data:`ORDER`), after checking each is one bench can
    run: the pretrained backbone (as it is, or with its chain stopped), a fine-tuning
    algorithm (:data:`ALGOS`) or a peer."""
    unknown = sorted(set(algos) - {"pretrained", STOP, *ALGOS, *PEER_NAMES})
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from pretrained, {STOP}, "
                         f"{ALGOS} or the peers {PEER_NAMES}")
    if "continue" in algos and "refit" not in algos:
        raise ValueError("continue is budgeted by the refit run's wall time: include refit")
    return sorted(algos, key=ORDER.index)


def run_bench(
    spec: EnvSpec, data: Dataset, algos: Sequence[str], seeds: Sequence[int],
    out_dir: str | Path, *, device: str = "cpu", hyperparams: dict[str, dict] | None = None,
    env_kwargs: dict[str, Any] | None = None, pretrain_max_epochs: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    ordered = order_algos(algos)
    out_dir, hyperparams = Path(out_dir), hyperparams or {}
    if stray := sorted(set(hyperparams) - (set(algos) - {"pretrained", STOP, *PEER_NAMES})):
        raise ValueError(f"--set names {stray}, which this bench does not fine-tune; --set "
                         "takes ALGO.KEY=VALUE for an algorithm in --algos (a peer's or the "
                         "stop's grid is agents/<name>.toml)")
    # The stops' grid, resolved now: a CF id or a stop the chain cannot take is refused here.
    stops = [s for s, _ in stopped_chains(spec, env_kwargs, device)] if STOP in ordered else []
    common = common_identity(spec, data)
    identities: dict[tuple[int, str], dict[str, Any]] = {}
    for seed in seeds:
        backbone = pretrain_identity(spec, data, seed, pretrain_max_epochs, device)
        if set(ordered) - set(PEER_NAMES):  # the peers need no backbone
            identities[seed, "pretrain"] = backbone
        for algo in ordered:
            if algo in PEER_NAMES:
                identities[seed, algo] = peer_identity(algo, spec, seed, common)
            elif algo == STOP:
                identities[seed, algo] = finetune_identity(algo, seed, {"stop_step": stops},
                                                           env_kwargs, backbone, common)
            elif algo != "pretrained":
                params = {**load_agent_hyperparams(algo, spec.id, device),
                          **hyperparams.get(algo, {})}
                identities[seed, algo] = finetune_identity(algo, seed, params, env_kwargs,
                                                           backbone, common)
    # Every finished cell is checked before any work starts.
    finished = {key: reuse_cell(_cell_dir(out_dir, *key), identity, spec)
                for key, identity in identities.items()}
    cells: dict[str, list[dict[str, Any]]] = {a: [] for a in ordered}
    for seed in seeds:
        base: dict[str, Any] = {}
        if (seed, "pretrain") in identities:
            cell = _cell_dir(out_dir, seed, "pretrain")
            base = finished[seed, "pretrain"] or record_cell(
                cell, pretrain(spec, data, cell, seed=seed, device=device,
                               max_epochs=pretrain_max_epochs, progress=progress
                               ).to_json(spec.id, seed), identities[seed, "pretrain"], device)
            finished[seed, "pretrain"] = base
        for algo in ordered:
            if algo == "pretrained":
                cells[algo].append({**base, "algo": "pretrained", "history": []})
                continue
            cell = _cell_dir(out_dir, seed, algo)
            if (result := finished[seed, algo]) is None:
                if algo in PEER_NAMES:
                    result = tune_peer(algo, spec, data, seed, device, out_dir=cell,
                                       progress=progress)
                elif algo == STOP:
                    result = tune_stop(spec, data, Path(base["checkpoint"]), seed,
                                       env_kwargs=env_kwargs, device=device,
                                       progress=progress)
                else:
                    budget = (cells["refit"][-1]["wall_time_s"] if algo == "continue" else None)
                    result = finetune(
                        spec, data, Path(base["checkpoint"]), algo, cell, seed=seed,
                        device=device, hyperparams=hyperparams.get(algo),
                        env_kwargs=env_kwargs, budget_seconds=budget, progress=progress)
                result = record_cell(cell, result, identities[seed, algo], device)
            finished[seed, algo] = result
            cells[algo].append(result)
    summary = summarise(cells)
    payload = {"env": spec.id, "seeds": list(seeds), "algos": ordered, "summary": summary,
               "cells": cells}
    write_json(out_dir / "results.json", payload)
    table = markdown_table(spec.id, summary, list(seeds), split_rows(cells))
    table += cells_section(finished)
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(table)
    plot(cells, summary, out_dir, list(seeds))
    return payload


def _cell_dir(out_dir: Path, seed: int, algo: str) -> Path:
    return out_dir / f"seed{seed}" / algo


def cells_section(cells: dict[tuple[int, str], dict[str, Any]]) -> str:
    """A "Cells" section: every cell (seed, folder) of the table, the first 12 hex digits of
    its identity's digest, and the machine it ran on."""
    lines = ["", "## Cells", "",
             "| seed | cell | identity | cpu | capability | threads | torch | device |",
             "|---|---|---|---|---|---|---|---|"]
    for (seed, algo), result in cells.items():
        where = result["machine"]
        lines.append(f"| {seed} | {algo} | {digest(result['identity'])[:12]} | " + " | ".join(
            str(where[k]) for k in ("cpu", "cpu_capability", "threads", "torch", "device"))
            + " |")
    return "\n".join(lines) + "\n"


def summarise(cells: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and sample std (n - 1, :func:`sample_std`) over seeds of every metric, per
    algorithm (and per target split where every run has it)."""
    summary: dict[str, Any] = {}
    for algo, runs in cells.items():
        entry: dict[str, Any] = {}
        for split in ("valid", "test", *TARGET_SPLITS):
            if not all(split in r for r in runs):
                continue
            for key in metric_keys(cells):
                values = [r[split][key] for r in runs]
                entry[f"{split}/{key}"] = (statistics.mean(values), sample_std(values))
        walls = [r.get("wall_time_s", 0.0) for r in runs]
        entry["wall_time_s"] = (statistics.mean(walls), sample_std(walls))
        summary[algo] = entry
    return summary


def split_rows(cells: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """The test rows of each target split (empty for a CF id)."""
    run = next(iter(cells.values()))[0]
    return {split: run[split]["rows"] for split in TARGET_SPLITS if split in run}


def markdown_table(env_id: str, summary: dict[str, Any], seeds: list[int],
                   rows: dict[str, int] | None = None) -> str:
    """The valid/test table, then (given each target split's ``rows``) test by target split."""
    columns = [k for k in next(iter(summary.values())) if k.split("/")[0] in ("valid", "test")]
    spread = len(seeds) > 1  # one seed has no spread to print

    def cell(mean_std: tuple[float, float], digits: int = 4) -> str:
        return f"{mean_std[0]:.{digits}f}" + (f" ± {mean_std[1]:.{digits}f}" if spread else "")

    title = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if spread
             else f"seed {seeds[0]}")
    lines = [f"# {env_id}: {title}", "",
             "Fine-tuned models are selected by validation NDCG@20 (the pretrained start is a "
             "candidate), peers by validation NDCG@20 over their agents/<peer>.toml grid; test "
             "is reported, never used. Wall time: pretraining for `pretrained`, the scan's "
             "evaluations for `stop` (the same backbone, its chain stopped at the step chosen "
             "on validation), training time (evaluations excluded) for fine-tuning, the whole "
             "grid for a peer.", "",
             "| algo | " + " | ".join(columns) + " | wall s |",
             "|---" * (len(columns) + 2) + "|"]
    for algo, entry in summary.items():
        cells = [cell(entry[c]) for c in columns]
        lines.append(f"| {algo} | " + " | ".join(cells) + f" | {cell(entry['wall_time_s'], 0)} |")
    if rows:
        keys = [c.removeprefix("test/") for c in columns if c.startswith("test/")]
        lines += ["", "Test by whether the row's target was ever a training target:", "",
                  "| algo | targets | rows | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 3) + "|"]
        for algo, entry in summary.items():
            for split, label in TARGET_SPLITS.items():
                if f"{split}/{keys[0]}" in entry:
                    lines.append(f"| {algo} | {label} | {rows[split]:,} | " + " | ".join(
                        cell(entry[f"{split}/{k}"]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _colour(algo: str) -> tuple[float, ...]:
    """One colour an algorithm in every plot: tab20's ten strong shades, then its light ones
    (the ten-colour cycle gave a peer the colour of an agent), by :data:`COLOUR_ORDER`."""
    import matplotlib

    index = 2 * COLOUR_ORDER.index(algo)
    return matplotlib.colormaps["tab20"](index % 20 + index // 20)


def plot(cells: dict[str, list[dict[str, Any]]], summary: dict[str, Any], out_dir: Path,
         seeds: Sequence[int]) -> None:
    """Learning curves against training seconds (train reward, the fixed-episode reward of the
    optimiser's own check, validation NDCG@20) into learning_curves.png, and the final test
    metrics (:func:`plot_metrics`) into metrics.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_fixed, ax_valid) = plt.subplots(1, 3, figsize=(15, 4))
    for algo, runs in cells.items():
        for i, run in enumerate(runs):
            history = run["history"]
            if not history:  # the pretrained backbone and the peers: no learning curve
                continue
            style = {"marker": "o", "label": algo if i == 0 else None,
                     "color": _colour(algo), "alpha": 0.8}
            ax_valid.plot([h["elapsed"] for h in history],
                          [h["valid"]["ndcg@20"] for h in history], **style)
            for ax, key in ((ax_reward, "train_reward"), (ax_fixed, "fixed_reward")):
                points = [(h["elapsed"], h[key]) for h in history if h.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), **style)
    # Training seconds on every axis: continue's hundreds of short epochs and ReFiT's few long
    # ones are compared at equal time, as the comparison is made.
    ax_reward.set(title="mean training episode reward", xlabel="training seconds")
    ax_fixed.set(title="fixed training episodes, the backbone's own chain",
                 xlabel="training seconds")
    ax_valid.set(title="validation NDCG@20 (first point = the start)",
                 xlabel="training seconds")
    for ax in (ax_reward, ax_fixed, ax_valid):
        if ax.get_legend_handles_labels()[0]:  # a bench of peers alone draws no curve
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_dir / "learning_curves.png")
    plt.close(fig)
    plot_metrics(summary, out_dir / "metrics.png", seeds)


def plot_metrics(summary: dict[str, Any], out_path: Path, seeds: Sequence[int],
                 title: str | None = None) -> Any:
    """Test NDCG@20 and the hits metric at 20 (recall@20 or hr@20), one point an algorithm
    with an error bar of ``summary``'s std, written atomically to ``out_path``.

    ``summary`` maps each algorithm, in the plot's order, to ``{"test/<metric>": (mean, std)}``
    (other keys are ignored). One seed has no spread: no error bar, and the titles name the
    seed instead of claiming a std (as :func:`markdown_table` prints no "±"). ``title`` is an
    optional line above both panels. Returns the (closed) figure, for tests to read.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(summary)
    spread = len(seeds) > 1
    hits = next(k.removeprefix("test/") for k in summary[algos[0]]
                if k.startswith("test/") and k.endswith("@20") and "ndcg" not in k)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("ndcg@20", hits)):
        means = [summary[a][f"test/{key}"][0] for a in algos]
        stds = [summary[a][f"test/{key}"][1] if spread else 0.0 for a in algos]
        # Points, not bars: the axis is zoomed to the values (fine-tuning moves the fourth
        # decimal), and a bar cut off at a zoomed bottom would show a weak peer as zero.
        for i, (algo, mean, std) in enumerate(zip(algos, means, stds)):
            ax.errorbar(i, mean, yerr=std if spread else None, fmt="o", markersize=8,
                        capsize=4, color=_colour(algo))
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        pad = 0.05 * (high - low or abs(high) or 1.0)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xticks(range(len(algos)), algos)
        ax.set(title=f"test {key} (mean ± std over seeds)" if spread
               else f"test {key} (seed {seeds[0]})")
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30)  # eight or more names overlap level
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, Path(out_path))
    plt.close(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
