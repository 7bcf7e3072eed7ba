"""Replenishment rows per user and SKU as of a cutoff: :func:`build_sku`."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from lapse.config import LapseConfig
from lapse.features import _engine
from lapse.features.registry import SKU_FEATURES
from lapse.schema import DAY_US, ORDER_ID, canonical, days_between, frac_days, utc_cutoff

__all__ = ["build_sku"]

_RATE_DAYS = 28


def build_sku(events: pl.LazyFrame, as_of: datetime, config: LapseConfig) -> pl.DataFrame:
    """One row per (user, SKU) with an order of that SKU before ``as_of``.

    Orders are ``purchase`` events with a SKU; with an ``order_id`` column the
    lines of one order with this SKU are one order of it, at its first line,
    their units summed. Units are ``quantity`` (null = 1) times
    ``features.units_per_pack``. Consumption events without a SKU are charged
    to the SKU the user ordered last before them.

    Parameters
    ----------
    events
        Canonical events.
    as_of
        Timezone-aware cutoff; only events with ``ts < as_of`` are read.
    config
        Roles and ``features.units_per_pack``.

    Returns
    -------
    pl.DataFrame
        ``user_id``, ``sku`` and :data:`lapse.features.registry.SKU_FEATURES`,
        sorted by user and SKU.
    """
    t = utc_cutoff(as_of)
    ts = pl.col("ts")
    ev = canonical(events).filter(ts < t)
    keys = ["user_id", "sku"]
    lines = ev.filter(
        pl.col("event").is_in(config.roles.of("purchase")) & pl.col("sku").is_not_null()
    ).select(*keys, "ts", _engine.units_expr(config).alias("units"), *_order_id(events))
    orders = _per_order(lines, keys).collect()
    gap = (ts.diff().dt.total_microseconds() / DAY_US).over(keys, order_by="ts")
    rows = (
        orders.lazy()
        .with_columns(gap.alias("gap"))
        .group_by(keys)
        .agg(
            pl.len().cast(pl.Int64).alias("order_count"),
            pl.col("units").sum().alias("units_bought"),
            pl.col("units").sort_by("ts").last().alias("last_order_units"),
            ts.min().alias("_first"),
            ts.max().alias("_last"),
            pl.col("gap").mean().alias("mean_order_gap_days"),
            pl.col("gap").std().alias("std_order_gap_days"),
        )
    )
    names = config.roles.of("consumption")
    if names:
        by_time = (
            orders.lazy()
            .select("user_id", "ts", pl.col("sku").alias("_last_sku"))
            .sort("user_id", "ts")
        )
        since = pl.lit(t) - pl.duration(days=_RATE_DAYS)
        used = (
            ev.filter(pl.col("event").is_in(names))
            .select("user_id", "ts", "sku", pl.col("quantity").fill_null(1.0).alias("units"))
            .sort("user_id", "ts")
            .join_asof(by_time, on="ts", by="user_id", check_sortedness=False)
            .with_columns(pl.coalesce("sku", "_last_sku").alias("sku"))
            .group_by(keys)
            .agg(
                pl.col("units").sum().alias("units_consumed"),
                pl.col("units").filter(ts >= since).sum().alias("_recent"),
                ts.min().alias("_first_use"),
            )
        )
        rows = rows.join(used, on=keys, how="left").with_columns(
            pl.col("units_consumed", "_recent").fill_null(0.0)
        )
        span = frac_days(pl.lit(t), pl.col("_first"))
        rate = pl.col("_recent") / pl.min_horizontal(span, float(_RATE_DAYS))
        left = pl.max_horizontal(pl.col("units_bought") - pl.col("units_consumed"), 0.0)
        rows = rows.with_columns(
            left.alias("units_left"),
            rate.alias("consumption_rate_28d"),
            pl.when(rate > 0).then(left / rate).alias("days_of_supply_left"),
        )
    else:
        rows = rows.with_columns(
            pl.lit(None, pl.Float64).alias(c)
            for c in ("units_consumed", "units_left", "consumption_rate_28d", "days_of_supply_left")
        )
    rows = rows.with_columns(
        days_between(pl.lit(t), pl.col("_last")).alias("days_since_last_order"),
        days_between(pl.lit(t), pl.col("_first")).alias("days_since_first_order"),
    )
    return (
        rows.select(*keys, *(pl.col(f.name).cast(f.dtype) for f in SKU_FEATURES))
        .sort(keys)
        .collect()
    )


def _order_id(events: pl.LazyFrame) -> list[str]:
    return [ORDER_ID] if _engine.has_orders(events) else []


def _per_order(lines: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    """One row per order of a key: the lines sharing an order id merged (first ``ts``,
    units summed); lines without one (or without an ``order_id`` column) as they are."""
    if ORDER_ID not in lines.collect_schema():
        return lines
    keyed = pl.col(ORDER_ID).is_not_null()
    merged = (
        lines.filter(keyed).group_by(*keys, ORDER_ID).agg(pl.col("ts").min(), pl.col("units").sum())
    )
    return pl.concat([lines.filter(~keyed), merged], how="diagonal").drop(ORDER_ID)
