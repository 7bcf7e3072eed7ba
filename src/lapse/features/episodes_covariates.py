"""Orders and point-in-time covariates of replenishment episodes.

An *order* is the ``purchase`` events of a user (and, for the ``"sku"``
target, of one SKU) sharing an ``order_id`` (``source.order_id``), stamped
with its first line's time (orders at the same instant are one). Without an
order id, it is every such event on
one UTC calendar day: several lines or invoices on the same day are one order,
stamped with the day's first purchase time. The ``"any"`` target keys orders
by user alone, with ``sku = "*"``.

Each order's covariates use the order itself (units, revenue, lines) and
events strictly before its timestamp, so nothing here sees the future.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

import polars as pl

from lapse.config import LapseConfig
from lapse.features import _engine
from lapse.schema import ORDER_ID, canonical, frac_days, utc_cutoff

__all__ = ["ANY_SKU", "COVARIATES", "order_covariates", "order_keys", "purchase_orders"]

Target = Literal["sku", "any"]
ANY_SKU: Final = "*"
"""The ``sku`` key of orders and episodes of the ``"any"`` target."""

COVARIATES: Final[dict[str, str]] = {
    "order_units": "units in this order (quantity x units per pack)",
    "order_revenue": "revenue of this order (null when the source has none)",
    "order_lines": "purchase events merged into this order",
    "prior_orders": "earlier orders of the same target",
    "prev_gap_days": "days from the previous order to this one; null for the first",
    "mean_gap_days": "mean gap in days over the orders up to this one; null for the first",
    "days_since_first_order": "days since the first order of the same target",
    "units_on_hand": "units bought minus consumed before this order (>= 0); null without telemetry",
    "consumption_rate_28d": "units consumed per day over the 28 days before (cut to the "
    "time since the first order); null without telemetry or history",
    "supply_days": "(units on hand + order units) / consumption rate: the deterministic "
    "depletion estimate in days; null when the rate is 0 or unknown",
    "usage_28d": "`usage` events of the user in the 28 days before; null without a usage role",
    "usage_trend_14d": "usage in the last 14 days / the 14 days before; null when the latter is 0",
}
"""Covariate name -> meaning, as :func:`order_covariates` returns them."""

_KEYS: Final = ("user_id", "sku")
_RATE_DAYS: Final = 28


def _units(config: LapseConfig, per_pack: dict[str, float]) -> pl.Expr:
    qty = pl.col("quantity").fill_null(1.0)
    packs = {**config.features.units_per_pack, **per_pack}
    if not packs:
        return qty
    factor = pl.col("sku").replace_strict(packs, default=1.0, return_dtype=pl.Float64)
    return qty * factor.fill_null(1.0)


def order_keys(events: pl.LazyFrame) -> list[pl.Expr]:
    """What tells a user's orders apart: the ``order_id``, else the UTC day of ``ts``.

    With an ``order_id`` column, rows without one fall back to their day.
    """
    day = pl.col("ts").dt.truncate("1d")
    if not _engine.has_orders(events):
        return [day.alias("_day")]
    keyed = pl.col(ORDER_ID).is_not_null()
    return [pl.col(ORDER_ID), pl.when(~keyed).then(day).alias("_day")]


def purchase_orders(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    until: datetime,
    skus: dict[str, float] | None,
    target: Target,
) -> pl.DataFrame:
    """Orders with ``ts < until``: ``user_id, sku, ts, units, revenue, lines``.

    Parameters
    ----------
    until
        Timezone-aware end (exclusive).
    skus
        Consumable SKU -> units per pack (``"sku"`` target: only these SKUs).
    target
        ``"sku"``: one key per user and SKU; ``"any"``: one key per user.
    """
    t = utc_cutoff(until, "until")
    ev = canonical(events).filter(
        (pl.col("ts") < t) & pl.col("event").is_in(config.roles.of("purchase"))
    )
    per_pack = dict(skus or {})
    if target == "sku":
        ev = ev.filter(pl.col("sku").is_in(list(per_pack)))
        key = pl.col("sku")
    else:
        key = pl.lit(ANY_SKU)
    sums = [pl.col("units").sum(), pl.col("revenue").sum(), pl.col("lines").sum()]
    orders = (
        ev.with_columns(
            key.alias("_key"),
            _units(config, per_pack).alias("units"),
            pl.lit(1, pl.Int64).alias("lines"),
        )
        .group_by("user_id", "_key", *order_keys(events))
        .agg(pl.col("ts").min(), *sums)
    )
    if _engine.has_orders(events):
        # two orders of one key at the same instant are one: an episode cannot last 0 days
        orders = orders.group_by("user_id", "_key", "ts").agg(sums)
    return (
        orders.select("user_id", pl.col("_key").alias("sku"), "ts", "units", "revenue", "lines")
        .sort("user_id", "sku", "ts")
        .collect()
    )


def _tick(ts: pl.Expr, later: pl.Expr) -> pl.Expr:
    """A time as one sortable integer: ``later`` rows sort after the others at equal times."""
    return ts.dt.epoch("us") * 2 + later.cast(pl.Int64)


#: Most probes per key for which :func:`_sums_before` joins the events to the probes
#: (each event meets at most this many probes) instead of sorting events and probes together.
JOIN_PROBES: Final = 4


def _sums_before(
    events: pl.LazyFrame, probes: pl.DataFrame, keys: list[str], at: dict[str, pl.Expr]
) -> pl.DataFrame:
    """Per probe ``_row`` and each ``name: at``: the sum of the events' ``_w`` with the
    probe's ``keys`` and ``ts`` strictly before ``at`` (0 when none, or ``at`` is null).

    With few probes per key (the open episodes a score reads: one order per key) the
    events join their key's probes and each sum is a conditional sum per probe, which
    is several times faster than a sort; with many (every order, as training reads
    them) events and probe times are sorted together, probes first at equal times, and
    a running sum per key is read off at the probe rows (no as-of join by key).
    """
    if probes.height == 0:
        return probes.select("_row", *(pl.lit(0.0).alias(name) for name in at))
    most = probes.group_by(keys).len()["len"].max()
    if isinstance(most, int) and most <= JOIN_PROBES:
        return _sums_joined(events, probes, keys, at)
    stamps = pl.concat(
        probes.lazy().select(
            *keys,
            _tick(at_time, pl.lit(False)).alias("_t"),
            pl.lit(0.0).alias("_w"),
            "_row",
            pl.lit(k).alias("_at"),
        )
        for k, at_time in enumerate(at.values())
    )
    marks = events.select(
        *keys,
        _tick(pl.col("ts"), pl.lit(True)).alias("_t"),
        pl.col("_w").cast(pl.Float64),
        pl.lit(None, pl.UInt32).alias("_row"),
        pl.lit(None, pl.Int32).alias("_at"),
    )
    summed = (
        pl.concat([stamps, marks])
        .sort(*keys, "_t")
        .with_columns(pl.col("_w").cum_sum().over(keys).alias("_sum"))
        .filter(pl.col("_row").is_not_null())
        .select("_row", "_at", "_sum")
        .collect()
    )
    out = probes.select("_row")
    for k, name in enumerate(at):
        part = summed.filter(pl.col("_at") == k).select("_row", pl.col("_sum").alias(name))
        out = out.join(part, on="_row", how="left", maintain_order="left")
    return out.with_columns(pl.col(name).fill_null(0.0) for name in at)


def _sums_joined(
    events: pl.LazyFrame, probes: pl.DataFrame, keys: list[str], at: dict[str, pl.Expr]
) -> pl.DataFrame:
    """:func:`_sums_before` by joining each event to its key's probes (few per key)."""
    times = probes.lazy().select(
        *keys, "_row", *(t.alias(f"_at{k}") for k, t in enumerate(at.values()))
    )
    ts, w = pl.col("ts"), pl.col("_w").cast(pl.Float64)
    summed = (
        events.select(*keys, "ts", "_w")
        .join(times, on=keys)
        .group_by("_row")
        .agg(pl.when(ts < pl.col(f"_at{k}")).then(w).sum().alias(name) for k, name in enumerate(at))
        .collect(engine="streaming")
    )
    return (
        probes.select("_row")
        .join(summed, on="_row", how="left", maintain_order="left")
        .with_columns(pl.col(name).fill_null(0.0) for name in at)
    )


