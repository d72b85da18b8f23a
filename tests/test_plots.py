"""The bench's metrics figure (points with error bars; one seed claims no std) and the redraw
of a committed report's figure from its table (benchmarks/redraw_metrics.py)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

from refit_gym.training.bench import plot_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import redraw_metrics

SUMMARY = {"pretrained": {"test/ndcg@20": (0.10, 0.01), "test/recall@20": (0.20, 0.02)},
           "refit": {"test/ndcg@20": (0.12, 0.03), "test/recall@20": (0.25, 0.04)},
           "pop": {"test/ndcg@20": (0.05, 0.0), "test/recall@20": (0.09, 0.0)}}


def bars(ax) -> list[tuple[float, float] | None]:
    """Each point's error bar on ``ax`` as (bottom, top), None for a point without one."""
    out = []
    for container in ax.containers:
        if not container.has_yerr:
            out.append(None)
            continue
        (bottom, top), = [(s[0][1], s[1][1]) for s in container.lines[2][0].get_segments()]
        out.append((bottom, top))
    return out


def test_several_seeds_draw_a_point_and_an_error_bar_of_the_std(tmp_path: Path) -> None:
    out = tmp_path / "metrics.png"
    fig = plot_metrics(SUMMARY, out, seeds=[1, 2, 3], title="redrawn")
    assert out.read_bytes()[:4] == b"\x89PNG"
    ndcg, hits = fig.axes
    assert ndcg.get_title() == "test ndcg@20 (mean ± std over seeds)"
    assert hits.get_title() == "test recall@20 (mean ± std over seeds)"  # the hits metric
    assert fig.get_suptitle() == "redrawn"
    assert [t.get_text() for t in ndcg.get_xticklabels()] == ["pretrained", "refit", "pop"]
    assert bars(ndcg) == [pytest.approx(b) for b in ((0.09, 0.11), (0.09, 0.15), (0.05, 0.05))]
    assert bars(hits) == [pytest.approx(b) for b in ((0.18, 0.22), (0.21, 0.29), (0.09, 0.09))]
    assert not ndcg.patches  # points, not bars
    low, high = ndcg.get_ylim()
    assert low < 0.05 and high > 0.15  # every bar inside the axis


def test_one_seed_draws_no_error_bar_and_claims_no_std(tmp_path: Path) -> None:
    one = {algo: {k: (mean, 0.0) for k, (mean, _) in entry.items()}
           for algo, entry in SUMMARY.items()}
    fig = plot_metrics(one, tmp_path / "metrics.png", seeds=[7])
    for ax in fig.axes:
        assert bars(ax) == [None, None, None]
        assert "±" not in ax.get_title() and "std" not in ax.get_title()
        assert "seed 7" in ax.get_title()
    assert not fig.get_suptitle()


REPORT = """# ReFiT-X-v0: mean ± std over seeds 1, 2, 3

Command: `refit-gym bench --env ReFiT-X-v0 --seeds 1,2,3`

| algo | valid/hr@20 | valid/ndcg@20 | test/hr@20 | test/ndcg@20 | wall s |
|---|---|---|---|---|---|
| pretrained | 0.5000 ± 0.1000 | 0.3000 ± 0.1000 | 0.2000 ± 0.0300 | 0.1000 ± 0.0200 | 10 ± 1 |
| pop | 0.4000 ± 0.0000 | 0.2000 ± 0.0000 | 0.1500 ± 0.0000 | 0.0500 ± 0.0000 | 1 ± 0 |
"""


def test_a_population_std_table_is_read_as_the_sample_std(tmp_path: Path) -> None:
    summary, seeds, sources = redraw_metrics.read_summary(REPORT)
    assert seeds == [1, 2, 3]
    assert list(summary) == ["pretrained", "pop"]
    factor = math.sqrt(3 / 2)  # sample = population * sqrt(n / (n - 1))
    assert summary["pretrained"]["test/hr@20"] == pytest.approx((0.2, 0.03 * factor))
    assert summary["pretrained"]["test/ndcg@20"] == pytest.approx((0.1, 0.02 * factor))
    assert summary["pop"]["test/ndcg@20"] == (0.05, 0.0)
    assert "valid/hr@20" not in summary["pretrained"]
    assert "population" in sources["pretrained"]
    # A report the bench wrote since it prints the sample std (it has a Cells section): as is.
    summary, _, sources = redraw_metrics.read_summary(REPORT + "\n## Cells\n\n| seed |\n")
    assert summary["pretrained"]["test/hr@20"] == pytest.approx((0.2, 0.03))
    assert sources["pretrained"] == "the table"
    # The seeds from a "(seeds 1-3)" title; the redraw writes <stem>_metrics.png beside it.
    md = tmp_path / "bench_ReFiT-X-v0.md"
    md.write_text(REPORT.replace(": mean ± std over seeds 1, 2, 3", " (seeds 1-3)"))
    assert redraw_metrics.redraw(md) == tmp_path / "bench_ReFiT-X-v0_metrics.png"
    assert (tmp_path / "bench_ReFiT-X-v0_metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_per_seed_values_give_the_sample_std_after_matching_the_table() -> None:
    hr, ndcg = [0.18, 0.20, 0.23], [0.080, 0.100, 0.120]
    table = (REPORT.replace("0.2000 ± 0.0300", f"{statistics.mean(hr):.4f} ± "
                            f"{statistics.pstdev(hr):.4f}")
             .replace("0.1000 ± 0.0200", f"0.1000 ± {statistics.pstdev(ndcg):.4f}"))
    per_seed = ("\n| seed | algo | selected | test hr@20 / ndcg@20 (own sampler) | x start |\n"
                "|---|---|---|---|---|\n" + "".join(
                    f"| {seed} | pretrained | 3 | {h:.4f} / {n:.5f} | 1.00 |\n"
                    for seed, h, n in zip((1, 2, 3), hr, ndcg)))
    summary, _, sources = redraw_metrics.read_summary(table + per_seed)
    assert summary["pretrained"]["test/hr@20"] == pytest.approx(
        (statistics.mean(hr), statistics.stdev(hr)))
    assert summary["pretrained"]["test/ndcg@20"] == pytest.approx((0.1, 0.02))  # stdev
    assert sources["pretrained"] == "the per-seed table"
    assert sources["pop"] != sources["pretrained"]  # no per-seed rows: the table's std
    # Per-seed values that are not the table's (here its sample std) are refused.
    with pytest.raises(ValueError, match="pretrained test/ndcg@20: the per-seed values"):
        redraw_metrics.read_summary(table.replace(f"± {statistics.pstdev(ndcg):.4f}",
                                                  "± 0.0200") + per_seed)
