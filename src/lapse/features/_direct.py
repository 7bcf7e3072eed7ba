"""One cutoff straight from the events: one ``group_by`` per user.

:func:`build_one` is the single-cutoff path of :func:`lapse.features.build`.
It shares no state machinery with the multi-cutoff roll-up in
:mod:`lapse.features._engine`, so the property ``build_many == build``
compares two independent implementations.

1. Events with ``ts < T`` (only the columns the feature set needs) get a few
   cheap per-row flags: one ``is_in`` per role, one ``ts >= T - d`` per
   window edge, and the day offset ``k`` (whole UTC days before the day of
   ``T - 1us``).
2. One ``group_by("user_id")`` on the streaming engine computes every count,
   sum, first and last as a conditional aggregation. Distinct active days in
   the windows come from per-user bitmasks over ``k`` (a ``bitwise_or`` per
   64 days), not from ``n_unique``.
3. The full set adds two small side aggregations: active days over the whole
   history (one bitmask per user and 64-day block, expanded to days for the
   streaks, gaps and weeks) and squared gaps between purchases.

With an ``order_id`` column every count (events, roles, milestones, orders)
takes one row per order: the later lines of an order carry ``_one = False``
(:func:`lapse.features._engine.first_line`); sums (revenue, units) and active
days still read every line.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl

from lapse.config import LapseConfig
from lapse.features._engine import _days_between as _days
from lapse.features._engine import (
    _frac_days,
    _ratio,
    first_line,
    has_orders,
    units_expr,
)
from lapse.features.registry import CORE_WINDOWS, expand, windows_of
from lapse.schema import DAY_US, ROLES, canonical

FeatureSet = Literal["core", "all"]

_USER = "user_id"
_CODE = "_user_code"
_SLOPE_WEEKS = 8
_WORD = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# roles whose last event (and, for two of them, first event) the full set needs
_LAST_ALL = ("usage", "purchase", "error", "aha", "setup_started", "setup_completed")


# conditional aggregations are written ``when(cond).then(x).max()``, not
# ``x.filter(cond).max()``: the streaming group_by runs the former much faster


def _flag(config: LapseConfig, role: str) -> pl.Expr:
    names = config.roles.of(role)
    return pl.col("event").is_in(names) if names else pl.lit(False)


def _pow2(bit: pl.Expr) -> pl.Expr:
    return pl.lit(2, dtype=pl.UInt64).pow(bit.cast(pl.UInt64))


def _active_history(lf: pl.LazyFrame, last_day: int) -> pl.DataFrame:
    """Per user: active days, weeks, first/last active day offset and streaks.

    Days are offsets ``k`` before the day of ``T - 1us`` (0 = that day).
    """
    k = pl.col("_k")
    blocks = (
        lf.group_by(_USER, (k // _WORD).alias("_blk"))
        .agg(_pow2(k % _WORD).bitwise_or().alias("_bits"))
        .collect(engine="streaming")
    )
    # users as dense integer codes: the expanded days sort and group by a number
    users = blocks[_USER].unique()
    codes = pl.int_range(users.len(), dtype=pl.UInt32, eager=True)
    # (cast: on an empty column replace_strict keeps the input's dtype)
    code = blocks[_USER].replace_strict(users, codes, return_dtype=pl.UInt32).cast(pl.UInt32)
    # expand each 64-day bitmask to its set bits: (row, bit) -> day offset
    words = blocks["_bits"].to_numpy().astype("<u8", copy=False)
    bits = np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    row, bit = np.nonzero(bits)
    at = pl.Series(row, dtype=pl.UInt32)
    days = pl.DataFrame(
        {
            _CODE: code.gather(at),
            "_k": blocks["_blk"].gather(at).cast(pl.Int64) * _WORD + pl.Series(bit, dtype=pl.Int64),
        }
    ).sort(_CODE, "_k")
    kk = pl.col("_k")
    epoch_day = pl.lit(last_day, dtype=pl.Int64) - kk
    # ISO weeks start on Monday; 1970-01-01 was a Thursday
    week = (epoch_day + 3) // 7
    new_run = ((kk - kk.shift(1)) != 1) | (pl.col(_CODE) != pl.col(_CODE).shift(1))
    runs = (
        days.lazy()
        .with_columns(new_run.fill_null(True).cum_sum().alias("_run"), week.alias("_week"))
        .group_by(_CODE, "_run")
        .agg(pl.len().alias("_len"), kk.min().alias("_kmin"))
        .group_by(_CODE)
        .agg(
            pl.col("_len").max().alias("longest"),
            pl.col("_len").filter(pl.col("_kmin") == 0).sum().alias("current"),
        )
    )
    per_user = (
        days.lazy()
        .group_by(_CODE)
        .agg(
            pl.len().alias("c_days"),
            week.n_unique().alias("c_weeks"),
            kk.min().alias("k_last"),
            kk.max().alias("k_first"),
        )
    )
    out = per_user.join(runs, on=_CODE, how="left").collect()
    return out.select(users.gather(out[_CODE]).alias(_USER), pl.exclude(_CODE))


def _order_gaps(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Per user: sum of squared gaps (days) between consecutive purchases."""
    gap = pl.col("ts").diff().dt.total_microseconds() / DAY_US
    return (
        lf.filter(pl.col("_r_purchase"))
        .select(_USER, "ts")
        .sort(_USER, "ts")
        .with_columns(gap.pow(2).over(_USER).fill_null(0.0).alias("_sq"))
        .group_by(_USER)
        .agg(pl.col("_sq").sum().alias("c_p_sq"))
    )


