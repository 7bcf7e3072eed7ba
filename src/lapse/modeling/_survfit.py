"""Penalised maximum likelihood for the AFT and Cox models, in NumPy with exact derivatives.

The objectives are lifelines' own, so the estimates are lifelines' (to its
convergence tolerance) at a small fraction of the time: lifelines
differentiates with autograd and runs Efron's ties in a Python loop over the
rows, which made the fits most of ``lapse train``'s time on a shop-sized log.

- AFT (``weibull_aft``, ``lognormal_aft``, ``loglogistic_aft``): ``log T = mu +
  sigma W`` with ``mu = b0 + x b`` and ``W`` the standard Gumbel-minimum,
  normal or logistic variable; minimises the mean negative log-likelihood plus
  ``penalizer / 2`` times the squared coefficients of the columns scaled to
  unit (sample) standard deviation, the log-shape included and the intercept
  not (lifelines' ``ParametricRegressionFitter``).
- Cox: Efron's partial likelihood with ``n * penalizer / 2`` times the squared
  coefficients of the standardised columns (lifelines' ``CoxPHFitter``).

Both run Newton's method with a backtracking line search and raise
:class:`NotConverged` (with the reason) when it fails, the curvature is
singular (collinear covariates) or a value is not finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["NotConverged", "fit_aft", "fit_cox"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
AftKind = Literal["weibull_aft", "lognormal_aft", "loglogistic_aft"]
#: ``objective(v, order) -> (value, gradient, hessian)``; with ``order`` 0 only the value
#: is computed (the other two are placeholders).
Objective = Callable[[FloatArray, int], tuple[float, FloatArray, FloatArray]]

#: ``sigma = exp(SIGN * log_shape)``: lifelines' Weibull ``rho_`` and log-logistic
#: ``beta_`` are ``1 / sigma``, its log-normal ``sigma_`` is sigma.
_SIGN: Final[dict[str, float]] = {
    "weibull_aft": -1.0,
    "lognormal_aft": 1.0,
    "loglogistic_aft": -1.0,
}
_MAX_STEPS: Final = 100
_TOL: Final = 1e-10
_SINGULAR: Final = 1e-10
_HALF_LOG_2PI: Final = 0.5 * np.log(2.0 * np.pi)


class NotConverged(Exception):
    """Newton's method failed; the message says why."""


def _scale(x: FloatArray) -> FloatArray:
    """Each column's sample standard deviation, 1 where (near) constant (lifelines' scaling)."""
    if x.shape[0] < 2:
        return np.ones(x.shape[1])
    s = np.asarray(x.std(axis=0, ddof=1), dtype=np.float64)
    out: FloatArray = np.where(s < 1e-8, 1.0, s)
    return out


def _newton(fun: Objective, v: FloatArray, *, what: str) -> FloatArray:
    """Minimise a smooth objective from ``v`` by damped Newton steps."""
    value, grad, hess = fun(v, 2)
    for _ in range(_MAX_STEPS):
        if not (np.isfinite(value) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))):
            raise NotConverged(f"{what}: non-finite log-likelihood or derivatives")
        step: FloatArray
        eig = np.linalg.eigvalsh(hess)
        top = max(float(np.abs(eig).max()), 1e-300)
        if eig.min() <= _SINGULAR * top:
            if eig.min() > -_SINGULAR * top:
                raise NotConverged(f"{what}: singular curvature (collinear covariates?)")
            # not convex here: move along the gradient with the curvature's size
            step = -grad / top
        else:
            step = -np.asarray(np.linalg.solve(hess, grad), dtype=np.float64)
        decrement = float(-grad @ step)
        if decrement < _TOL and float(np.abs(step).max()) < 1e-8:
            return v
        t = 1.0
        while True:
            trial = v + t * step
            new_value = fun(trial, 0)[0]
            if np.isfinite(new_value) and new_value <= value - 1e-4 * t * decrement:
                break
            t /= 2.0
            if t < 1e-10:
                if decrement < 1e-8:  # at the optimum up to rounding
                    return v
                raise NotConverged(f"{what}: no step improves the log-likelihood")
        v = trial
        value, grad, hess = fun(v, 2)
    raise NotConverged(f"{what}: no convergence in {_MAX_STEPS} Newton steps")


