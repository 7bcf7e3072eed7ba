"""Time-to-next-order models: lifelines AFT and Cox fits, and two deterministic baselines.

Every model predicts, for an episode that has already lasted ``elapsed`` days
without a reorder, the conditional survival ``S(elapsed + t) / S(elapsed)``
(the chance of *no* reorder within ``t`` more days) and a point estimate of
the remaining days: the conditional median, or with ``horizon=H`` the median
among the episodes that reorder within ``H`` more days (solves
``F(t) = F(H) / 2`` for the conditional distribution function ``F``; see
:meth:`SurvivalModel.predict_median`). The baselines are point estimates
already and ignore ``horizon``. Predictions use closed forms (AFT) or the
Breslow baseline hazard (Cox), vectorised with NumPy: lifelines is only
used to fit, never to predict (its Cox ``predict_median`` does not scale).

Candidates (:data:`CANDIDATES`): ``weibull_aft``, ``lognormal_aft``,
``loglogistic_aft`` and ``cox_ph`` (:class:`SurvivalModel`); baselines
``depletion_rule`` (:class:`DepletionRule`) and ``last_gap`` (:class:`LastGap`).

Covariates are turned into a design matrix once per fit: non-negative
columns take ``log1p``, nulls get the training median plus a ``__missing``
indicator, and everything is standardised; all-null and constant columns
are dropped (``dropped_`` says why).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.exceptions import ConvergenceProblem, LapseError
from lapse.modeling.params import ParamsMixin

__all__ = [
    "BASELINES",
    "CANDIDATES",
    "ConvergenceProblem",
    "DepletionRule",
    "LastGap",
    "Predictor",
    "SurvivalModel",
    "km_median",
]

FloatArray = npt.NDArray[np.float64]
Kind = Literal["weibull_aft", "lognormal_aft", "loglogistic_aft", "cox_ph"]
CANDIDATES: Final[tuple[Kind, ...]] = ("weibull_aft", "lognormal_aft", "loglogistic_aft", "cox_ph")
BASELINES: Final = ("depletion_rule", "last_gap")
_LN2: Final = math.log(2.0)
_TINY: Final = 1e-12


class Predictor(Protocol):
    """What every replenishment model offers (``elapsed``: days already without a reorder)."""

    def predict_median(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, horizon: float | None = None
    ) -> FloatArray: ...

    def predict_survival(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, times: Sequence[float]
    ) -> FloatArray: ...


def _elapsed(elapsed: npt.ArrayLike, n: int) -> FloatArray:
    a = np.broadcast_to(np.asarray(elapsed, dtype=np.float64), (n,)).copy()
    if np.any(~np.isfinite(a)) or np.any(a < 0):
        raise ValueError("elapsed days must be finite and >= 0")
    return a


def km_median(durations: npt.ArrayLike, observed: npt.ArrayLike) -> float:
    """Kaplan-Meier median of ``durations``; the longest duration when S never reaches 0.5."""
    t = np.asarray(durations, dtype=np.float64)
    e = np.asarray(observed, dtype=bool)
    if t.size == 0:
        raise ValueError("no durations")
    times, first = np.unique(np.sort(t), return_index=True)
    at_risk = t.size - first
    deaths = np.bincount(np.searchsorted(times, t[e]), minlength=times.size)
    surv = np.cumprod(1.0 - deaths / at_risk)
    below = np.flatnonzero(surv <= 0.5)
    return float(times[below[0]] if below.size else times[-1])


# -- design matrix ---------------------------------------------------------------------


def _matrix(frame: pl.DataFrame, columns: Sequence[str]) -> FloatArray:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LapseError(
            f"survival model: covariates {missing} are missing from the episode rows; "
            "build them with the same config the model was trained with"
        )
    if not columns:
        return np.empty((frame.height, 0))
    x = frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()
    out: FloatArray = np.asarray(x, dtype=np.float64)
    return out


class _Design:
    """Fitted covariate transform: log1p, median imputation with indicators, scaling."""

    def __init__(self, frame: pl.DataFrame, columns: Sequence[str]) -> None:
        x = _matrix(frame, columns)
        self.columns = list(columns)
        self.dropped: dict[str, str] = {}
        self.log: list[bool] = []
        self.fill: list[float] = []
        self.indicator: list[bool] = []
        keep: list[int] = []
        for j, name in enumerate(columns):
            col = x[:, j]
            ok = np.isfinite(col)
            if not ok.any():
                self.dropped[name] = "no values"
                continue
            keep.append(j)
            self.log.append(bool(col[ok].min() >= 0))
            vals = np.log1p(col[ok]) if self.log[-1] else col[ok]
            self.fill.append(float(np.median(vals)))
            self.indicator.append(bool((~ok).any()))
        self.keep = keep
        z, names = self._raw(x)
        self.mean = z.mean(axis=0) if z.shape[0] else np.zeros(z.shape[1])
        std = z.std(axis=0) if z.shape[0] else np.ones(z.shape[1])
        const = std < 1e-9
        for name in np.asarray(names)[const]:
            self.dropped[str(name)] = "constant"
        self.use = ~const
        self.std = np.where(const, 1.0, std)
        self.names = [n for n, u in zip(names, self.use, strict=True) if u]

    def _raw(self, x: FloatArray) -> tuple[FloatArray, list[str]]:
        cols: list[FloatArray] = []
        names: list[str] = []
        for k, j in enumerate(self.keep):
            col = x[:, j]
            ok = np.isfinite(col)
            vals = np.where(ok, col, 0.0)
            if self.log[k]:
                vals = np.log1p(np.maximum(vals, 0.0))
            cols.append(np.where(ok, vals, self.fill[k]))
            names.append(self.columns[j])
            if self.indicator[k]:
                cols.append((~ok).astype(np.float64))
                names.append(f"{self.columns[j]}__missing")
        z = np.column_stack(cols) if cols else np.empty((x.shape[0], 0))
        return z, names

    def transform(self, frame: pl.DataFrame) -> FloatArray:
        z, _ = self._raw(_matrix(frame, self.columns))
        out: FloatArray = ((z - self.mean) / self.std)[:, self.use]
        return out


def _diagnose(z: FloatArray, names: list[str], kind: str, penalizer: float, cause: str) -> str:
    """A sentence naming the covariate most likely behind a failed fit."""
    fix = (
        f"drop it from the covariates, or raise replenishment.penalizer (now {penalizer}); "
        f"lifelines said: {cause}"
    )
    if z.shape[1] == 0:
        return f"{kind} did not converge with no covariates; {fix}"
    if z.shape[1] > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.asarray(np.nan_to_num(np.corrcoef(z, rowvar=False)), dtype=np.float64)
        np.fill_diagonal(corr, 0.0)
        i, j = np.unravel_index(int(np.argmax(np.abs(corr))), corr.shape)
        if abs(corr[i, j]) > 0.98:
            return (
                f"{kind} did not converge: covariate {names[j]!r} is collinear with "
                f"{names[i]!r} (correlation {corr[i, j]:.3f}); {fix}"
            )
        try:
            vif = np.diag(np.linalg.inv(corr + np.eye(len(names))))
        except np.linalg.LinAlgError:
            vif = np.full(len(names), np.inf)
        worst = int(np.argmax(vif))
        return (
            f"{kind} did not converge: covariate {names[worst]!r} has the largest variance "
            f"inflation ({vif[worst]:.1f}); {fix}"
        )
    return f"{kind} did not converge on covariate {names[0]!r}; {fix}"


# -- the lifelines models ----------------------------------------------------------------


class SurvivalModel(ParamsMixin):
    """A lifelines survival regression, predicted with vectorised closed forms.

    Parameters
    ----------
    kind
        One of :data:`CANDIDATES`.
    penalizer
        L2 penalty on the (standardised) coefficients.
    columns
        Covariates to use; ``None`` takes every numeric column of ``frame``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=300)
    >>> t = np.exp(2.0 + 0.5 * x + 0.3 * rng.normal(size=300))
    >>> m = SurvivalModel("weibull_aft").fit(pl.DataFrame({"x": x}), t, np.ones(300))
    >>> bool(m.predict_median(pl.DataFrame({"x": [1.0]}), 0.0)[0] > 7.4)
    True
    """

    def __init__(
        self,
        kind: Kind = "weibull_aft",
        penalizer: float = 0.01,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.kind = kind
        self.penalizer = penalizer
        self.columns = columns

    def fit(
        self,
        frame: pl.DataFrame,
        duration: npt.ArrayLike,
        observed: npt.ArrayLike,
        *,
        start: SurvivalModel | None = None,
    ) -> SurvivalModel:
        """Fit on episode rows, durations in days (> 0) and event flags.

        ``start``: a fitted model of the same kind on similar rows (the race's fit at
        an earlier cutoff); a Cox fit starts Newton's method at its coefficients
        (lifelines' ``initial_point``, with a full first step) when the covariates
        are the same: the same optimum in 3 Newton steps instead of 6 (Online Retail:
        about 0.3 s less per fit). The AFT fits gain nothing from a start (lifelines fits
        its univariate model for one either way) and ignore it.

        Raises
        ------
        ConvergenceProblem
            lifelines did not converge; the message names the covariate.
        """
        if self.kind not in CANDIDATES:
            raise ValueError(f"kind must be one of {CANDIDATES}, got {self.kind!r}")
        t = np.asarray(duration, dtype=np.float64)
        e = np.asarray(observed, dtype=bool)
        if t.shape != (frame.height,) or e.shape != t.shape:
            raise ValueError("duration and observed need one value per row of frame")
        if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise ValueError("durations must be finite and positive, with at least one row")
        if not e.any():
            raise LapseError("no observed reorder among the episodes: nothing to fit")
        cols = (
            list(self.columns)
            if self.columns is not None
            else [c for c, d in frame.schema.items() if d.is_numeric()]
        )
        self.design_ = _Design(frame, cols)
        self.dropped_ = dict(self.design_.dropped)
        self.covariates_ = list(self.design_.names)
        z = self.design_.transform(frame)
        self.fit_warnings_ = self._fit(z, t, e, self._initial_point(start, z))
        self.max_days_ = float(t.max())
        return self

    def _initial_point(self, start: SurvivalModel | None, z: FloatArray) -> FloatArray | None:
        """``start``'s Cox coefficients on lifelines' scale (it divides each column by its
        standard deviation), or ``None``: a fresh array, as lifelines updates it in place."""
        if (
            self.kind != "cox_ph"
            or start is None
            or start.kind != "cox_ph"
            or getattr(start, "covariates_", None) != self.covariates_
            or z.shape[0] < 2
        ):
            return None
        std = z.std(axis=0, ddof=1)
        out: FloatArray = start.coef_ * np.where(std > 0, std, 1.0)
        return out

    def _fit(
        self,
        z: FloatArray,
        t: FloatArray,
        e: npt.NDArray[np.bool_],
        initial_point: FloatArray | None = None,
    ) -> list[str]:
        import importlib

        from lifelines import (
            CoxPHFitter,
            LogLogisticAFTFitter,
            LogNormalAFTFitter,
            WeibullAFTFitter,
        )
        from lifelines.exceptions import ConvergenceError

        names = [f"x{j}" for j in range(z.shape[1])]
        pd: Any = importlib.import_module("pandas")  # lifelines' input type; no stubs needed
        df = pd.DataFrame(z, columns=names)
        df["_T"], df["_E"] = t, e
        fitters: dict[str, Any] = {
            "weibull_aft": WeibullAFTFitter,
            "lognormal_aft": LogNormalAFTFitter,
            "loglogistic_aft": LogLogisticAFTFitter,
            "cox_ph": CoxPHFitter,
        }
        fitter = fitters[self.kind](penalizer=self.penalizer)
        if self.kind == "cox_ph" and z.shape[1] == 0:
            # lifelines' Cox needs a covariate; without one it is the KM/Nelson-Aalen curve
            self.coef_ = np.zeros(0)
            self._baseline(z, t, e)
            return []
        # lifelines warns (ConvergenceWarning, StatisticalWarning, overflow in exp) on
        # difficult data; the warnings are kept for the report rather than raised
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if initial_point is None:
                    fitter.fit(df, duration_col="_T", event_col="_E")
                else:  # near the optimum Newton's full step converges fastest (default 0.95)
                    fitter.fit(
                        df,
                        duration_col="_T",
                        event_col="_E",
                        initial_point=initial_point,
                        fit_options={"step_size": 1.0},
                    )
            except (ConvergenceError, np.linalg.LinAlgError, ValueError) as exc:
                raise ConvergenceProblem(
                    _diagnose(z, self.covariates_, self.kind, self.penalizer, str(exc)[:300])
                ) from None
        params = fitter.params_
        if not np.all(np.isfinite(params.to_numpy())):
            raise ConvergenceProblem(
                _diagnose(z, self.covariates_, self.kind, self.penalizer, "non-finite coefficients")
            )
        if self.kind == "cox_ph":
            self.coef_ = np.array([params[n] for n in names], dtype=np.float64)
            self._baseline(z, t, e)
        else:
            loc, shape = {
                "weibull_aft": ("lambda_", "rho_"),
                "lognormal_aft": ("mu_", "sigma_"),
                "loglogistic_aft": ("alpha_", "beta_"),
            }[self.kind]
            self.coef_ = np.array([params[(loc, n)] for n in names], dtype=np.float64)
            self.intercept_ = float(params[(loc, "Intercept")])
            self.shape_ = float(np.exp(params[(shape, "Intercept")]))
        return [f"{self.kind}: {w.category.__name__}: {str(w.message)[:200]}" for w in caught]

    def _baseline(self, z: FloatArray, t: FloatArray, e: npt.NDArray[np.bool_]) -> None:
        """Breslow's baseline cumulative hazard at the distinct event times."""
        risk = np.exp(np.clip(z @ self.coef_, -50, 50))
        order = np.argsort(t, kind="stable")
        ts, rs = t[order], risk[order]
        at_risk = np.cumsum(rs[::-1])[::-1]
        times, first = np.unique(ts, return_index=True)
        deaths = np.bincount(np.searchsorted(times, t[e]), minlength=times.size)
        hit = deaths > 0
        self.h0_times_ = times[hit]
        self.h0_ = np.cumsum(deaths[hit] / at_risk[first][hit])

    # -- prediction -----------------------------------------------------------------------
    def _check(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("SurvivalModel is not fitted")

    def linear_predictor(self, frame: pl.DataFrame) -> FloatArray:
        """AFT: the log-scale location; Cox: the log relative risk."""
        self._check()
        z = self.design_.transform(frame)
        out: FloatArray = z @ self.coef_ + getattr(self, "intercept_", 0.0)
        return out

    def _h0(self, t: FloatArray) -> FloatArray:
        idx = np.searchsorted(self.h0_times_, t, side="right")
        out: FloatArray = np.where(idx > 0, self.h0_[np.maximum(idx - 1, 0)], 0.0)
        return out

    def _log_surv(self, lin: FloatArray, t: FloatArray) -> FloatArray:
        """log S(t) for each row (``lin`` broadcast against ``t``)."""
        from scipy.special import log_ndtr

        if self.kind == "cox_ph":
            out: FloatArray = -self._h0(t) * np.exp(np.clip(lin, -50, 50))
            return out
        logt = np.log(np.maximum(t, _TINY))
        s = self.shape_
        if self.kind == "weibull_aft":
            out = -np.exp(np.clip(s * (logt - lin), -700, 700))
        elif self.kind == "lognormal_aft":
            out = log_ndtr(-(logt - lin) / s)
        else:
            out = -np.logaddexp(0.0, s * (logt - lin))
        return out

    def predict_survival(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, times: Sequence[float]
    ) -> FloatArray:
        """``P(no reorder within t more days | none in elapsed)``, shape ``(rows, len(times))``."""
        lin = self.linear_predictor(frame)[:, None]
        a = _elapsed(elapsed, frame.height)[:, None]
        tt = np.asarray(times, dtype=np.float64)[None, :]
        out: FloatArray = np.exp(
            np.minimum(self._log_surv(lin, a + tt) - self._log_surv(lin, a), 0.0)
        )
        return out

    def predict_median(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, horizon: float | None = None
    ) -> FloatArray:
        """Median remaining days to the next order, conditional on ``elapsed``.

        With ``R`` the remaining days (``T - elapsed`` given ``T > elapsed``) and
        ``F_R`` its distribution function:

        - ``horizon=None``: the median of ``R`` (``F_R(r) = 1/2``). It prices in
          the customers who never reorder, so it runs far into the right tail
          and is capped at the longest training episode (``max_days_``).
        - ``horizon=H``: the median of ``R`` among the episodes that reorder within
          ``H`` more days, i.e. the ``r`` in ``[0, H]`` with ``F_R(r) = F_R(H) / 2``,
          equivalently ``S(elapsed + r) = (S(elapsed) + S(elapsed + H)) / 2``. The
          chance of reordering at all within ``H`` is what ``predict_survival``
          gives; this is *when*, given that they do. Rows with no chance of a
          reorder within ``H`` (``F_R(H) = 0`` numerically) get ``H``.

        Either way the result is capped at ``max_days_`` (no extrapolation past
        the longest training episode).

        Every kind inverts its own survival function in closed form (AFT) or
        on the Breslow baseline (Cox: the first event time reaching the target,
        a step), vectorised over rows.
        """
        from scipy.special import ndtri_exp

        lin = self.linear_predictor(frame)
        a = _elapsed(elapsed, frame.height)
        if horizon is not None and not (np.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be finite and > 0 days, got {horizon}")
        s = getattr(self, "shape_", 1.0)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            log_sa = self._log_surv(lin, a)
            if horizon is None:
                log_p = log_sa - _LN2  # log(S(a) / 2)
            else:
                log_sb = self._log_surv(lin, a + horizon)
                # log((S(a) + S(a + H)) / 2), exact when both are close to 1
                log_p = log_sa + np.log1p(np.expm1(np.minimum(log_sb - log_sa, 0.0)) / 2.0)
            # the time t with log S(t) = log_p, inverted per kind
            if self.kind == "cox_ph":
                risk = np.exp(np.clip(lin, -50, 50))
                goal = -log_p / risk
                idx = np.searchsorted(self.h0_, goal, side="left")
                inside = idx < self.h0_.size
                t = np.where(inside, self.h0_times_[np.minimum(idx, self.h0_.size - 1)], np.inf)
            elif self.kind == "weibull_aft":
                t = np.exp(lin + np.log(-log_p) / s)
            elif self.kind == "lognormal_aft":
                t = np.exp(lin - s * ndtri_exp(np.minimum(log_p, 0.0)))
            else:
                t = np.exp(lin + np.log(np.expm1(-log_p)) / s)
        cap = self.max_days_ if horizon is None else min(float(horizon), self.max_days_)
        rest = np.nan_to_num(t - a, nan=cap, posinf=cap)
        if horizon is not None:
            none = -np.expm1(np.minimum(log_sb - log_sa, 0.0)) <= _TINY  # F_R(H) = 0
            rest = np.where(none, cap, rest)
        out: FloatArray = np.clip(rest, 0.0, cap)
        return out


# -- deterministic baselines ---------------------------------------------------------------


def _step_survival(remaining: FloatArray, times: Sequence[float]) -> FloatArray:
    out: FloatArray = (np.asarray(times, dtype=np.float64)[None, :] < remaining[:, None]).astype(
        np.float64
    )
    return out


class LastGap(ParamsMixin):
    """The user's previous gap for the same target; the population median gap without one.

    The median is the Kaplan-Meier median of the training episodes. A reorder
    is predicted for ``start + gap``: the remaining days are that minus the
    elapsed days (0 when overdue). Probabilities are 0 or 1.
    """

    def __init__(self, column: str = "prev_gap_days") -> None:
        self.column = column

    def fit(self, frame: pl.DataFrame, duration: npt.ArrayLike, observed: npt.ArrayLike) -> LastGap:
        if self.column not in frame.columns:
            raise LapseError(f"last_gap needs column {self.column!r} in the episode rows")
        self.median_ = km_median(duration, observed)
        return self

    def total_days(self, frame: pl.DataFrame) -> FloatArray:
        """Predicted days from the order to the next one."""
        gap = frame[self.column].cast(pl.Float64).fill_nan(None).fill_null(self.median_)
        out: FloatArray = gap.to_numpy().astype(np.float64)
        return out

    def n_fallback(self, frame: pl.DataFrame) -> int:
        """Rows predicted with the population median."""
        return int(frame[self.column].cast(pl.Float64).fill_nan(None).null_count())

    def predict_median(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, horizon: float | None = None
    ) -> FloatArray:
        """Days left until ``start + gap`` (0 when overdue).

        Already a point estimate of *when*, not a distribution: ``horizon`` is
        accepted for the common interface (:class:`Predictor`) and ignored.
        """
        a = _elapsed(elapsed, frame.height)
        out: FloatArray = np.maximum(self.total_days(frame) - a, 0.0)
        return out

    def predict_survival(
        self, frame: pl.DataFrame, elapsed: npt.ArrayLike, times: Sequence[float]
    ) -> FloatArray:
        return _step_survival(self.predict_median(frame, elapsed), times)


class DepletionRule(LastGap):
    """Days of supply = units on hand / consumption rate, where telemetry exists.

    Episodes without a consumption rate fall back to :class:`LastGap`.
    """

    def __init__(self, column: str = "supply_days", fallback: str = "prev_gap_days") -> None:
        self.column = column
        self.fallback = fallback

    def fit(
        self, frame: pl.DataFrame, duration: npt.ArrayLike, observed: npt.ArrayLike
    ) -> DepletionRule:
        for c in (self.column, self.fallback):
            if c not in frame.columns:
                raise LapseError(f"depletion_rule needs column {c!r} in the episode rows")
        self.median_ = km_median(duration, observed)
        return self

    def total_days(self, frame: pl.DataFrame) -> FloatArray:
        days = pl.coalesce(
            pl.col(self.column).cast(pl.Float64).fill_nan(None),
            pl.col(self.fallback).cast(pl.Float64).fill_nan(None),
            pl.lit(self.median_),
        )
        out: FloatArray = frame.select(days).to_series().to_numpy().astype(np.float64)
        return out

    def n_fallback(self, frame: pl.DataFrame) -> int:
        return int(frame[self.column].cast(pl.Float64).fill_nan(None).null_count())
