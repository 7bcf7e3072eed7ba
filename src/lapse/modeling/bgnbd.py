"""BG/NBD (Fader, Hardie & Lee 2005), fitted by maximum likelihood with SciPy.

Each customer buys as a Poisson process with rate ``lambda ~ Gamma(r, alpha)``
and, after each repeat transaction, drops out with probability
``p ~ Beta(a, b)``. The summary per customer is ``x`` (repeat transactions),
``t_x`` (time of the last one since the first) and ``T`` (age at the cutoff).

lapse counts a transaction per distinct UTC day with qualifying activity
(``labels.activity_roles``; on a transaction table, the purchase days, also
with ``source.order_id``: on Online Retail days ranked churn at least as well
as orders), in days, and scores churn as ``1 - P(at least one transaction in the horizon)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import FitWarning
from lapse.labels import activity_events
from lapse.modeling.params import ParamsMixin

__all__ = ["BGNBD", "BTYD_COLUMNS", "btyd_arrays", "rfm_summary"]

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

BTYD_COLUMNS = ("btyd_frequency", "btyd_recency_days", "btyd_age_days")


def rfm_summary(
    events: pl.LazyFrame, cutoffs: Sequence[datetime], config: LapseConfig
) -> pl.DataFrame:
    """``user_id, cutoff, btyd_frequency, btyd_recency_days, btyd_age_days``.

    One row per user with qualifying activity strictly before each cutoff:
    repeat active days, days from the first to the last active day, days from
    the first active day to the cutoff.

    One cutoff (a score) counts each user's active days in 64-day bitmasks over
    the events before it; several (training) group the active days once and
    filter them per cutoff. The rows are the same.
    """
    activity = activity_events(events, config)
    if len(set(cutoffs)) == 1:
        return _summary(_active_span_one(activity, cutoffs[0]), cutoffs[0]).collect()
    days = (
        activity.group_by("user_id", pl.col("ts").dt.truncate("1d").alias("day"))
        .agg(pl.col("ts").min().alias("_at"))  # a day counts from its first activity on
        .collect()
    )
    parts = []
    for cutoff in sorted(set(cutoffs)):
        span = (
            days.lazy()
            .filter(pl.col("_at") < cutoff)
            .group_by("user_id")
            .agg(
                pl.len().alias("_days"),
                pl.col("day").min().alias("_first"),
                pl.col("day").max().alias("_last"),
            )
        )
        parts.append(_summary(span, cutoff))
    if not parts:
        raise ValueError("cutoffs is empty")
    return pl.concat(parts).sort("cutoff", "user_id").collect()


_WORD = 64


def _active_span_one(activity: pl.LazyFrame, cutoff: datetime) -> pl.LazyFrame:
    """``user_id, _days, _first, _last``: active days before ``cutoff``, first and last
    (00:00 UTC), with distinct days counted as set bits of per-user 64-day bitmasks
    (a group per user and block, not per user and day)."""
    day = pl.col("ts").dt.epoch("d").cast(pl.Int64)
    block = day // _WORD
    bit = pl.lit(2, dtype=pl.UInt64).pow((day - block * _WORD).cast(pl.UInt64))
    return (
        activity.filter(pl.col("ts") < cutoff)
        .group_by("user_id", block.alias("_block"))
        .agg(
            bit.bitwise_or().alias("_bits"),
            pl.col("ts").min().alias("_min"),
            pl.col("ts").max().alias("_max"),
        )
        .group_by("user_id")
        .agg(
            pl.col("_bits").bitwise_count_ones().sum().cast(pl.UInt32).alias("_days"),
            pl.col("_min").min().dt.truncate("1d").alias("_first"),
            pl.col("_max").max().dt.truncate("1d").alias("_last"),
        )
    )


def _summary(span: pl.LazyFrame, cutoff: datetime) -> pl.LazyFrame:
    """:func:`rfm_summary`'s rows at ``cutoff`` from ``user_id, _days, _first, _last``."""
    days = pl.col("_last") - pl.col("_first")
    return (
        span.with_columns(
            (pl.col("_days") - 1).cast(pl.Float64).alias("btyd_frequency"),
            (days.dt.total_seconds() / 86400.0).alias("btyd_recency_days"),
            pl.lit(cutoff).dt.cast_time_unit("us").dt.convert_time_zone("UTC").alias("cutoff"),
        )
        .with_columns(
            ((pl.col("cutoff") - pl.col("_first")).dt.total_seconds() / 86400.0).alias(
                "btyd_age_days"
            )
        )
        .select("user_id", "cutoff", *BTYD_COLUMNS)
        .sort("cutoff", "user_id")
    )


