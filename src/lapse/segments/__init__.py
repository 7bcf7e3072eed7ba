"""Churn-risk segments (``high`` / ``medium`` / ``low``) from calibrated scores."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import SegmentsConfig

__all__ = ["SEGMENTS", "assign", "describe_sizes", "percentile", "sizes"]

SEGMENTS: Final = ("high", "medium", "low")


#: A reference score this close to a score (relative) counts as equal to it: users whose
#: features equal training rows' tie with their scores, and the same score summed in
#: another order (or on another machine) differs in its last bits only.
TIE_TOLERANCE: Final = 1e-12


def percentile(scores: npt.ArrayLike, reference: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Share of ``reference`` scores at or below each score, in [0, 1] (equal to float
    rounding counts as equal: :data:`TIE_TOLERANCE`).

    Examples
    --------
    >>> percentile([0.1, 0.5, 0.9], [0.2, 0.4, 0.6, 0.8]).tolist()
    [0.0, 0.5, 1.0]
    >>> percentile([0.39999999999999997, 0.4 * (1 - 1e-9)], [0.2, 0.4, 0.6, 0.8]).tolist()
    [0.5, 0.25]
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("the reference distribution is empty")
    s = np.asarray(scores, dtype=np.float64)
    at_most = s + np.abs(s) * TIE_TOLERANCE
    out: npt.NDArray[np.float64] = np.searchsorted(ref, at_most, side="right") / ref.size
    return out


def assign(
    churn_risk: npt.ArrayLike,
    config: SegmentsConfig,
    *,
    reference: npt.ArrayLike | None = None,
) -> pl.Series:
    """``risk_segment`` per row.

    With ``method: quantile`` (the default) the score's percentile in
    ``reference`` (the training score distribution the bundle keeps) is compared
    with ``high`` and ``medium``, strictly: above 0.9 is the top 10% of the
    reference, above 0.7 the next 20%, whatever the base rate (tied scores share
    a segment). With ``method: probability`` the calibrated churn probability
    itself is, inclusively.

    Examples
    --------
    >>> from lapse.config import SegmentsConfig
    >>> assign([0.7, 0.4, 0.1], SegmentsConfig(method="probability")).to_list()
    ['high', 'medium', 'low']
    >>> ref = [i / 10 for i in range(10)]  # 0.0 .. 0.9
    >>> assign([0.9, 0.8, 0.7, 0.0], SegmentsConfig(), reference=ref).to_list()
    ['high', 'medium', 'medium', 'low']
    """
    p = np.asarray(churn_risk, dtype=np.float64)
    if config.method == "quantile":
        if reference is None:
            raise ValueError("segments.method 'quantile' needs the training score distribution")
        q = percentile(p, reference)
        seg = np.where(q > config.high, "high", np.where(q > config.medium, "medium", "low"))
    else:
        seg = np.where(p >= config.high, "high", np.where(p >= config.medium, "medium", "low"))
    return pl.Series("risk_segment", seg, dtype=pl.String)


def sizes(segments: pl.Series) -> dict[str, int]:
    """Users per segment, ``high``, ``medium``, ``low`` first (every one, zeros included).

    Examples
    --------
    >>> sizes(pl.Series(["low", "high", "low"]))
    {'high': 1, 'medium': 0, 'low': 2}
    """
    counts = dict(segments.value_counts().iter_rows())
    out = {s: int(counts.pop(s, 0)) for s in SEGMENTS}
    return out | {str(k): int(v) for k, v in sorted(counts.items())}


def describe_sizes(counts: dict[str, int]) -> str:
    """``high 437 (10.0%), medium 874 (20.0%), low 3,061 (70.0%)``.

    Examples
    --------
    >>> describe_sizes({"high": 1, "medium": 1, "low": 2})
    'high 1 (25.0%), medium 1 (25.0%), low 2 (50.0%)'
    """
    total = sum(counts.values())
    return ", ".join(
        f"{s} {n:,} ({n / total:.1%})" if total else f"{s} 0" for s, n in counts.items()
    )
