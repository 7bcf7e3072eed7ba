"""Risk segments from calibrated scores."""

from __future__ import annotations

import numpy as np
import pytest

from lapse.config import SegmentsConfig
from lapse.segments import assign, percentile


def test_probability_thresholds_are_inclusive() -> None:
    out = assign([0.6, 0.59, 0.3, 0.29, 1.0, 0.0], SegmentsConfig())
    assert out.to_list() == ["high", "medium", "medium", "low", "high", "low"]
    assert out.name == "risk_segment"


def test_quantile_method_uses_the_reference_distribution() -> None:
    cfg = SegmentsConfig(method="quantile", high=0.9, medium=0.5)
    ref = np.arange(100) / 100  # percentiles are easy to read off
    assert assign([0.95, 0.6, 0.2], cfg, reference=ref).to_list() == ["high", "medium", "low"]
    with pytest.raises(ValueError, match="training score distribution"):
        assign([0.5], cfg)
    assert percentile([-1.0, 2.0], ref).tolist() == [0.0, 1.0]