def build_one(
    events: pl.LazyFrame, t: datetime, config: LapseConfig, feature_set: FeatureSet
) -> pl.DataFrame:
    """Feature rows as of the UTC instant ``t`` (``user_id`` then features, sorted)."""
    full = feature_set == "all"
    windows = windows_of(config) if full else list(CORE_WINDOWS)
    roles = ROLES if full else ("usage", "purchase")
    telemetry = bool(config.roles.of("consumption"))
    cols = ["user_id", "ts", "event", "sku", "quantity", "revenue", "order_id"]
    ts, c = pl.col("ts"), pl.col
    core_cols = ["user_id", "ts", "event", "revenue", "order_id"]
    lf = canonical(events, cols if full else core_cols).filter(ts < t)
    orders = has_orders(events)
    if orders:
        lf = lf.with_columns(first_line(config).alias("_one"))

    def counted(flag: pl.Expr) -> pl.Expr:
        """``flag`` on the rows that count as one event (every row without order ids)."""
        return flag & c("_one") if orders else flag

    # window edges: every window, and for the full set the 8 weekly edges of the slope
    edges = sorted(set(windows) | ({7 * k for k in range(1, _SLOPE_WEEKS + 1)} if full else set()))
    last_day = (t - timedelta(microseconds=1) - _EPOCH).days
    midnight = t == t.replace(hour=0, minute=0, second=0, microsecond=0)
    k = pl.lit(last_day, dtype=pl.Int32) - ts.dt.date().cast(pl.Int32)
    flags = [counted(_flag(config, r)).alias(f"_r_{r}") for r in roles]
    flags += [(ts >= t - timedelta(days=d)).alias(f"_in{d}") for d in edges]
    if full:
        flags += [
            pl.when(_flag(config, "purchase")).then(units_expr(config)).alias("_ub"),
            pl.when(_flag(config, "consumption")).then(c("quantity").fill_null(1.0)).alias("_uc"),
            *(
                counted(c("event") == m.event).alias(f"_ms{i}")
                for i, m in enumerate(config.milestones)
            ),
        ]
    lf = lf.with_columns(*flags, k.alias("_k"))

    r = {role: c(f"_r_{role}") for role in roles}
    inw = {d: c(f"_in{d}") for d in edges}
    kk = c("_k")
    aggs: list[pl.Expr] = [
        ts.min().alias("first_event"),
        *(pl.when(r[x]).then(ts).max().alias(f"last_{x}") for x in (_LAST_ALL if full else roles)),
    ]
    for w in windows:
        aggs += [
            (r["usage"] & inw[w]).sum().alias(f"usage_count_{w}d"),
            (r["purchase"] & inw[w]).sum().alias(f"purchase_count_{w}d"),
            pl.when(inw[w]).then(c("revenue")).sum().alias(f"revenue_{w}d"),
        ]
        if not midnight:  # the day cut by T - W counts when it has an event at or after T - W
            aggs.append((inw[w] & (kk == w)).any().alias(f"_part{w}"))
    # active days in the windows: one bitmask per 64 day offsets
    n_words = max(windows) // _WORD + 1
    for j in range(n_words):
        inside = (kk >= j * _WORD) & (kk < (j + 1) * _WORD)
        aggs.append(
            pl.when(inside)
            .then(_pow2((kk - j * _WORD).clip(0, _WORD - 1)))
            .otherwise(pl.lit(0, dtype=pl.UInt64))
            .bitwise_or()
            .alias(f"_w{j}")
        )
    if full:
        aggs += [
            c("_one").sum().alias("n_event") if orders else pl.len().alias("n_event"),
            ts.max().alias("last_event"),
            pl.when(r["purchase"]).then(ts).min().alias("first_purchase"),
            pl.when(r["aha"]).then(ts).min().alias("first_aha"),
            r["purchase"].sum().alias("n_purchase"),
            c("_ub").sum().alias("units_bought"),
            c("_uc").sum().alias("units_consumed"),
        ]
        for w in windows:
            aggs += [
                counted(inw[w]).sum().alias(f"event_count_{w}d"),
                *(
                    (r[x] & inw[w]).sum().alias(f"{x}_count_{w}d")
                    for x in roles
                    if x not in ("usage", "purchase")
                ),
                pl.when(inw[w]).then(c("_ub")).sum().alias(f"units_bought_{w}d"),
                pl.when(inw[w]).then(c("_uc")).sum().alias(f"_uc{w}"),
            ]
        aggs += [(r["usage"] & inw[d]).sum().alias(f"_u{d}") for d in edges if d not in windows]
        for i in range(len(config.milestones)):
            aggs += [
                c(f"_ms{i}").sum().alias(f"_ms{i}"),
                (c(f"_ms{i}") & inw[7]).sum().alias(f"_ms{i}_7"),
            ]
    main = lf.group_by(_USER).agg(aggs)
    if full:
        gaps = _order_gaps(lf)
        main_df, gaps_df = pl.collect_all([main, gaps], engine="streaming")
        hist = _active_history(lf.select(_USER, "_k"), last_day)
        state = main_df.join(hist, on=_USER, how="left").join(gaps_df, on=_USER, how="left")
    else:
        state = main.collect(engine="streaming")

    tl = pl.lit(t, dtype=pl.Datetime("us", "UTC"))
    out: dict[str, pl.Expr] = {}
    for w in windows:
        count = pl.lit(0, dtype=pl.UInt32)
        for j in range(n_words):
            lo, hi = j * _WORD, min((j + 1) * _WORD, w)
            if hi <= lo:
                continue
            mask = ((1 << (hi - lo)) - 1) << 0
            count = count + (c(f"_w{j}") & pl.lit(mask, dtype=pl.UInt64)).bitwise_count_ones()
        if not midnight:
            count = count + c(f"_part{w}").cast(pl.UInt32)
        out[f"active_days_{w}d"] = count
        out[f"usage_count_{w}d"] = c(f"usage_count_{w}d")
        out[f"purchase_count_{w}d"] = c(f"purchase_count_{w}d")
        out[f"revenue_{w}d"] = c(f"revenue_{w}d")
    out["days_since_last_usage"] = _days(tl, c("last_usage"))
    out["days_since_last_purchase"] = _days(tl, c("last_purchase"))
    out["tenure_days"] = _days(tl, c("first_event"))
    u7, u14, u28 = (c(f"usage_count_{w}d").cast(pl.Int64) for w in (7, 14, 28))
    out["decay_ratio_14d"] = _ratio(u14, u28 - u14)
    out["dropping_ratio_7d"] = _ratio(u7, (u28 - u7) / 3.0)
    if full:
        _further(out, windows, config, telemetry, tl)

    dtypes = expand(config, feature_set)
    assert set(dtypes) == set(out), set(dtypes) ^ set(out)
    return state.select(
        _USER, *(out[name].cast(dtype).alias(name) for name, dtype in dtypes.items())
    ).sort(_USER)


