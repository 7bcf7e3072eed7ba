"""Risk segments from calibrated scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lapse.config import SegmentsConfig, load_config
from lapse.exceptions import ConfigError
from lapse.segments import assign, describe_sizes, percentile, sizes


def test_probability_thresholds_are_inclusive() -> None:
    out = assign([0.6, 0.59, 0.3, 0.29, 1.0, 0.0], SegmentsConfig(method="probability"))
    assert out.to_list() == ["high", "medium", "medium", "low", "high", "low"]
    assert out.name == "risk_segment"


def test_quantile_method_uses_the_reference_distribution() -> None:
    cfg = SegmentsConfig(method="quantile", high=0.9, medium=0.5)
    ref = np.arange(100) / 100  # percentiles are easy to read off
    assert assign([0.95, 0.6, 0.2], cfg, reference=ref).to_list() == ["high", "medium", "low"]
    with pytest.raises(ValueError, match="training score distribution"):
        assign([0.5], cfg)
    assert percentile([-1.0, 2.0], ref).tolist() == [0.0, 1.0]


def test_a_score_equal_to_reference_scores_to_float_rounding_ties_with_them() -> None:
    """Users whose features equal training rows' score what those rows scored; the same
    score summed in another order differs in its last bits only and keeps its percentile
    and segment (ten tied reference scores at 0.3: 1% of the reference either way)."""
    ref = np.concatenate([np.arange(990) / 1000 + 0.4, np.full(10, 0.3)])
    tied = [0.3, np.nextafter(0.3, 0.0), np.nextafter(0.3, 1.0)]
    assert percentile(tied, ref).tolist() == [0.01, 0.01, 0.01]
    assert percentile([0.3 * (1 - 1e-9)], ref).tolist() == [0.0]  # a different score
    cfg = SegmentsConfig(method="quantile", high=0.005, medium=0.001)
    assert assign(tied, cfg, reference=ref).to_list() == ["high"] * 3


def test_the_default_is_the_top_10_and_next_20_percent_of_the_reference_exactly() -> None:
    ref = np.sort(np.random.default_rng(1).uniform(size=1000))
    got = sizes(assign(ref, SegmentsConfig(), reference=ref))
    assert got == {"high": 100, "medium": 200, "low": 700}
    # the boundaries: the 900th score is medium, the 901st high; the 700th low, the 701st medium
    seg = assign(ref[[699, 700, 899, 900]], SegmentsConfig(), reference=ref).to_list()
    assert seg == ["low", "medium", "medium", "high"]


def test_a_population_where_70_percent_lapse_still_splits_10_20_70() -> None:
    """Calibrated risks averaging 0.7: fixed cut-offs put most users in high, ranks do not."""
    rng = np.random.default_rng(0)
    training = np.sort(rng.beta(7, 3, size=5000))  # the bundle's training scores, mean ~0.7
    tonight = rng.beta(7, 3, size=4000)  # a new population like it
    assert 0.68 < tonight.mean() < 0.72

    ranked = sizes(assign(tonight, SegmentsConfig(), reference=training))
    shares = {k: v / tonight.size for k, v in ranked.items()}
    assert shares["high"] == pytest.approx(0.10, abs=0.015)
    assert shares["medium"] == pytest.approx(0.20, abs=0.02)
    assert shares["low"] == pytest.approx(0.70, abs=0.02)

    fixed = sizes(assign(tonight, SegmentsConfig(method="probability"), reference=training))
    assert fixed["high"] / tonight.size > 0.75  # what a campaign cannot use


def test_sizes_name_every_segment_and_describe_their_shares() -> None:
    counts = sizes(pl.Series(["low", "low", "high", "low"]))
    assert list(counts) == ["high", "medium", "low"] and counts["medium"] == 0
    assert describe_sizes(counts) == "high 1 (25.0%), medium 0 (0.0%), low 3 (75.0%)"
    assert sizes(pl.Series([], dtype=pl.String)) == {"high": 0, "medium": 0, "low": 0}


def test_cut_offs_without_a_method_are_refused_and_probability_has_its_own_defaults(
    tmp_path: Path,
) -> None:
    assert SegmentsConfig().model_dump() == {"method": "quantile", "high": 0.9, "medium": 0.7}
    prob = SegmentsConfig(method="probability")
    assert (prob.high, prob.medium) == (0.6, 0.3)
    assert SegmentsConfig(method="probability", high=0.8).medium == 0.3
    path = tmp_path / "lapse.yaml"
    path.write_text("segments:\n  high: 0.6\n  medium: 0.3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"segments: .*name the method"):
        load_config(path)
    path.write_text("segments:\n  method: quantile\n  high: 0.5\n  medium: 0.8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'medium' must not exceed 'high'"):
        load_config(path)
