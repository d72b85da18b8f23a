"""Redraw a committed bench report's metrics plot from its table, when the run folder is gone.

    python benchmarks/redraw_metrics.py benchmarks/results/bench_ReFiT-ML1M-v0.md

Reads the report's first table (``| algo | valid/... | test/... | wall s |``), takes each
algorithm's test metrics (``mean ± std``) and writes ``<report stem>_metrics.png`` beside it,
atomically, with the bench's own :func:`refit_gym.training.bench.plot_metrics` (test NDCG@20
and recall@20 or hr@20, points with error bars). The plot shows the sample std (n - 1), the
project's rule, over the seeds the report's title names (or, failing that, its first
``--seeds``).

Which std a table gives: the bench writes the sample std since 2026-12-04, in the same change
(c18ee0d) that gave its reports a ``## Cells`` section; a report without that section was
measured before and gives the population std (RESULTS.md, Conventions), converted here as
sample = population * sqrt(n / (n - 1)). Where the report holds a per-seed table (``| seed |
algo | ... | test hr@20 / ndcg@20 ... |``), an algorithm with a row for every seed gets its
mean and sample std from those values instead, after checking that they give the first table's
mean and std to the digits printed (which also checks the convention).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

from refit_gym.training.bench import plot_metrics
from refit_gym.training.metrics import sample_std

# The bench's results.md has this section since it writes the sample std (one change, c18ee0d).
SAMPLE_STD_MARK = "\n## Cells\n"


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text``: its rows (header first, the |---| line dropped), each
    a list of stripped cells."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def read_seeds(text: str) -> list[int]:
    """The seeds of the report: its title's "seeds 1, 2, 3" / "seeds 1-3" / "seed 1", or else
    its first ``--seeds 1,2,3``."""
    match = (re.search(r"\bseeds? (\d+(?:(?:, ?|-)\d+)*)", text.splitlines()[0])
             or re.search(r"--seeds (\d+(?:,\d+)*)\b", text))
    if match is None:
        raise ValueError("the report names its seeds neither in its title nor in a --seeds")
    spec = match.group(1)
    if "-" in spec:
        first, last = map(int, spec.split("-"))
        return list(range(first, last + 1))
    return [int(s) for s in re.split(r", ?", spec)]


def half_unit(printed: str) -> float:
    """Half a unit of the last digit printed: the rounding error of ``printed``."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10.0 ** -decimals


def read_summary(text: str) -> tuple[dict[str, dict[str, tuple[float, float]]], list[int],
                                     dict[str, str]]:
    """The report's test metrics as :func:`plot_metrics` takes them, with the sample std.

    Returns ``(summary, seeds, sources)``: ``summary[algo]["test/<metric>"] = (mean,
    sample std)`` in the first table's row order, and ``sources[algo]`` says where the algorithm's
    numbers came from (the per-seed table, or the first table with its convention).
    """
    seeds = read_seeds(text)
    n = len(seeds)
    header, *rows = next(t for t in tables(text) if t[0][0] == "algo")
    columns = [c for c in header if c.startswith("test/")]
    population = SAMPLE_STD_MARK not in text
    # Population to sample std; one seed has no spread.
    factor = math.sqrt(n / (n - 1)) if n > 1 and population else 1.0
    printed: dict[str, dict[str, tuple[str, str]]] = {}
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    sources: dict[str, str] = {}
    for row in rows:
        algo = row[0]
        printed[algo] = {}
        for column in columns:
            mean, _, std = row[header.index(column)].partition("±")
            printed[algo][column] = (mean.strip(), std.strip() or "0")
        summary[algo] = {c: (float(m), float(s) * factor) for c, (m, s) in printed[algo].items()}
        sources[algo] = ("the table's population std x sqrt(n / (n - 1))" if factor != 1.0
                         else "the table")
    for algo, values in per_seed(text, columns, seeds).items():
        if algo not in summary:
            continue
        for column, by_seed in values.items():
            numbers = [float(v) for v in by_seed]
            mean, std = printed[algo][column]
            # The per-seed values' rounding moves their mean and std by at most their half unit.
            rounding = max(map(half_unit, by_seed)) + 1e-12
            spread = (statistics.pstdev if population else sample_std)(numbers)
            if (abs(statistics.mean(numbers) - float(mean)) > half_unit(mean) + rounding
                    or abs(spread - float(std)) > half_unit(std) + rounding):
                raise ValueError(
                    f"{algo} {column}: the per-seed values {', '.join(by_seed)} do not give the "
                    f"table's {mean} ± {std} ({'population' if population else 'sample'} std)")
            summary[algo][column] = (statistics.mean(numbers), sample_std(numbers))
        sources[algo] = "the per-seed table"
    return summary, seeds, sources


def per_seed(text: str, columns: list[str], seeds: list[int]
             ) -> dict[str, dict[str, list[str]]]:
    """From the report's first ``| seed | algo | ...`` table, whose ``test A / B`` column gives
    two of ``columns`` per seed: ``{algo: {"test/A": [value per seed], ...}}`` for each
    algorithm with one row for every seed, in ``seeds``' order (as printed)."""
    table = next((t for t in tables(text) if t[0][:2] == ["seed", "algo"]), None)
    if table is None:
        return {}
    header, *rows = table
    found = [(i, m.groups()) for i, name in enumerate(header)
             if (m := re.fullmatch(r"test (\S+) / (\S+)(?: \(.*\))?", name))
             and all(f"test/{k}" in columns for k in m.groups())]
    if not found:
        return {}
    index, names = found[0]
    cells: dict[str, dict[int, list[str]]] = {}
    for row in rows:
        cells.setdefault(row[1], {})[int(row[0])] = [v.strip() for v in row[index].split("/")]
    return {algo: {f"test/{m}": [by_seed[s][i] for s in seeds]
                   for i, m in enumerate(names)}
            for algo, by_seed in cells.items() if sorted(by_seed) == sorted(seeds)}


def redraw(md: Path) -> Path:
    """Redraw ``md``'s metrics plot beside it; returns the plot's path."""
    summary, seeds, sources = read_summary(md.read_text())
    env_id = md.stem.removeprefix("bench_")
    over = (f"mean ± sample std (n - 1) over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    out = md.with_name(f"{md.stem}_metrics.png")
    plot_metrics(summary, out, seeds, title=f"{env_id}, redrawn from {md.name}'s table: {over}")
    for algo, source in sources.items():
        print(f"{algo}: {source}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="bench_<id>.md files")
    for md in parser.parse_args(argv).reports:
        print(f"wrote {redraw(md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
