"""Two models on the same rows: metric differences, their bootstrap intervals, the rule.

A review (:mod:`lapse.train.review`) scores the champion and the challenger on the
same users at the same cutoffs. Each metric's difference (challenger minus
champion) gets a **paired cluster bootstrap** interval: each of
:data:`RESAMPLES` resamples draws the users with replacement, a user bringing
all of their rows (every pooled cutoff, every open episode), and scores both
models on that same draw; the interval is the central :data:`LEVEL` of the
resampled differences (percentile method). The generator is seeded with
:data:`SEED`, so the same rows always give the same interval.

The promotion rule (:func:`decide`) reads each primary metric's interval in the
metric's "better" direction against the tolerance ``tol``:

- **promote**: the interval's bound on the worse side is within the tolerance
  (the challenger is at worst ``tol`` worse than the champion);
- **refuse**: the whole interval is worse than the tolerance;
- **inconclusive**: anything else (the interval holds both), with an estimate
  of how many more users or cutoffs would settle it (:func:`settle`).

Over several primary metrics: refuse when any refuses, promote when all promote,
inconclusive otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from lapse.modeling.metrics import expected_calibration_error, top_decile

__all__ = [
    "LEVEL",
    "LOWER_IS_BETTER",
    "METRICS",
    "RESAMPLES",
    "SEED",
    "Decision",
    "Interval",
    "Paired",
    "Verdict",
    "decide",
    "interval_metrics",
    "intervals_from_metrics",
    "judge",
    "metric_value",
    "paired_interval",
    "settle",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Verdict = Literal["promote", "refuse", "inconclusive"]

#: Bootstrap resamples of every interval.
RESAMPLES: Final = 1000
#: Seed of the resampling: the same rows give the same interval.
SEED: Final = 0
#: Coverage of the interval (the central 95% of the resampled differences).
LEVEL: Final = 0.95

#: Metrics where a smaller value is better; every other metric: larger is better.
LOWER_IS_BETTER: Final = frozenset(
    {"brier", "log_loss", "ece", "mae_days", "ibs", "brier_7d", "brier_14d", "brier_30d"}
)

_EPS: Final = 1e-6
_CELLS: Final = 2_000_000  # resamples x rows held at once (16 MB of weights)
_BLOCK: Final = 512  # rows of the pair matrix built at once for the concordance


@dataclass(frozen=True)
class Paired:
    """Rows both models scored: the truth, each side's prediction, the user of each row.

    Churn: ``truth`` is 1.0 for a churned user, predictions are probabilities.
    Replenishment: ``truth`` is the days to the reorder (or to the end of the
    follow-up when ``observed`` is false), predictions are predicted days.
    ``users`` are integer codes; a resample draws users, not rows.
    """

    truth: FloatArray
    champion: FloatArray
    challenger: FloatArray
    users: npt.NDArray[np.int64]
    observed: BoolArray | None = None


# -- metrics on bootstrap weights -----------------------------------------------------------
# Each takes (truth, observed, prediction, weights) with weights of shape (resamples, rows),
# the times each row was drawn, and returns one value per resample. Weights of ones give
# the plain metric (tests compare them with scikit-learn and lifelines).

Weighted = Callable[[FloatArray, BoolArray | None, FloatArray, FloatArray], FloatArray]


def _groups(sorted_values: FloatArray) -> npt.NDArray[np.intp]:
    """Start index of each run of equal values in a sorted array."""
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _roc_auc(y: FloatArray, _: object, p: FloatArray, w: FloatArray) -> FloatArray:
    """Mann-Whitney AUC, tied scores counting one half."""
    order = np.argsort(p, kind="stable")
    starts = _groups(p[order])
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * (1.0 - ys), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = np.where(den > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / den, np.nan)
    return out


def _pr_auc(y: FloatArray, _: object, p: FloatArray, w: FloatArray) -> FloatArray:
    """Average precision (scikit-learn's: precision at each distinct threshold times the
    recall it adds)."""
    order = np.argsort(-p, kind="stable")
    starts = _groups(-p[order])
    ws, ys = w[:, order], y[order]
    tp_g = np.add.reduceat(ws * ys, starts, axis=1)
    all_g = np.add.reduceat(ws, starts, axis=1)
    tp, seen = np.cumsum(tp_g, axis=1), np.cumsum(all_g, axis=1)
    positives = tp[:, -1]
    neg = seen[:, -1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        ap = (tp_g * precision).sum(axis=1) / positives
    out: FloatArray = np.where((positives > 0) & (neg > 0), ap, np.nan)
    return out


def _mean(values: FloatArray, w: FloatArray) -> FloatArray:
    out: FloatArray = (w @ values) / w.sum(axis=1)
    return out


def _brier(y: FloatArray, _: object, p: FloatArray, w: FloatArray) -> FloatArray:
    return _mean((p - y) ** 2, w)


def _log_loss(y: FloatArray, _: object, p: FloatArray, w: FloatArray) -> FloatArray:
    pc = np.clip(p, _EPS, 1 - _EPS)
    return _mean(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)), w)


def _by_rows(metric: Callable[[FloatArray, FloatArray], float]) -> Weighted:
    """A metric without a weighted form, on each resample's rows repeated as drawn."""

    def weighted(y: FloatArray, _: object, p: FloatArray, w: FloatArray) -> FloatArray:
        rows = np.arange(y.size)
        out = np.empty(w.shape[0])
        for b in range(w.shape[0]):
            idx = np.repeat(rows, w[b].astype(np.int64))
            out[b] = metric(y[idx], p[idx])
        return out

    return weighted


