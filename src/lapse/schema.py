"""The canonical event schema, the names of event roles, and the cutoff's instant and day.

Every reader maps its source onto these columns; everything downstream
(features, labels, models) sees only this shape. A cutoff is an aware datetime
normalised once, at a job's edge, into a UTC instant (:func:`utc_cutoff`); its
day is the UTC day (:func:`run_day`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Final

import polars as pl

from lapse.exceptions import EventsError, LapseError, MissingColumnsError

__all__ = [
    "DAY",
    "DAY_US",
    "EVENT_COLUMNS",
    "OPTIONAL_EVENT_COLUMNS",
    "ORDER_ID",
    "REQUIRED_EVENT_COLUMNS",
    "ROLES",
    "TS_DTYPE",
    "USER_ID",
    "canonical",
    "days_between",
    "frac_days",
    "run_day",
    "utc_cutoff",
]

USER_ID: Final = "user_id"
TS_DTYPE: Final = pl.Datetime("us", "UTC")
DAY: Final = timedelta(days=1)
DAY_US: Final = 86_400_000_000
"""A day in microseconds (the unit of :data:`TS_DTYPE`)."""


def days_between(later: pl.Expr, earlier: pl.Expr) -> pl.Expr:
    """Whole days (floor) from ``earlier`` to ``later``."""
    return (later - earlier).dt.total_microseconds() // DAY_US


def frac_days(later: pl.Expr, earlier: pl.Expr) -> pl.Expr:
    """Days, with their fraction, from ``earlier`` to ``later``."""
    return (later - earlier).dt.total_microseconds() / DAY_US


EVENT_COLUMNS: Final[dict[str, pl.DataType]] = {
    "user_id": pl.String(),
    "ts": TS_DTYPE,
    "event": pl.String(),
    "sku": pl.String(),
    "quantity": pl.Float64(),
    "revenue": pl.Float64(),
}
REQUIRED_EVENT_COLUMNS: Final = ("user_id", "ts", "event")
OPTIONAL_EVENT_COLUMNS: Final = ("sku", "quantity", "revenue")
ORDER_ID: Final = "order_id"
"""The order key (a string), present only when ``source.order_id`` maps it: a user's
purchase lines sharing it are one order; a null key leaves a row its own order."""

# The pinned role names of the config's `roles` section, in documentation order.
ROLES: Final = (
    "usage",
    "purchase",
    "aha",
    "error",
    "setup_started",
    "setup_completed",
    "consumption",
    "cancel",
    "return",
)


def utc_cutoff(value: datetime, what: str = "as_of") -> datetime:
    """``value`` in UTC; naive datetimes are refused.

    >>> from datetime import timezone
    >>> utc_cutoff(datetime(2024, 3, 10, 1, 30, tzinfo=timezone(-timedelta(hours=5))))
    datetime.datetime(2024, 3, 10, 6, 30, tzinfo=datetime.timezone.utc)
    """
    if not isinstance(value, datetime):
        raise LapseError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise LapseError(
            f"{what}={value.isoformat()} has no timezone; pass an aware datetime, "
            "e.g. datetime(2024, 5, 1, tzinfo=timezone.utc)"
        )
    return value.astimezone(UTC)


def run_day(value: date | str) -> date:
    """The day of a cutoff: an aware datetime's UTC day; a date (or an ISO date, as a record's
    ``as_of`` reads back from JSON) is its own day.

    >>> from datetime import timezone
    >>> run_day(datetime(2024, 3, 9, 20, 30, tzinfo=timezone(-timedelta(hours=5))))
    datetime.date(2024, 3, 10)
    >>> run_day("2024-03-10")
    datetime.date(2024, 3, 10)
    """
    if isinstance(value, datetime):
        return utc_cutoff(value).date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(value)


def canonical(events: pl.LazyFrame, columns: Sequence[str] | None = None) -> pl.LazyFrame:
    """The canonical columns of ``events``; absent optional columns become nulls.

    ``columns`` keeps only those (in canonical order); the default keeps all.
    ``order_id`` is kept (as a string, last) when ``events`` has it and it is
    asked for; it is never invented.
    """
    schema = events.collect_schema()
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in schema]
    if missing:
        raise MissingColumnsError(
            f"events lack required columns {missing}; have {list(schema)}. "
            "Read events through lapse.events so they get the canonical schema."
        )
    ts_type = schema["ts"]
    if not isinstance(ts_type, pl.Datetime) or ts_type.time_zone is None:
        raise EventsError(
            f"events column 'ts' must be a timezone-aware datetime (UTC), got {ts_type}; "
            "read events through lapse.events, which converts stamps to UTC"
        )
    optional = {"sku": pl.String(), "quantity": pl.Float64(), "revenue": pl.Float64()}
    cols = [
        pl.col(USER_ID).cast(pl.String),
        pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.col("event").cast(pl.String),
    ]
    for name in OPTIONAL_EVENT_COLUMNS:
        cols.append(
            pl.col(name).cast(optional[name])
            if name in schema
            else pl.lit(None, dtype=optional[name]).alias(name)
        )
    if ORDER_ID in schema:
        cols.append(pl.col(ORDER_ID).cast(pl.String))
    if columns is not None:
        keep = set(columns)
        cols = [c for c in cols if c.meta.output_name() in keep]
    return events.select(cols)
