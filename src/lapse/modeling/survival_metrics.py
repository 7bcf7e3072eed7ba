"""Evaluation of time-to-next-order predictions under right-censoring.

``durations`` are the observed times (to the reorder, or to the end of the
follow-up when ``observed`` is false); ``surv`` is the predicted probability
of *no* reorder by a time. Brier scores weight by the inverse probability of
censoring (Graf et al. 1999), with the censoring distribution from
Kaplan-Meier, so censored rows are neither dropped nor counted as misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "HORIZONS",
    "METRIC_NAMES",
    "brier",
    "calibration_error",
    "concordance",
    "integrated_brier",
    "kaplan_meier",
    "survival_metrics",
]

FloatArray = npt.NDArray[np.float64]
HORIZONS: Final = (7, 14, 30)
METRIC_NAMES: Final = ("concordance", "mae_days", "ibs", "brier_7d", "brier_14d", "brier_30d", "n")


def kaplan_meier(
    durations: npt.ArrayLike, observed: npt.ArrayLike, times: npt.ArrayLike
) -> FloatArray:
    """Kaplan-Meier survival at ``times`` (right-continuous: S(t) counts events at t)."""
    d = np.asarray(durations, dtype=np.float64)
    e = np.asarray(observed, dtype=bool)
    q = np.asarray(times, dtype=np.float64)
    if d.size == 0:
        return np.ones_like(q)
    uniq, first = np.unique(np.sort(d), return_index=True)
    at_risk = d.size - first
    deaths = np.bincount(np.searchsorted(uniq, d[e]), minlength=uniq.size)
    surv = np.cumprod(1.0 - deaths / at_risk)
    idx = np.searchsorted(uniq, q, side="right")
    out: FloatArray = np.where(idx > 0, surv[np.maximum(idx - 1, 0)], 1.0)
    return out


def concordance(
    durations: npt.ArrayLike, observed: npt.ArrayLike, predicted: npt.ArrayLike
) -> float:
    """Harrell's C of predicted times (longer = later reorder); NaN without a usable pair."""
    from lifelines.utils import concordance_index

    e = np.asarray(observed, dtype=bool)
    if not e.any():
        return float("nan")
    try:
        return float(concordance_index(durations, predicted, e))
    except ZeroDivisionError:  # no admissible pairs
        return float("nan")


def _brier_at(
    d: FloatArray, e: npt.NDArray[np.bool_], surv: FloatArray, times: FloatArray
) -> FloatArray:
    """IPCW Brier scores at each of ``times`` (``surv``: one column per time); the censoring
    curve is estimated once for all of them."""
    g_t = kaplan_meier(d, ~e, times)[None, :]
    g_before = kaplan_meier(d, ~e, np.maximum(d - 1e-9, 0.0))[:, None]
    event = (d[:, None] <= times[None, :]) & e[:, None]
    alive = d[:, None] > times[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        w_event = np.where(event, 1.0 / g_before, 0.0)
        w_alive = np.where(g_t > 0, 1.0 / g_t, 0.0)
    score = w_event * surv**2 + np.where(alive, w_alive, 0.0) * (1.0 - surv) ** 2
    out: FloatArray = np.nan_to_num(score).mean(axis=0)
    return out


def brier(
    durations: npt.ArrayLike, observed: npt.ArrayLike, surv_at_t: npt.ArrayLike, t: float
) -> float:
    """IPCW Brier score at ``t`` of predicted ``P(no reorder by t)``."""
    d = np.asarray(durations, dtype=np.float64)
    s = np.asarray(surv_at_t, dtype=np.float64)[:, None]
    return float(_brier_at(d, np.asarray(observed, dtype=bool), s, np.array([float(t)]))[0])


def integrated_brier(
    durations: npt.ArrayLike, observed: npt.ArrayLike, surv: FloatArray, times: Sequence[float]
) -> float:
    """Brier score integrated over ``times`` (trapezoid) and divided by their span."""
    tt = np.asarray(times, dtype=np.float64)
    d = np.asarray(durations, dtype=np.float64)
    scores = _brier_at(d, np.asarray(observed, dtype=bool), np.asarray(surv, np.float64), tt)
    if tt.size == 1:
        return float(scores[0])
    area = float(np.sum((scores[1:] + scores[:-1]) * np.diff(tt)) / 2.0)
    return area / float(tt[-1] - tt[0])


def calibration_error(
    durations: npt.ArrayLike,
    observed: npt.ArrayLike,
    p_within: npt.ArrayLike,
    t: float,
    n_bins: int = 10,
) -> tuple[float, FloatArray, FloatArray]:
    """``(ece, mean predicted, observed)`` of ``P(reorder within t)`` over equal-frequency bins.

    The observed share per bin is ``1 - KM(t)`` of the bin's rows, so censoring
    before ``t`` is handled.
    """
    d = np.asarray(durations, dtype=np.float64)
    e = np.asarray(observed, dtype=bool)
    p = np.asarray(p_within, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    parts = [i for i in np.array_split(order, min(n_bins, max(p.size, 1))) if i.size]
    pred = np.array([p[i].mean() for i in parts])
    obs = np.array([1.0 - kaplan_meier(d[i], e[i], [t])[0] for i in parts])
    sizes = np.array([i.size for i in parts], dtype=np.float64)
    ece = float(np.sum(sizes * np.abs(pred - obs)) / max(sizes.sum(), 1.0))
    return ece, pred, obs


def survival_metrics(
    durations: npt.ArrayLike,
    observed: npt.ArrayLike,
    median_days: npt.ArrayLike,
    surv: FloatArray,
    times: Sequence[float],
) -> dict[str, float]:
    """The pinned metrics of one model (:data:`METRIC_NAMES`) plus ``cal_{h}d``.

    ``surv`` holds ``P(no reorder by t)`` at ``times``, which must include
    every horizon of :data:`HORIZONS`. ``median_days`` is each model's point
    estimate of the days to the reorder (for the survival models the median
    among the episodes that reorder within the follow-up window, see
    :mod:`lapse.train.replenishment`); ``mae_days`` compares it with the observed
    reorders only, and ``concordance`` ranks by it.
    """
    d = np.asarray(durations, dtype=np.float64)
    e = np.asarray(observed, dtype=bool)
    m = np.asarray(median_days, dtype=np.float64)
    tt = [float(t) for t in times]
    out: dict[str, float] = {
        "concordance": concordance(d, e, m),
        "mae_days": float(np.mean(np.abs(m[e] - d[e]))) if e.any() else float("nan"),
        "ibs": integrated_brier(d, e, surv, tt),
    }
    for h in HORIZONS:
        k = tt.index(float(h))
        out[f"brier_{h}d"] = brier(d, e, surv[:, k], h)
        out[f"cal_{h}d"] = calibration_error(d, e, 1.0 - surv[:, k], h)[0]
    out["n"] = float(d.size)
    return out