def _concordance(d: FloatArray, e: BoolArray | None, p: FloatArray, w: FloatArray) -> FloatArray:
    """Harrell's C as lifelines counts it: a pair is comparable when the first row's reorder
    was seen before the other row left (or at the time the other was censored); the longer
    predicted time should go with the later reorder; tied predictions count one half."""
    assert e is not None
    num = np.zeros(w.shape[0])
    den = np.zeros(w.shape[0])
    for start in range(0, d.size, _BLOCK):
        i = slice(start, start + _BLOCK)
        di, pi = d[i, None], p[i, None]
        comparable = e[i, None] & ((di < d[None, :]) | ((di == d[None, :]) & ~e[None, :]))
        right = np.where(pi < p[None, :], 1.0, np.where(pi == p[None, :], 0.5, 0.0))
        den += (w[:, i] * (w @ comparable.T.astype(np.float64))).sum(axis=1)
        num += (w[:, i] * (w @ (comparable * right).T)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = np.where(den > 0, num / den, np.nan)
    return out


def _mae_days(d: FloatArray, e: BoolArray | None, p: FloatArray, w: FloatArray) -> FloatArray:
    """Mean absolute error of the predicted days over the reorders seen."""
    assert e is not None
    seen = e.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = (w @ (np.abs(p - d) * seen)) / (w @ seen)
    return out


#: The metrics a review compares, per task, as functions of bootstrap weights.
METRICS: Final[Mapping[str, Mapping[str, Weighted]]] = {
    "churn": {
        "roc_auc": _roc_auc,
        "pr_auc": _pr_auc,
        "brier": _brier,
        "log_loss": _log_loss,
        "ece": _by_rows(expected_calibration_error),
        "top_decile_lift": _by_rows(lambda y, p: top_decile(y, p)[0]),
    },
    "replenishment": {"concordance": _concordance, "mae_days": _mae_days},
}


def _function(task: str, metric: str) -> Weighted:
    try:
        return METRICS[task][metric]
    except KeyError:
        known = ", ".join(f"{t}.{m}" for t, ms in METRICS.items() for m in ms)
        raise ValueError(f"no comparison for {task}.{metric}; one of {known}") from None


def metric_value(
    task: str, metric: str, rows: Paired, side: Literal["champion", "challenger"]
) -> float:
    """The metric of one side on all rows (each drawn once)."""
    pred = rows.champion if side == "champion" else rows.challenger
    ones = np.ones((1, rows.truth.size))
    return float(_function(task, metric)(rows.truth, rows.observed, pred, ones)[0])


def _draws(users: npt.NDArray[np.int64], resamples: int, seed: int) -> list[FloatArray]:
    """Bootstrap weights (times each row is drawn), users drawn with replacement, in chunks."""
    n_users = int(users.max()) + 1 if users.size else 0
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CELLS // max(users.size, 1)))
    out: list[FloatArray] = []
    left = resamples
    while left > 0:
        k = min(chunk, left)
        counts = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=k)
        out.append(counts[:, users].astype(np.float64))
        left -= k
    return out


