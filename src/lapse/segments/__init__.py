"""Churn-risk segments (``high`` / ``medium`` / ``low``) from calibrated scores."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import SegmentsConfig

__all__ = ["SEGMENTS", "assign", "percentile"]

SEGMENTS: Final = ("high", "medium", "low")


def percentile(scores: npt.ArrayLike, reference: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Share of ``reference`` scores at or below each score, in [0, 1].

    Examples
    --------
    >>> percentile([0.1, 0.5, 0.9], [0.2, 0.4, 0.6, 0.8]).tolist()
    [0.0, 0.5, 1.0]
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("the reference distribution is empty")
    s = np.asarray(scores, dtype=np.float64)
    out: npt.NDArray[np.float64] = np.searchsorted(ref, s, side="right") / ref.size
    return out


def assign(
    churn_risk: npt.ArrayLike,
    config: SegmentsConfig,
    *,
    reference: npt.ArrayLike | None = None,
) -> pl.Series:
    """``risk_segment`` per row.

    With ``method: probability`` the calibrated churn probability is compared
    with ``high`` and ``medium``; with ``method: quantile`` its percentile in
    ``reference`` (the training score distribution the bundle keeps) is.

    Examples
    --------
    >>> from lapse.config import SegmentsConfig
    >>> assign([0.7, 0.4, 0.1], SegmentsConfig()).to_list()
    ['high', 'medium', 'low']
    """
    p = np.asarray(churn_risk, dtype=np.float64)
    if config.method == "quantile":
        if reference is None:
            raise ValueError("segments.method 'quantile' needs the training score distribution")
        p = percentile(p, reference)
    seg = np.where(p >= config.high, "high", np.where(p >= config.medium, "medium", "low"))
    return pl.Series("risk_segment", seg, dtype=pl.String)
