"""The bench's metrics figure: points with error bars of the std; one seed claims no std."""

from __future__ import annotations

from pathlib import Path

import pytest

from refit_gym.training.bench import plot_metrics

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
