"""The cutoff grid: which cutoffs train, validate and test, with an embargo.

All cutoffs are 00:00 UTC. The data ends at ``data_end``: midnight after the
day of the last event (that day counts as observed). A cutoff ``T`` is
*complete* when its label window ``[T, T + horizon)`` ends by ``data_end``;
incomplete cutoffs are never used for training or evaluation.

Layout (weekly grid, 28-day horizon)::

    ... train (12) ...   |embargo|  validation  |embargo|  test  |horizon| data_end
    T_v - 28d - 11w .. T_v - 28d    T_v = T_t - 28d          T_t = data_end - 28d
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import polars as pl

from lapse.config import LabelsConfig, LapseConfig
from lapse.exceptions import LapseError

__all__ = [
    "MIN_TRAIN_CUTOFFS",
    "CutoffGrid",
    "GridFit",
    "customer_quantile",
    "cutoff_grid",
    "data_span",
    "fit_grid",
    "grid_for_test",
    "propose_labels",
    "repeat_gaps",
    "training_cutoffs_fit",
]

#: Fewer training cutoffs than this is "a handful": the grid adapts, or training stops.
MIN_TRAIN_CUTOFFS: Final = 8
#: The proposed horizon covers this quantile of repeat customers' gaps between orders.
GAP_QUANTILE: Final = 0.8
#: Below this many repeat customers the gaps say too little to fit a horizon.
MIN_REPEAT_USERS: Final = 20


@dataclass(frozen=True)
class CutoffGrid:
    """Cutoffs of one race, oldest first where a list.

    Attributes
    ----------
    test, validation
        The out-of-time test and validation cutoffs.
    training
        Cutoffs whose label windows end by ``validation``.
    complete
        Every complete cutoff of the grid (the refit uses them all).
    data_start, data_end
        First event's midnight and the midnight after the last event's day.
    horizon
        The label window length.
    """

    test: datetime
    validation: datetime
    training: tuple[datetime, ...]
    complete: tuple[datetime, ...]
    data_start: datetime
    data_end: datetime
    horizon: timedelta

    @property
    def all_race(self) -> list[datetime]:
        """Training, validation and test cutoffs, oldest first."""
        return [*self.training, self.validation, self.test]


def _midnight(ts: datetime) -> datetime:
    ts = ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def data_span(events: pl.LazyFrame) -> tuple[datetime, datetime]:
    """``(data_start, data_end)``: first event's midnight, midnight after the last event's day.

    Raises
    ------
    LapseError
        There are no events.
    """
    span = events.select(pl.col("ts").min().alias("lo"), pl.col("ts").max().alias("hi")).collect()
    lo, hi = span.item(0, "lo"), span.item(0, "hi")
    if lo is None or hi is None:
        raise LapseError("the event data is empty: there is nothing to train on")
    return _midnight(lo), _midnight(hi) + timedelta(days=1)


def grid_for_test(
    test: datetime,
    *,
    data_start: datetime,
    data_end: datetime,
    config: LapseConfig,
) -> CutoffGrid:
    """The race's cutoffs around a given test cutoff (used by the backtest).

    Raises
    ------
    LapseError
        The data is too short for a training cutoff before the validation one.
    """
    lab = config.labels
    step = timedelta(days=lab.cutoff_every_days)
    horizon = timedelta(days=lab.horizon_days)
    earliest = data_start + timedelta(days=lab.min_history_days)
    if test + horizon > data_end:
        raise ValueError(f"test cutoff {test:%Y-%m-%d} has an incomplete horizon")
    grid: list[datetime] = []
    t = test
    while t >= earliest:
        grid.append(t)
        t -= step
    grid.reverse()
    validation = next((c for c in reversed(grid) if c + horizon <= test), None)
    training = (
        [c for c in grid if c + horizon <= validation][-lab.train_cutoffs :] if validation else []
    )
    if validation is None or not training:
        need = lab.min_history_days + 2 * lab.horizon_days + lab.horizon_days
        span = (data_end - data_start).days
        raise LapseError(
            f"the events span {span} days ({data_start:%Y-%m-%d} to {data_end:%Y-%m-%d}), too "
            f"short for a test, a validation and a training cutoff with a {lab.horizon_days}-day "
            f"horizon (at least about {need} days are needed); supply more history, or lower "
            "labels.horizon_days or labels.min_history_days in the config"
        )
    complete = tuple(c for c in grid if c + horizon <= data_end)
    return CutoffGrid(
        test=test,
        validation=validation,
        training=tuple(training),
        complete=complete,
        data_start=data_start,
        data_end=data_end,
        horizon=horizon,
    )


def cutoff_grid(events: pl.LazyFrame, config: LapseConfig) -> CutoffGrid:
    """The race's cutoff grid: test = the latest cutoff whose horizon is complete.

    The grid runs every ``labels.cutoff_every_days`` back from the test cutoff;
    the validation cutoff is the latest one whose label window ends by the
    test cutoff, and the training cutoffs are the ``labels.train_cutoffs``
    latest whose label windows end by the validation cutoff, so no training
    label overlaps validation or test labels.

    Raises
    ------
    LapseError
        The events are empty or span too little time.
    """
    data_start, data_end = data_span(events)
    test = data_end - timedelta(days=config.labels.horizon_days)
    return grid_for_test(test, data_start=data_start, data_end=data_end, config=config)


# -- fitting the grid to the data ------------------------------------------------------


def training_cutoffs_fit(
    span_days: int, *, horizon_days: int, every_days: int, min_history_days: int
) -> int:
    """How many training cutoffs the grid of :func:`grid_for_test` lays in ``span_days``.

    The test cutoff is one horizon before the end; validation and the latest
    training cutoff each sit the horizon (rounded up to the grid step) before
    the next; the rest step back to ``min_history_days`` after the start.

    >>> training_cutoffs_fit(180, horizon_days=28, every_days=7, min_history_days=28)
    10
    """
    back = math.ceil(horizon_days / every_days) * every_days
    room = span_days - min_history_days - horizon_days - 2 * back
    return room // every_days + 1 if room >= 0 else 0


@dataclass(frozen=True)
class GridFit:
    """The labels section a span of data can train with, and what had to change.

    Attributes
    ----------
    labels
        The labels section to train with (``cutoff_every_days`` possibly lowered).
    fits
        Training cutoffs that fit with ``labels`` (training uses at most
        ``labels.train_cutoffs`` of them).
    note
        One line saying what did not fit and what was adapted; ``None`` when
        everything fitted as configured.
    """

    labels: LabelsConfig
    fits: int
    note: str | None = None


def _max_horizon(span_days: int, labels: LabelsConfig, want: int, every_days: int) -> int:
    """The longest horizon (a multiple of ``every_days``) with ``want`` cutoffs at that step."""
    h = (span_days - labels.min_history_days - (want - 1) * every_days) // (3 * every_days)
    return max(0, h * every_days)


def fit_grid(labels: LabelsConfig, span_days: int) -> GridFit:
    """Fit the cutoff grid of ``labels`` to ``span_days`` of events: the one rule of
    ``lapse train`` (and of the grid ``lapse config init`` proposes).

    - All ``train_cutoffs`` fit at ``cutoff_every_days``: unchanged, no note.
    - At least :data:`MIN_TRAIN_CUTOFFS` fit: unchanged, trained on those, with
      a note saying how many of how many.
    - Fewer: ``cutoff_every_days`` is lowered to the largest step at which
      ``min(train_cutoffs, MIN_TRAIN_CUTOFFS)`` fit (more cutoffs, not fewer
      users), with a note saying so. The horizon (what churn means) is never
      changed behind the user's back.

    Raises
    ------
    LapseError
        Not even daily cutoffs fit that many: the message names the span, how
        many fit, and the longest horizon that would.
    """
    want = labels.train_cutoffs
    step = labels.cutoff_every_days

    def fits(every: int) -> int:
        return training_cutoffs_fit(
            span_days,
            horizon_days=labels.horizon_days,
            every_days=every,
            min_history_days=labels.min_history_days,
        )

    n = fits(step)
    where = (
        f"{span_days} days of events with a {labels.horizon_days}-day horizon "
        f"(labels.horizon_days) and {labels.min_history_days} days of history first"
    )
    if n >= want:
        return GridFit(labels, n)
    if n >= MIN_TRAIN_CUTOFFS:
        return GridFit(
            labels,
            n,
            f"cutoff grid: {n} of the {want} training cutoffs (labels.train_cutoffs) fit "
            f"{where}; trained on {n}",
        )
    need = min(want, MIN_TRAIN_CUTOFFS)
    every = next((e for e in range(step - 1, 0, -1) if fits(e) >= need), None)
    if every is None:
        longest = _max_horizon(span_days, labels, need, 1)
        raise LapseError(
            f"only {n} training cutoff(s) fit {where}, {fits(1)} even daily, and {need} are "
            f"needed; lower labels.horizon_days to {longest} or less"
            + (" (or labels.min_history_days)" if labels.min_history_days else "")
            + ", or supply more history"
        )
    got = fits(every)
    return GridFit(
        labels.model_copy(update={"cutoff_every_days": every}),
        got,
        f"cutoff grid adapted: only {n} training cutoff(s) fit {where} every {step} days "
        f"(labels.cutoff_every_days), so cutoffs are every {every} days ({min(got, want)} training "
        f"cutoffs); set labels.cutoff_every_days: {every}, or a shorter horizon, to silence this",
    )


def repeat_gaps(events: pl.LazyFrame) -> pl.DataFrame:
    """``user_id, gap_days``: every gap between a user's consecutive active days.

    ``events`` needs ``user_id`` and ``ts``; rows without a user are ignored.
    Days, not events, count, so the lines of one order (or a day of app
    opens) are one visit. Users active on one day only have no gap.
    """
    days = (
        events.filter(pl.col("user_id").is_not_null() & pl.col("ts").is_not_null())
        .select("user_id", pl.col("ts").dt.date().alias("day"))
        .unique()
        .sort("user_id", "day")
    )
    return (
        days.select(
            "user_id",
            pl.col("day").diff().over("user_id").dt.total_days().cast(pl.Float64).alias("gap_days"),
        )
        .drop_nulls("gap_days")
        .collect()
    )


def customer_quantile(gaps: pl.DataFrame, q: float) -> float:
    """The ``q`` quantile of ``gaps`` (:func:`repeat_gaps`) with every customer weighing
    the same: a daily buyer's many short gaps do not outvote a monthly buyer's few."""
    ranked = (
        gaps.with_columns((1.0 / pl.len().over("user_id")).alias("w"))
        .sort("gap_days")
        .with_columns((pl.col("w").cum_sum() / pl.col("w").sum()).alias("share"))
    )
    return float(ranked.filter(pl.col("share") >= q - 1e-12)["gap_days"][0])


def propose_labels(span_days: int, gaps: pl.DataFrame, *, purchase_only: bool) -> GridFit:
    """The labels section ``lapse config init`` proposes for a log, and why.

    - **horizon**: the :data:`GAP_QUANTILE` quantile of the repeat customers'
      gaps between active days (``gaps``, from :func:`repeat_gaps`; every
      customer weighs the same), rounded up to whole weeks, and shortened
      (whole weeks, at least one) until :data:`MIN_TRAIN_CUTOFFS` weekly
      training cutoffs fit the span;
    - **eligibility**: purchase-only data gets ``any_history`` (a customer
      between orders is still a customer); data with other activity gets
      ``active`` over one horizon;
    - **grid**: weekly, with as many training cutoffs as fit (at most the
      default 12), then :func:`fit_grid`, the rule ``lapse train`` applies.

    Raises
    ------
    LapseError
        The span is too short for even a one-week horizon (from :func:`fit_grid`).
    """
    base = LabelsConfig()
    step = base.cutoff_every_days
    repeaters = gaps["user_id"].n_unique()
    why: list[str] = []
    if repeaters >= MIN_REPEAT_USERS:
        q = customer_quantile(gaps, GAP_QUANTILE)
        horizon = max(step, math.ceil(q / step) * step)
        why.append(
            f"{GAP_QUANTILE:.0%} of the {repeaters:,} repeat customers' gaps between orders "
            f"(each customer weighing the same) are {q:g} days or shorter"
        )
    else:
        horizon = base.horizon_days
        why.append(f"only {repeaters} repeat customers: the default horizon")
    longest = _max_horizon(span_days, base, MIN_TRAIN_CUTOFFS, step)
    if horizon > longest >= step:
        why.append(f"shortened from {horizon} days so {MIN_TRAIN_CUTOFFS} training cutoffs fit")
        horizon = longest
    elif longest < step:
        horizon = step
    fit = training_cutoffs_fit(
        span_days, horizon_days=horizon, every_days=step, min_history_days=base.min_history_days
    )
    labels = base.model_copy(
        update={
            "horizon_days": horizon,
            "eligibility": "any_history" if purchase_only else "active",
            "eligibility_days": horizon,
            "train_cutoffs": max(MIN_TRAIN_CUTOFFS, min(base.train_cutoffs, fit)),
        }
    )
    if purchase_only:
        labels = labels.model_copy(update={"activity_roles": ["purchase"]})
    fitted = fit_grid(labels, span_days)
    notes = [*why, *([fitted.note] if fitted.note else [])]
    return GridFit(fitted.labels, fitted.fits, "; ".join(notes))