def _aft_terms(
    kind: str, w: FloatArray, e: BoolArray, order: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per row: the log-density (events) or log-survival (censored) of the standard
    variable at ``w``, and its first and second derivatives in ``w`` (zeros if not asked)."""
    from scipy.special import expit, log_ndtr

    d1: FloatArray
    d2: FloatArray
    if kind == "weibull_aft":
        ew = np.exp(np.minimum(w, 700.0))
        ll = np.where(e, w, 0.0) - ew
        d1, d2 = e - ew, -ew
    elif kind == "lognormal_aft":
        log_s = log_ndtr(-w)
        ll = np.where(e, -0.5 * w * w - _HALF_LOG_2PI, log_s)
        if order == 0:
            return ll, w, w
        mills = np.exp(-0.5 * w * w - _HALF_LOG_2PI - log_s)
        d1 = np.where(e, -w, -mills)
        d2 = np.where(e, -1.0, -mills * (mills - w))
    else:
        soft = np.logaddexp(0.0, w)
        ll = np.where(e, w - 2.0 * soft, -soft)
        if order == 0:
            return ll, w, w
        p = expit(w)
        d1 = np.where(e, 1.0 - 2.0 * p, -p)
        d2 = np.where(e, -2.0, -1.0) * p * (1.0 - p)
    return ll, d1, d2


def fit_aft(
    kind: AftKind, z: FloatArray, t: FloatArray, e: BoolArray, penalizer: float
) -> tuple[float, FloatArray, float]:
    """``(intercept, coefficients, log_shape)`` of an AFT model on covariates ``z``.

    ``log_shape`` is lifelines' ancillary intercept: ``log rho_`` (Weibull),
    ``log sigma_`` (log-normal), ``log beta_`` (log-logistic).
    """
    n, k = z.shape
    scale = _scale(z)
    x = np.column_stack([np.ones(n), z / scale])
    y = np.log(t)
    sign = _SIGN[kind]
    n_events = float(e.sum())
    penalised = np.ones(k + 2)
    penalised[0] = 0.0 if k else 1.0  # lifelines spares the intercept beside covariates only

    def objective(v: FloatArray, order: int) -> tuple[float, FloatArray, FloatArray]:
        beta, theta = v[:-1], float(v[-1])
        inv_sigma = np.exp(-sign * theta)
        w = (y - x @ beta) * inv_sigma
        ll, d1, d2 = _aft_terms(kind, w, e, order)
        total = ll.sum() - n_events * sign * theta - float(y[e].sum())
        value = -total / n + 0.5 * penalizer * float(np.sum(penalised * v * v))
        if order == 0:
            return value, v, v
        grad = np.empty(k + 2)
        grad[:-1] = -(x.T @ d1) * inv_sigma
        grad[-1] = -sign * float(d1 @ w) - n_events * sign
        hess = np.empty((k + 2, k + 2))
        hess[:-1, :-1] = (x.T * d2) @ x * inv_sigma**2
        cross = (x.T @ (d2 * w + d1)) * sign * inv_sigma
        hess[:-1, -1] = hess[-1, :-1] = cross
        hess[-1, -1] = sign * sign * float(d2 @ (w * w) + d1 @ w)
        return (
            value,
            -grad / n + penalizer * penalised * v,
            -hess / n + np.diag(penalizer * penalised),
        )

    start = np.zeros(k + 2)
    start[0] = float(np.mean(y))
    v = _newton(objective, start, what=kind)
    return float(v[0]), v[1:-1] / scale, float(v[-1])


def fit_cox(z: FloatArray, t: FloatArray, e: BoolArray, penalizer: float) -> FloatArray:
    """Coefficients of Cox's model on covariates ``z`` (Efron's ties)."""
    n, k = z.shape
    scale = _scale(z)
    order_ = np.argsort(t, kind="stable")
    x = ((z - z.mean(axis=0)) / scale)[order_]
    ts, es = t[order_], e[order_]
    times, first = np.unique(ts, return_index=True)
    group = np.searchsorted(times, ts)
    dead = np.flatnonzero(es)
    d_count = np.bincount(group[dead], minlength=times.size)
    hit = np.flatnonzero(d_count)
    # one row per death: its tie group and Efron's fraction l / d of the tied risk removed
    rep = np.repeat(hit, d_count[hit])
    pos = np.arange(rep.size) - np.repeat(np.cumsum(d_count[hit]) - d_count[hit], d_count[hit])
    frac = pos / d_count[rep]
    x_dead_sum = x[dead].sum(axis=0)
    pen = n * penalizer

    def objective(v: FloatArray, order: int) -> tuple[float, FloatArray, FloatArray]:
        eta = np.clip(x @ v, -500.0, 500.0)
        phi = np.exp(eta)
        r0 = np.cumsum(phi[::-1])[::-1][first]
        t0 = np.bincount(group[dead], weights=phi[dead], minlength=times.size)
        a = r0[rep] - frac * t0[rep]
        value = -(float(eta[dead].sum()) - float(np.log(a).sum())) + 0.5 * pen * float(v @ v)
        if order == 0:
            return value, v, v
        px = phi[:, None] * x
        r1 = np.cumsum(px[::-1], axis=0)[::-1][first]
        t1 = np.zeros((times.size, k))
        np.add.at(t1, group[dead], px[dead])
        m = (r1[rep] - frac[:, None] * t1[rep]) / a[:, None]
        grad = x_dead_sum - m.sum(axis=0)
        u = np.bincount(rep, weights=1.0 / a, minlength=times.size)
        c = np.bincount(rep, weights=frac / a, minlength=times.size)
        # the sum over deaths of (R2 - frac T2) / a without R2 per time: a row is in
        # the risk set of every death at or before its time, in the ties of its own
        row_weight = np.cumsum(u)[group] - c[group] * es
        second = (x.T * (phi * row_weight)) @ x
        return value, -grad + pen * v, second - m.T @ m + pen * np.eye(k)

    v = _newton(objective, np.zeros(k), what="cox_ph")
    return v / scale