def _consumed(ev: pl.LazyFrame, orders: pl.DataFrame, consumption: list[str]) -> pl.LazyFrame:
    """Consumption events as ``user_id, sku, ts, _w`` (units used).

    An event without a SKU counts toward the user's last order at or before it
    (``"any"`` target: toward the user).
    """
    used = ev.filter(pl.col("event").is_in(consumption)).select(
        "user_id", "ts", "sku", pl.col("quantity").fill_null(1.0).alias("_w")
    )
    if orders["sku"].first() == ANY_SKU:
        return used.with_columns(pl.lit(ANY_SKU).alias("sku"))
    # the events without a SKU sorted with the orders (orders first at equal times, as an
    # as-of join that allows exact matches); a forward fill carries each order's SKU
    # and user on, and an event keeps the SKU when the order was its own user's
    marks = orders.lazy().select(
        "user_id", "ts", pl.col("sku").alias("_last"), pl.col("user_id").alias("_of")
    )
    bare = used.filter(pl.col("sku").is_null()).drop("sku")
    attributed = (
        pl.concat([marks, bare], how="diagonal")
        .sort("user_id", _tick(pl.col("ts"), pl.col("_w").is_not_null()), maintain_order=True)
        .with_columns(pl.col("_last", "_of").forward_fill())
        .filter(pl.col("_w").is_not_null() & (pl.col("_of") == pl.col("user_id")))
        .select("user_id", pl.col("_last").alias("sku"), "ts", "_w")
    )
    known = used.filter(pl.col("sku").is_not_null()).select("user_id", "sku", "ts", "_w")
    return pl.concat([known, attributed])


