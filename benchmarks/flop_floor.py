"""The FLOP floor of a bench's ReFiT runs beside their measured training time (issue 30 item 5).

For every OUT/seed<S>/refit/metrics.json: the run's FLOPs (:mod:`refit_gym.training.flops`,
from its backbone checkpoint, its recorded settings and its dataset's training episodes, on
whose histories a sequential encoder is counted), the time they take at the dense peak rate of
the device the cell ran on at the run's precision, and the run's training seconds
(``wall_time_s``: evaluation not included). Prints a markdown table and writes it to
OUT/flop_floor.md. benchmarks/gpu_bench.sh runs it on its bench folder.

    python benchmarks/flop_floor.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import cached_dataset
from refit_gym.rl.refit_agent import ReFiTConfig
from refit_gym.specs import load_env_spec
from refit_gym.training.flops import peak_tflops, refit_run_flops, training_row_flops


def run_floor(metrics: dict[str, Any]) -> dict[str, Any]:
    """One ReFiT run's FLOPs, device, peak rate, floor and measured seconds, from its
    metrics.json (a bench cell's, which records the machine it ran on)."""
    spec = load_env_spec(metrics["env"])
    env = metrics["env_kwargs"]
    config = ReFiTConfig(**metrics["config"])
    model, _ = load_backbone(metrics["checkpoint"])
    data = cached_dataset(spec.id, env.get("data_dir"))
    flops = refit_run_flops(training_row_flops(model, data), config, data.n_train_rows,
                            env.get("steps") or spec.diffusion.steps - env.get("stop_step", 0),
                            shared_start=env.get("sampling_steps", 0) == 0)
    device = metrics.get("machine", {}).get("device", "unknown")
    peak = peak_tflops(device, config.precision)
    return {"seed": metrics["seed"], "flops": flops, "device": device,
            "precision": config.precision, "peak": peak,
            "floor_s": None if peak is None else flops / (peak * 1e12),
            "measured_s": metrics["wall_time_s"]}


def floor_table(runs: list[dict[str, Any]]) -> str:
    """The runs of :func:`run_floor` as a markdown table ('unknown' where the device's peak
    is not known)."""
    lines = ["| seed | TFLOP | device | precision | peak TFLOP/s | floor s | measured s | "
             "floor / measured |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        floor = run["floor_s"]
        known = floor is not None
        cells = [str(run["seed"]), f"{run['flops'] / 1e12:.3g}", run["device"], run["precision"],
                 f"{run['peak']:g}" if known else "unknown", f"{floor:.3g}" if known else "unknown",
                 f"{run['measured_s']:.3g}",
                 f"{floor / run['measured_s']:.1%}" if known else "unknown"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/flop_floor.py BENCH_OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    cells = sorted(out.glob("seed*/refit/metrics.json"))
    if not cells:
        print(f"flop_floor: no ReFiT run under {out}", file=sys.stderr)
        return 1
    runs = [run_floor(json.loads(cell.read_text())) for cell in cells]
    text = (f"# FLOP floor of the ReFiT runs in {out}\n\nFLOPs of each run's matrix products "
            "(refit_gym/training/flops.py: backward as 2x forward, a sequential encoder counted on "
            "the id's training rows, elementwise work left out) "
            "and their time at the device's dense peak, beside the run's training seconds.\n\n"
            + floor_table(runs) + "\n")
    (out / "flop_floor.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
