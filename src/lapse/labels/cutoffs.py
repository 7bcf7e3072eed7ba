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

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import LapseError

__all__ = ["CutoffGrid", "cutoff_grid", "data_span", "grid_for_test"]


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