def order_covariates(
    events: pl.LazyFrame,
    orders: pl.DataFrame,
    config: LapseConfig,
    *,
    only: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Covariates (:data:`COVARIATES`) of each order, from events before it.

    Parameters
    ----------
    events
        Canonical events.
    orders
        :func:`purchase_orders`' frame.
    config
        Roles (``usage``, ``consumption``).
    only
        ``user_id, sku, ts`` of the orders whose covariates are wanted (the open
        episodes a score reads); every order still counts as an earlier order of
        the others. Default: every order.

    Returns
    -------
    pl.DataFrame
        ``user_id, sku, ts`` and the covariates, in ``orders``' order (of the orders
        in ``only``, when given).
    """
    keys = list(_KEYS)
    ts = pl.col("ts")
    gap = frac_days(ts, ts.shift(1)).over(keys, order_by="ts")
    base = (
        orders.lazy()
        .with_row_index("_row")
        .with_columns(
            pl.col("units").alias("order_units"),
            pl.col("revenue").alias("order_revenue"),
            pl.col("lines").cast(pl.Float64).alias("order_lines"),
            pl.int_range(pl.len()).over(keys, order_by="ts").cast(pl.Float64).alias("prior_orders"),
            gap.alias("prev_gap_days"),
            frac_days(ts, ts.min().over(keys)).alias("days_since_first_order"),
        )
        .with_columns(
            (pl.col("days_since_first_order") / pl.col("prior_orders"))
            .fill_nan(None)
            .alias("mean_gap_days"),
            (pl.col("units").cum_sum().over(keys, order_by="ts") - pl.col("units")).alias(
                "_bought_before"
            ),
        )
        .collect()
    )
    if only is not None:
        wanted = only.select(*keys, "ts")
        base = base.join(wanted, on=[*keys, "ts"], how="semi", maintain_order="left")
    if_null = pl.lit(None, pl.Float64)
    ev = canonical(events)
    t_max = base["ts"].max() if base.height else None
    if t_max is not None:
        ev = ev.filter(pl.col("ts") < t_max)
    consumption = config.roles.of("consumption")
    if consumption and base.height:
        back = ts - pl.duration(days=_RATE_DAYS)
        used = _sums_before(
            _consumed(ev, orders, consumption),
            base,
            keys,
            {"_used_before": ts, "_used_back": back},
        )
        base = base.join(used, on="_row", how="left", maintain_order="left")
        span = pl.min_horizontal(pl.col("days_since_first_order"), float(_RATE_DAYS))
        rate = pl.when(span >= 1.0).then((pl.col("_used_before") - pl.col("_used_back")) / span)
        on_hand = pl.max_horizontal(pl.col("_bought_before") - pl.col("_used_before"), 0.0)
        base = base.with_columns(on_hand.alias("units_on_hand"), rate.alias("consumption_rate_28d"))
        base = base.with_columns(
            pl.when(pl.col("consumption_rate_28d") > 0)
            .then((pl.col("units_on_hand") + pl.col("units")) / pl.col("consumption_rate_28d"))
            .alias("supply_days")
        )
    else:
        base = base.with_columns(
            if_null.alias(c) for c in ("units_on_hand", "consumption_rate_28d", "supply_days")
        )
    usage = config.roles.of("usage")
    if usage and base.height:
        counts = _sums_before(
            ev.filter(pl.col("event").is_in(usage)).select(
                "user_id", "ts", pl.lit(1.0).alias("_w")
            ),
            base,
            ["user_id"],
            {
                name: ts - pl.duration(days=days)
                for name, days in (("_u0", 0), ("_u14", 14), ("_u28", 28))
            },
        )
        base = base.join(counts, on="_row", how="left", maintain_order="left")
        recent, before = pl.col("_u0") - pl.col("_u14"), pl.col("_u14") - pl.col("_u28")
        base = base.with_columns(
            (pl.col("_u0") - pl.col("_u28")).alias("usage_28d"),
            pl.when(before > 0).then(recent / before).alias("usage_trend_14d"),
        )
    else:
        base = base.with_columns(if_null.alias(c) for c in ("usage_28d", "usage_trend_14d"))
    return base.sort("_row").select(*keys, "ts", *(pl.col(c).cast(pl.Float64) for c in COVARIATES))