def paired_interval(
    task: str,
    metric: str,
    rows: Paired,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """``(low, high)``: the central ``level`` of challenger minus champion over resamples.

    Both models are scored on the same draw of users each time (paired). NaN
    when no resample could measure the metric (e.g. one class only).

    Examples
    --------
    >>> y = np.array([0.0, 1.0] * 50)
    >>> rows = Paired(y, np.linspace(0, 1, 100), y * 0.8 + 0.1, np.arange(100))
    >>> low, high = paired_interval("churn", "roc_auc", rows, resamples=200)
    >>> bool(0 < low <= high)
    True
    """
    f = _function(task, metric)
    deltas = np.concatenate(
        [
            f(rows.truth, rows.observed, rows.challenger, w)
            - f(rows.truth, rows.observed, rows.champion, w)
            for w in _draws(rows.users, resamples, seed)
        ]
    )
    deltas = deltas[np.isfinite(deltas)]
    if deltas.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    return float(low), float(high)


# -- the rule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Challenger minus champion on one metric (``key``: ``task.metric``) with its interval,
    measured on ``users`` users over ``cutoffs`` cutoffs."""

    key: str
    delta: float
    low: float
    high: float
    users: int
    cutoffs: int

    @property
    def metric(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    def gain(self) -> tuple[float, float, float]:
        """``(worse bound, point, better bound)`` as improvements: positive is better."""
        if self.metric in LOWER_IS_BETTER:
            return -self.high, -self.delta, -self.low
        return self.low, self.delta, self.high

    def describe(self) -> str:
        """``churn.roc_auc -0.0123 (95% interval -0.0201 to -0.0046)``."""
        return (
            f"{self.key} {self.delta:+.4f} ({LEVEL:.0%} interval {self.low:+.4f} to "
            f"{self.high:+.4f})"
        )


def judge(interval: Interval, tolerance: float) -> Verdict:
    """The verdict of one primary metric (see the module docstring)."""
    worst, _, best = interval.gain()
    if not (math.isfinite(worst) and math.isfinite(best)):
        return "inconclusive"
    if worst >= -tolerance:
        return "promote"
    if best < -tolerance:
        return "refuse"
    return "inconclusive"


def settle(interval: Interval, tolerance: float) -> str:
    """How many more users, or cutoffs, would make the interval decide, if the difference
    held and the interval narrowed as one over the square root of the rows."""
    worst, point, best = interval.gain()
    if not all(math.isfinite(v) for v in (worst, point, best)):
        return f"{interval.key} could not be measured on these rows"
    # promote needs the worse bound to rise to -tol; refuse the better bound to fall below it
    reach, room = (
        (point - worst, point + tolerance)
        if point > -tolerance
        else (best - point, -tolerance - point)
    )
    if room <= 0 or reach <= 0:
        return f"{interval.key} differs by about the tolerance itself; no sample size settles it"
    factor = (reach / room) ** 2 - 1.0
    users = math.ceil(interval.users * factor)
    cutoffs = math.ceil(interval.cutoffs * factor)
    return (
        f"about {users:,} more users, or {cutoffs:,} more cutoff{'s' if cutoffs != 1 else ''} "
        f"at this size, would settle {interval.key} if the difference holds"
    )


@dataclass(frozen=True)
class Decision:
    """A verdict, the rule that decided it (one sentence) and one line per primary metric."""

    verdict: Verdict
    rule: str
    lines: list[str]


def decide(intervals: Mapping[str, Interval], tolerance: float) -> Decision:
    """The review's verdict over the primary metrics' intervals (keyed ``task.metric``).

    Raises
    ------
    ValueError
        No interval to decide on.
    """
    if not intervals:
        raise ValueError("no primary metric was compared")
    verdicts = {key: judge(iv, tolerance) for key, iv in intervals.items()}
    lines = [f"{iv.describe()}: {verdicts[key]}" for key, iv in intervals.items()]
    refused = [intervals[k] for k, v in verdicts.items() if v == "refuse"]
    if refused:
        worst = refused[0]
        return Decision(
            "refuse",
            f"refuse: the whole {LEVEL:.0%} interval of {worst.key} ({worst.low:+.4f} to "
            f"{worst.high:+.4f}) is worse than the champion's by more than the tolerance "
            f"{tolerance:g}",
            lines,
        )
    open_ = [intervals[k] for k, v in verdicts.items() if v == "inconclusive"]
    if open_:
        first = open_[0]
        return Decision(
            "inconclusive",
            f"inconclusive: the {LEVEL:.0%} interval of {first.key} ({first.low:+.4f} to "
            f"{first.high:+.4f}) holds differences both within and beyond the tolerance "
            f"{tolerance:g}, so the champion stays; "
            + "; ".join(settle(iv, tolerance) for iv in open_),
            lines,
        )
    bounds = ", ".join(f"{iv.key} {iv.gain()[0]:+.4f}" for iv in intervals.values())
    return Decision(
        "promote",
        f"promote: the worse-side bound of every primary metric's {LEVEL:.0%} interval is "
        f"within the tolerance {tolerance:g} ({bounds}; positive is better)",
        lines,
    )


def interval_metrics(intervals: Mapping[str, Interval]) -> dict[str, float]:
    """The intervals as flat metrics (``delta.``, ``low.``, ``high.``, ``users.``,
    ``cutoffs.`` + ``task.metric``), as a review run logs them."""
    out: dict[str, float] = {}
    for key, iv in intervals.items():
        out |= {
            f"delta.{key}": iv.delta,
            f"low.{key}": iv.low,
            f"high.{key}": iv.high,
            f"users.{key}": float(iv.users),
            f"cutoffs.{key}": float(iv.cutoffs),
        }
    return out


def intervals_from_metrics(metrics: Mapping[str, float]) -> dict[str, Interval]:
    """The inverse of :func:`interval_metrics` (other metrics are ignored)."""
    keys = [k.removeprefix("low.") for k in metrics if k.startswith("low.")]
    fields = ("delta", "low", "high", "users", "cutoffs")
    return {
        key: Interval(
            key=key,
            delta=float(metrics[f"delta.{key}"]),
            low=float(metrics[f"low.{key}"]),
            high=float(metrics[f"high.{key}"]),
            users=int(metrics[f"users.{key}"]),
            cutoffs=int(metrics[f"cutoffs.{key}"]),
        )
        for key in sorted(keys)
        if all(f"{f}.{key}" in metrics for f in fields)
    }
