"""Population stability index: how far today's distribution moved from the training one."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bin_counts", "psi", "psi_from_counts", "reference_sample"]

_EPS = 1e-4


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, *, bins: int = 10) -> float:
    """PSI of ``actual`` against ``expected``: bins at the expected deciles, nulls a bin of their own.

    0 means the same distribution; above 0.1 is a moderate shift, above 0.2 a
    large one (the usual rule of thumb). ``nan`` when either side is empty.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> psi(rng.normal(size=5000), rng.normal(size=5000)) < 0.05
    True
    >>> psi(rng.normal(size=5000), rng.normal(1.0, size=5000)) > 0.2
    True
    """
    a = np.asarray(actual, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    return psi_from_counts(expected, bin_counts(expected, a, bins=bins), bins=bins)


def _edges(expected: npt.ArrayLike, bins: int) -> npt.NDArray[np.float64]:
    e = np.asarray(expected, dtype=np.float64)
    finite = e[np.isfinite(e)]
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    return np.unique(np.quantile(finite, qs)) if finite.size else np.empty(0, dtype=np.float64)


def bin_counts(
    expected: npt.ArrayLike, actual: npt.ArrayLike, *, bins: int = 10
) -> npt.NDArray[np.int64]:
    """How many of ``actual`` fall in each of :func:`psi`'s bins (the last: non-finite).

    Counts of disjoint parts of a population add up, so a sharded scorer sums
    them and calls :func:`psi_from_counts` once: the PSI of the whole.
    """
    edges = _edges(expected, bins)
    x = np.asarray(actual, dtype=np.float64)
    ok = np.isfinite(x)
    counts = np.bincount(np.searchsorted(edges, x[ok], side="right"), minlength=len(edges) + 1)
    return np.append(counts, (~ok).sum()).astype(np.int64)


def psi_from_counts(expected: npt.ArrayLike, counts: npt.ArrayLike, *, bins: int = 10) -> float:
    """:func:`psi` from the :func:`bin_counts` of the actual values (``nan`` when empty)."""
    e = np.asarray(expected, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if e.size == 0 or c.sum() == 0:
        return float("nan")
    pe = np.clip(bin_counts(e, e, bins=bins) / e.size, _EPS, None)
    pa = np.clip(c / c.sum(), _EPS, None)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def reference_sample(
    values: npt.ArrayLike, *, n: int = 5000, seed: int = 0
) -> npt.NDArray[np.float64]:
    """At most ``n`` values drawn without replacement (what a bundle keeps per feature)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size <= n:
        return v
    return np.random.default_rng(seed).choice(v, size=n, replace=False)