def _further(
    out: dict[str, pl.Expr],
    windows: list[int],
    config: LapseConfig,
    telemetry: bool,
    t: pl.Expr,
) -> None:
    """The features beyond the core set, from the full state columns."""
    c = pl.col
    for w in windows:
        out[f"event_count_{w}d"] = c(f"event_count_{w}d")
        for x in ROLES:
            out[f"{x}_count_{w}d"] = c(f"{x}_count_{w}d")
        out[f"units_bought_{w}d"] = c(f"units_bought_{w}d")
        out[f"units_consumed_{w}d"] = c(f"_uc{w}") if telemetry else pl.lit(None)
    for x in ("event", "aha", "error"):
        out[f"days_since_last_{x}"] = _days(t, c(f"last_{x}"))
    first_purchase, first_aha = c("first_purchase"), c("first_aha")
    out["days_since_first_purchase"] = _days(t, first_purchase)
    out["events_per_active_day"] = _ratio(c("n_event"), c("c_days"))
    out["events_per_active_week"] = _ratio(c("n_event"), c("c_weeks"))
    gap = pl.when(c("c_days") >= 2).then(
        (c("k_first") - c("k_last")).cast(pl.Float64) / (c("c_days") - 1)
    )
    out["mean_active_gap_days"] = gap
    out["recency_over_mean_gap"] = _frac_days(t, c("last_event")) / gap

    def usage_within(d: int) -> pl.Expr:
        name = f"usage_count_{d}d" if d in windows else f"_u{d}"
        return c(name).cast(pl.Int64)

    # weekly usage, oldest week x=1 ... latest x=8; slope = sum((x - 4.5) * y) / 42
    xbar = (_SLOPE_WEEKS + 1) / 2
    sxx = sum((x - xbar) ** 2 for x in range(1, _SLOPE_WEEKS + 1))
    terms = []
    for k in range(1, _SLOPE_WEEKS + 1):
        newer = usage_within(7 * (k - 1)) if k > 1 else pl.lit(0, dtype=pl.Int64)
        y = usage_within(7 * k) - newer
        terms.append((_SLOPE_WEEKS + 1 - k - xbar) * y.cast(pl.Float64))
    out["usage_slope_8w"] = pl.sum_horizontal(terms) / sxx
    out["current_streak_days"] = c("current").fill_null(0)
    out["longest_streak_days"] = c("longest")

    out["aha_reached"] = first_aha.is_not_null()
    out["days_purchase_to_aha"] = _days(first_aha, first_purchase)
    for i, m in enumerate(config.milestones):
        now = c(f"_ms{i}").cast(pl.Int64)
        before = now - c(f"_ms{i}_7").cast(pl.Int64)
        out[f"milestone_{m.name}_count"] = now
        if m.every_n is not None:
            crossed = (now // m.every_n) > (before // m.every_n)
        else:
            crossed = pl.any_horizontal(
                [pl.lit(False), *(((before < n) & (now >= n)) for n in m.at_counts or [])]
            )
        out[f"milestone_{m.name}_crossed_7d"] = crossed
    ss, sc = c("last_setup_started"), c("last_setup_completed")
    out["setup_incomplete"] = ss.is_not_null() & (sc.is_null() | (sc < ss)).fill_null(True)

    orders = c("n_purchase").cast(pl.Int64)
    bought, consumed = c("units_bought"), c("units_consumed")
    out["order_count"] = orders
    out["units_bought_total"] = bought
    if telemetry:
        left = pl.when(orders > 0).then(pl.max_horizontal(bought - consumed, 0.0))
        span = pl.min_horizontal(_frac_days(t, c("first_event")), 28.0)
        rate = c("_uc28") / span
        out["units_consumed_total"] = consumed
        out["units_left"] = left
        out["consumption_rate_28d"] = rate
        out["days_of_supply_left"] = pl.when(rate > 0).then(left / rate)
    else:
        for name in ("units_consumed_total", "units_left", "consumption_rate_28d"):
            out[name] = pl.lit(None)
        out["days_of_supply_left"] = pl.lit(None)
    n_gaps = orders - 1
    mean_gap = pl.when(n_gaps >= 1).then(_frac_days(c("last_purchase"), first_purchase) / n_gaps)
    var = (c("c_p_sq").fill_null(0.0) - n_gaps * mean_gap.pow(2)) / (n_gaps - 1)
    out["mean_order_gap_days"] = mean_gap
    out["std_order_gap_days"] = pl.when(n_gaps >= 2).then(var.clip(lower_bound=0.0).sqrt())