def btyd_arrays(frame: pl.DataFrame) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(x, t_x, T)`` from a frame's ``btyd_*`` columns; a user without any (no
    qualifying activity yet) counts as ``(0, 0, 0)``."""
    x, t_x, age = (frame[c].cast(pl.Float64).fill_null(0.0).to_numpy() for c in BTYD_COLUMNS)
    return x, t_x, age


def _arrays(
    x: ArrayLike, t_x: ArrayLike, age: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    xa = np.asarray(x, dtype=np.float64)
    ta = np.asarray(t_x, dtype=np.float64)
    aa = np.asarray(age, dtype=np.float64)
    if not (xa.shape == ta.shape == aa.shape):
        raise ValueError("frequency, recency and age must have the same length")
    return xa, ta, aa


def _log_likelihood(
    params: FloatArray, x: FloatArray, t_x: FloatArray, age: FloatArray
) -> FloatArray:
    """Per-customer log-likelihood of BG/NBD (FHL 2005, eq. 6)."""
    from scipy.special import betaln, gammaln

    r, alpha, a, b = params
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = betaln(a, b + x) - betaln(a, b) - (r + x) * np.log(alpha + age)
    repeat = x > 0
    a3 = np.full_like(x, -np.inf)
    xr = x[repeat]
    a3[repeat] = betaln(a + 1, b + xr - 1) - betaln(a, b) - (r + xr) * np.log(alpha + t_x[repeat])
    out: FloatArray = a1 + np.logaddexp(a2, a3)
    return out


class BGNBD(ParamsMixin):
    """BG/NBD customer-base model.

    Parameters
    ----------
    penalizer
        L2 penalty on the log parameters (0: plain maximum likelihood).
    max_iter
        L-BFGS-B iteration limit.

    Attributes
    ----------
    params_ : dict[str, float]
        ``r``, ``alpha``, ``a``, ``b``.
    converged_ : bool
    fallback_ : bool
        True when the fit failed and a no-dropout NBD fallback is used.
    log_likelihood_ : float
        Mean log-likelihood at the optimum.
    typical_ : dict[str, float]
        The fitted customers' medians: ``frequency`` (repeat transactions) and
        ``days_since`` (``T - t_x``, time since the last transaction); reasons
        move a customer's values to these.

    Examples
    --------
    >>> m = BGNBD().fit([0, 2, 5, 1], [0.0, 20.0, 60.0, 5.0], [30.0, 70.0, 80.0, 60.0])
    >>> 0.0 < float(m.p_alive([2], [20.0], [70.0])[0]) <= 1.0
    True
    """

    def __init__(self, *, penalizer: float = 0.0, max_iter: int = 1000) -> None:
        self.penalizer = penalizer
        self.max_iter = max_iter

    def fit(
        self,
        frequency: ArrayLike,
        recency: ArrayLike,
        age: ArrayLike,
        sample_weight: ArrayLike | None = None,
    ) -> BGNBD:
        """Maximum likelihood on ``(x, t_x, T)``; identical rows are pooled."""
        from scipy.optimize import minimize

        x, t_x, age_a = _arrays(frequency, recency, age)
        if x.size == 0:
            raise ValueError("BG/NBD needs at least one customer")
        if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > age_a + 1e-9):
            raise ValueError("need frequency >= 0 and 0 <= recency <= age")
        with np.errstate(invalid="ignore"):  # infinite ages: NaN, as their fit fails anyway
            self.typical_ = {
                "frequency": float(np.quantile(x, 0.5, method="lower")),
                "days_since": float(np.quantile(age_a - t_x, 0.5, method="lower")),
            }
        w = (
            np.ones_like(x)
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64)
        )
        # pool identical summaries: daily data repeats them a lot
        keys = np.stack([x, np.where(x > 0, t_x, 0.0), age_a], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        wu = np.bincount(inverse.ravel(), weights=w)
        xu, tu, au = uniq[:, 0], uniq[:, 1], uniq[:, 2]
        total = float(wu.sum())
        pen = float(self.penalizer)

        def objective(theta: FloatArray) -> float:
            ll = _log_likelihood(np.exp(theta), xu, tu, au)
            value = -float(np.dot(wu, ll)) / total + pen * float(np.dot(theta, theta))
            return value if np.isfinite(value) else 1e100

        scale = max(float(np.average(au, weights=wu)), 1.0)
        starts = [np.array([0.0, np.log(scale / 10), 0.0, 0.0]), np.zeros(4)]
        best: Any = None
        with np.errstate(all="ignore"):
            for start in starts:
                res = minimize(
                    objective,
                    start,
                    method="L-BFGS-B",
                    bounds=[(-12.0, 12.0)] * 4,
                    options={"maxiter": self.max_iter},
                )
                if best is None or res.fun < best.fun:
                    best = res
        params = np.exp(best.x)
        ok = bool(np.all(np.isfinite(params)) and best.fun < 1e99)
        self.converged_ = bool(best.success) and ok
        self.fallback_ = not ok
        if ok:
            self.params_ = dict(zip(("r", "alpha", "a", "b"), map(float, params), strict=True))
            self.log_likelihood_ = -float(best.fun)
            if not best.success:
                warnings.warn(
                    f"BG/NBD fit did not converge ({best.message}); using the best parameters "
                    "found",
                    FitWarning,
                    stacklevel=2,
                )
        else:
            # no dropout (p -> 0): NBD with gamma moments of the per-customer rate
            rate = (x + 1) / np.maximum(age_a, 1.0)
            mean, var = float(rate.mean()), float(rate.var()) or 1e-6
            r0 = max(mean * mean / var, 1e-3)
            self.params_ = {"r": r0, "alpha": r0 / max(mean, 1e-6), "a": 1e-3, "b": 1e3}
            self.log_likelihood_ = float("nan")
            warnings.warn(
                "BG/NBD maximum likelihood failed; falling back to a no-dropout NBD model "
                "(scores rank by purchase rate only)",
                FitWarning,
                stacklevel=2,
            )
        return self

    def _check(self) -> tuple[float, float, float, float]:
        if not hasattr(self, "params_"):
            raise RuntimeError("BGNBD is not fitted; call fit first")
        p = self.params_
        return p["r"], p["alpha"], p["a"], p["b"]

    def p_alive(self, frequency: ArrayLike, recency: ArrayLike, age: ArrayLike) -> FloatArray:
        """P(customer still active at age ``T`` | x, t_x, T)."""
        r, alpha, a, b = self._check()
        x, t_x, age_a = _arrays(frequency, recency, age)
        with np.errstate(all="ignore"):
            log_ratio = (
                np.log(a)
                - np.log(np.maximum(b + x - 1, 1e-12))
                + (r + x) * (np.log(alpha + age_a) - np.log(alpha + t_x))
            )
            odds = np.where(x > 0, np.exp(np.minimum(log_ratio, 700.0)), 0.0)
        out: FloatArray = 1.0 / (1.0 + odds)
        return out

    def p_any_purchase(
        self, horizon: float, frequency: ArrayLike, recency: ArrayLike, age: ArrayLike
    ) -> FloatArray:
        """P(at least one transaction in ``(T, T + horizon]``).

        Alive at ``T`` with rate ``lambda``, no transaction in the horizon
        means no dropout either, so ``P = P(alive) * (1 - ((alpha+T)/(alpha+T+h))^(r+x))``.
        """
        r, alpha, _, _ = self._check()
        x, t_x, age_a = _arrays(frequency, recency, age)
        stay_quiet = np.exp((r + x) * (np.log(alpha + age_a) - np.log(alpha + age_a + horizon)))
        out: FloatArray = self.p_alive(x, t_x, age_a) * (1.0 - stay_quiet)
        return out

    def expected_purchases(
        self, horizon: float, frequency: ArrayLike, recency: ArrayLike, age: ArrayLike
    ) -> FloatArray:
        """Expected transactions in ``(T, T + horizon]`` given the summary (FHL 2005, eq. 10)."""
        from scipy.special import hyp2f1

        r, alpha, a, b = self._check()
        x, t_x, age_a = _arrays(frequency, recency, age)
        z = horizon / (alpha + age_a + horizon)
        with np.errstate(all="ignore"):
            term = 1.0 - np.exp(
                (r + x) * np.log((alpha + age_a) / (alpha + age_a + horizon))
            ) * hyp2f1(r + x, b + x, a + b + x - 1, z)
            num = (a + b + x - 1) / (a - 1) * term
        out: FloatArray = num * self.p_alive(x, t_x, age_a)
        return out
