"""One cutoff straight from the events: a ``group_by`` per user.

:func:`build_one` is the single-cutoff path of :func:`lapse.features.build`.
It shares no state machinery with the multi-cutoff roll-up in
:mod:`lapse.features._engine`, so the property ``build_many == build``
compares two independent implementations.

1. Events with ``ts < T`` (only the columns the feature set needs) become
   rows of measures (:func:`_measures`): whether the row counts as an event,
   its time, the first window edge it is inside (``_bin``: window and slope
   edges are nested, so "inside ``T - d``" is ``_bin <= index of d``), and
   its day offset ``k`` (whole UTC days before the day of ``T - 1us``) as a
   64-day block and a bit.
2. The core set aggregates those rows per user in one streaming
   ``group_by``: role and window flags are conditions on the event name
   and ``_bin``; distinct active days in the windows come from per-user
   bitmasks over ``k`` (a ``bitwise_or`` per 64 days), not from
   ``n_unique``.
3. The full set (about 80 conditional aggregations) first sums the measure
   rows per user, event name, ``_bin`` and block (:func:`_rollup`: about ten
   times fewer rows, every flag constant within a group), then runs the same
   aggregations on that roll-up. Active days over the whole history (streaks,
   gaps, weeks) come from its bitmasks; units bought and squared gaps between
   purchases from two small queries over the purchase rows.

With an ``order_id`` column every count (events, roles, milestones, orders)
takes one row per order: the later lines of an order carry ``_one = False``
(:func:`lapse.features._engine.first_line`); sums (revenue, units) and active
days still read every line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl

from lapse.config import LapseConfig
from lapse.features._engine import first_line, has_orders, ratio, units_expr
from lapse.features.registry import CORE_WINDOWS, expand, windows_of
from lapse.schema import DAY_US, ROLES, canonical, days_between, frac_days

FeatureSet = Literal["core", "all"]

_USER = "user_id"
#: Bits unpacked at once by :func:`_active_history` (a byte each): 64 MB.
_CHUNK_BITS = 1 << 26
_SLOPE_WEEKS = 8
_WORD = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# roles whose last event (and, for two of them, first event) the full set needs
_LAST_ALL = ("usage", "purchase", "error", "aha", "setup_started", "setup_completed")
_HISTORY = {
    "c_days": pl.UInt32(),
    "c_weeks": pl.UInt32(),
    "k_last": pl.Int64(),
    "k_first": pl.Int64(),
    "longest": pl.UInt32(),
    "current": pl.UInt32(),
}


# conditional aggregations are written ``when(cond).then(x).max()``, not
# ``x.filter(cond).max()``: the streaming group_by runs the former much faster


@dataclass(frozen=True)
class _Spec:
    """What one build computes: the feature set, its windows and roles, the cutoff's kind."""

    full: bool
    windows: list[int]
    roles: tuple[str, ...]
    orders: bool
    midnight: bool
    telemetry: bool


def _flag(config: LapseConfig, role: str) -> pl.Expr:
    names = config.roles.of(role)
    return pl.col("event").is_in(names) if names else pl.lit(False)


def _pow2(bit: pl.Expr) -> pl.Expr:
    return pl.lit(2, dtype=pl.UInt64).pow(bit.cast(pl.UInt64))


def _active_history(words: pl.DataFrame, last_day: int) -> pl.DataFrame:
    """Per user (``words``' rows, in their order): active days, weeks, first/last active
    day offset and streaks.

    ``words`` holds ``_w0``, ``_w1``, ... per user: the 64-day bitmasks of day offsets
    ``k`` before the day of ``T - 1us`` (0 = that day; bit ``k % 64`` of word
    ``k // 64`` set for each active day), every block of the history. Unpacked a
    chunk of users at a time, they give the active days in (user, ``k``) order, and
    every statistic is a sum, count or maximum over consecutive runs of them.
    """
    rows_per_chunk = max(1, _CHUNK_BITS // (_WORD * words.width))
    parts = [
        _history_of(words.slice(i, rows_per_chunk).to_numpy(), last_day)
        for i in range(0, words.height, rows_per_chunk)
    ]
    return pl.concat(parts) if parts else pl.DataFrame(schema=_HISTORY)


def _history_of(words: np.ndarray, last_day: int) -> pl.DataFrame:
    """:func:`_active_history` of one chunk: ``words`` is users x blocks (uint64)."""
    packed = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    bits = np.unpackbits(packed.reshape(len(words), -1), axis=1, bitorder="little")
    user, k = np.nonzero(bits)  # row-major: by user, then k ascending
    n = len(k)
    if n == 0:
        return pl.DataFrame(schema=_HISTORY)
    k = k.astype(np.int64)

    def starts(new: np.ndarray) -> np.ndarray:
        new[0] = True
        return np.flatnonzero(new)

    new_user = np.empty(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    first = starts(new_user)
    last = np.append(first[1:], n) - 1
    # ISO weeks start on Monday; 1970-01-01 was a Thursday
    week = (last_day - k + 3) // 7
    new_week = new_user.copy()
    new_week[1:] |= week[1:] != week[:-1]
    new_run = new_user.copy()
    new_run[1:] |= (k[1:] - k[:-1]) != 1
    runs = starts(new_run)
    run_len = np.diff(np.append(runs, n))
    user_runs = np.flatnonzero(new_user[runs])  # each user's first run, among the runs
    k_last = k[first]
    assert len(first) == len(words), "every user has an active day before the cutoff"
    return pl.DataFrame(
        {
            "c_days": last - first + 1,
            "c_weeks": np.add.reduceat(new_week, first),
            "k_last": k_last,
            "k_first": k[last],
            "longest": np.maximum.reduceat(run_len, user_runs),
            "current": np.where(k_last == 0, run_len[user_runs], 0),
        },
        schema=_HISTORY,
    )


def _order_gaps(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Per user: sum of squared gaps (days) between consecutive purchases."""
    gap = pl.col("ts").diff().dt.total_microseconds() / DAY_US
    return (
        lf.select(_USER, gap.pow(2).over(_USER, order_by="ts").fill_null(0.0).alias("_sq"))
        .group_by(_USER)
        .agg(pl.col("_sq").sum().alias("c_p_sq"))
    )


def _units(lf: pl.LazyFrame, t: datetime, windows: list[int], config: LapseConfig) -> pl.LazyFrame:
    """Per user with a purchase line: units bought, in all and in each window."""
    ts, ub = pl.col("ts"), pl.col("_ub")
    return (
        lf.filter(_flag(config, "purchase"))
        .with_columns(units_expr(config).alias("_ub"))
        .group_by(_USER)
        .agg(
            ub.sum().alias("units_bought"),
            *(
                pl.when(ts >= t - timedelta(days=w)).then(ub).sum().alias(f"units_bought_{w}d")
                for w in windows
            ),
        )
    )


def _measures(
    lf: pl.LazyFrame, t: datetime, edges: list[int], last_day: int, config: LapseConfig, spec: _Spec
) -> pl.LazyFrame:
    """Each event as a row of measures: a group of one, as :func:`_rollup` groups them.

    ``_n`` counts the row as an event (0 for a later line of an order),
    ``_tmin``/``_tmax`` are its time, ``_t1min``/``_t1max`` its time when
    it counts, ``_bin`` the first window edge it is inside (``len(edges)``:
    none), ``_blk``/``_bits`` its day offset ``k`` as a 64-day block and a bit.
    """
    ts, c = pl.col("ts"), pl.col
    # whole UTC days before the day of T - 1us (ts is UTC, in microseconds)
    k = pl.lit(last_day, dtype=pl.Int64) - ts.dt.epoch("us") // DAY_US
    inside: pl.Expr = pl.lit(len(edges), dtype=pl.Int8)
    for i, d in reversed(list(enumerate(edges))):
        inside = (
            pl.when(ts >= t - timedelta(days=d)).then(pl.lit(i, dtype=pl.Int8)).otherwise(inside)
        )
    counted = c("_one") if spec.orders else pl.lit(True)
    cols = [
        inside.alias("_bin"),
        (k // _WORD).alias("_blk"),
        _pow2(k % _WORD).alias("_bits"),
        counted.cast(pl.UInt32).alias("_n"),
        ts.alias("_tmin"),
        ts.alias("_tmax"),
        *_counted_times(pl.when(counted).then(ts) if spec.orders else ts),
    ]
    if spec.full and spec.telemetry:
        cols.append(c("quantity").fill_null(1.0).alias("_uc"))
    if not spec.midnight:  # the day cut by T - W, for each window W
        cols += [(k == w).alias(f"_kw{w}") for w in spec.windows]
    return lf.with_columns(cols)


def _rollup(rows: pl.LazyFrame, spec: _Spec) -> pl.LazyFrame:
    """The measure rows summed per user, event name, window bin and 64-day block.

    Every event-level flag (role, milestone, window edge) is constant within
    such a group, so the aggregations of :func:`_aggregations` give the same
    values on these few rows as on the events.
    """
    c = pl.col
    aggs = [
        c("_n").sum(),
        c("revenue").sum(),
        c("_tmin").min(),
        c("_tmax").max(),
        c("_bits").bitwise_or(),
    ]
    if spec.orders:  # else every row counts: its times are those of its group
        aggs += [c("_t1min").min(), c("_t1max").max()]
    if spec.full and spec.telemetry:
        aggs.append(pl.col("_uc").sum())
    if not spec.midnight:
        aggs += [pl.col(f"_kw{w}").any() for w in spec.windows]
    rolled = rows.group_by(_USER, "event", "_bin", "_blk").agg(aggs)
    return rolled if spec.orders else rolled.with_columns(_counted_times(c("_tmin"), c("_tmax")))


def _counted_times(first: pl.Expr, last: pl.Expr | None = None) -> list[pl.Expr]:
    """``_t1min`` and ``_t1max``: the first and last time of the rows that count as events."""
    return [first.alias("_t1min"), (first if last is None else last).alias("_t1max")]


def _aggregate(
    rows: pl.LazyFrame, edges: list[int], config: LapseConfig, spec: _Spec, words: int = 0
) -> pl.LazyFrame:
    """Per-user state from measure rows (events or their roll-up); ``_w0``, ``_w1``, ...
    the 64-day bitmasks of active days: those the windows read, at least ``words``.

    Role, window and milestone flags become columns first, so that each is
    computed once per row rather than once per aggregation reading it.
    """
    c = pl.col
    flags = {f"_r_{role}": _flag(config, role) for role in spec.roles}
    flags |= {f"_in{d}": c("_bin") <= i for i, d in enumerate(edges)}
    if spec.full:
        flags |= {f"_hit{i}": c("event") == m.event for i, m in enumerate(config.milestones)}
    r = {role: c(f"_r_{role}") for role in spec.roles}
    inw = {d: c(f"_in{d}") for d in edges}

    count = _count
    last = _LAST_ALL if spec.full else spec.roles
    aggs: list[pl.Expr] = [
        c("_tmin").min().alias("first_event"),
        *(pl.when(r[x]).then(c("_t1max")).max().alias(f"last_{x}") for x in last),
    ]
    for w in spec.windows:
        aggs += [
            count(r["usage"] & inw[w]).alias(f"usage_count_{w}d"),
            count(r["purchase"] & inw[w]).alias(f"purchase_count_{w}d"),
            pl.when(inw[w]).then(c("revenue")).sum().alias(f"revenue_{w}d"),
        ]
        if not spec.midnight:  # the day cut by T - W counts when it has an event at or after T - W
            aggs.append((inw[w] & c(f"_kw{w}")).any().alias(f"_part{w}"))
    # active days in the windows (and, for the full set, the whole history): 64-day bitmasks
    for j in range(max(max(spec.windows) // _WORD + 1, words)):
        aggs.append(
            pl.when(c("_blk") == j)
            .then(c("_bits"))
            .otherwise(pl.lit(0, dtype=pl.UInt64))
            .bitwise_or()
            .alias(f"_w{j}")
        )
    if spec.full:
        aggs += _full_aggregations(edges, config, spec, r, inw)
    return rows.with_columns(**flags).group_by(_USER).agg(aggs)


def _count(cond: pl.Expr) -> pl.Expr:
    """The events among measure rows meeting ``cond``."""
    return pl.when(cond).then(pl.col("_n")).otherwise(0).sum()


def _full_aggregations(
    edges: list[int],
    config: LapseConfig,
    spec: _Spec,
    r: dict[str, pl.Expr],
    inw: dict[int, pl.Expr],
) -> list[pl.Expr]:
    """The aggregations of the full set beyond the core set."""
    c, count = pl.col, _count
    aggs = [
        c("_n").sum().alias("n_event"),
        c("_tmax").max().alias("last_event"),
        pl.when(r["purchase"]).then(c("_t1min")).min().alias("first_purchase"),
        pl.when(r["aha"]).then(c("_t1min")).min().alias("first_aha"),
        count(r["purchase"]).alias("n_purchase"),
    ]
    for w in spec.windows:
        aggs += [
            count(inw[w]).alias(f"event_count_{w}d"),
            *(
                count(r[x] & inw[w]).alias(f"{x}_count_{w}d")
                for x in spec.roles
                if x not in ("usage", "purchase")
            ),
        ]
    if spec.telemetry:
        consumed = r["consumption"]
        aggs.append(pl.when(consumed).then(c("_uc")).sum().alias("units_consumed"))
        aggs += [
            pl.when(consumed & inw[w]).then(c("_uc")).sum().alias(f"_uc{w}") for w in spec.windows
        ]
    aggs += [count(r["usage"] & inw[d]).alias(f"_u{d}") for d in edges if d not in spec.windows]
    for i in range(len(config.milestones)):
        hit = c(f"_hit{i}")
        aggs += [count(hit).alias(f"_ms{i}"), count(hit & inw[7]).alias(f"_ms{i}_7")]
    return aggs


def build_one(
    events: pl.LazyFrame, t: datetime, config: LapseConfig, feature_set: FeatureSet
) -> pl.DataFrame:
    """Feature rows as of the UTC instant ``t`` (``user_id`` then features, sorted)."""
    full = feature_set == "all"
    windows = windows_of(config) if full else list(CORE_WINDOWS)
    telemetry = bool(config.roles.of("consumption"))
    cols = ["user_id", "ts", "event", "sku", "quantity", "revenue", "order_id"]
    core_cols = ["user_id", "ts", "event", "revenue", "order_id"]
    lf = canonical(events, cols if full else core_cols).filter(pl.col("ts") < t)
    orders = has_orders(events)
    if orders:
        lf = lf.with_columns(first_line(config).alias("_one"))
    spec = _Spec(
        full=full,
        windows=windows,
        roles=ROLES if full else ("usage", "purchase"),
        orders=orders,
        midnight=t == t.replace(hour=0, minute=0, second=0, microsecond=0),
        telemetry=telemetry,
    )
    # window edges: every window, and for the full set the 8 weekly edges of the slope
    edges = sorted(set(windows) | ({7 * k for k in range(1, _SLOPE_WEEKS + 1)} if full else set()))
    last_day = (t - timedelta(microseconds=1) - _EPOCH).days
    rows = _measures(lf, t, edges, last_day, config, spec)
    if full:
        # the events summed to a few rows per user first: ~80 aggregations then run on those
        rolled = _rollup(rows, spec).collect(engine="streaming")
        # every 64-day block of the history as a word per user, for the active-day history
        blocks = int(rolled.select(pl.col("_blk").max().fill_null(0) + 1).item())
        bought = _flag(config, "purchase")
        purchases = lf.filter(bought & pl.col("_one") if orders else bought)
        main_df, units_df, gaps_df = pl.collect_all(
            [
                _aggregate(rolled.lazy(), edges, config, spec, blocks),
                _units(lf, t, windows, config),
                _order_gaps(purchases),
            ],
            engine="streaming",
        )
        history = main_df.select(f"_w{j}" for j in range(blocks))
        main_df = main_df.hstack(_active_history(history, last_day))
        units = [c for c in units_df.columns if c != _USER]
        state = (
            main_df.join(units_df, on=_USER, how="left")
            .with_columns(pl.col(units).fill_null(0.0))
            .join(gaps_df, on=_USER, how="left")
        )
    else:
        state = _aggregate(rows, edges, config, spec).collect(engine="streaming")

    tl = pl.lit(t, dtype=pl.Datetime("us", "UTC"))
    c = pl.col
    out: dict[str, pl.Expr] = {}
    n_words = max(windows) // _WORD + 1
    for w in windows:
        count = pl.lit(0, dtype=pl.UInt32)
        for j in range(n_words):
            lo, hi = j * _WORD, min((j + 1) * _WORD, w)
            if hi <= lo:
                continue
            mask = ((1 << (hi - lo)) - 1) << 0
            count = count + (c(f"_w{j}") & pl.lit(mask, dtype=pl.UInt64)).bitwise_count_ones()
        if not spec.midnight:
            count = count + c(f"_part{w}").cast(pl.UInt32)
        out[f"active_days_{w}d"] = count
        out[f"usage_count_{w}d"] = c(f"usage_count_{w}d")
        out[f"purchase_count_{w}d"] = c(f"purchase_count_{w}d")
        out[f"revenue_{w}d"] = c(f"revenue_{w}d")
    out["days_since_last_usage"] = days_between(tl, c("last_usage"))
    out["days_since_last_purchase"] = days_between(tl, c("last_purchase"))
    out["tenure_days"] = days_between(tl, c("first_event"))
    u7, u14, u28 = (c(f"usage_count_{w}d").cast(pl.Int64) for w in (7, 14, 28))
    out["decay_ratio_14d"] = ratio(u14, u28 - u14)
    out["dropping_ratio_7d"] = ratio(u7, (u28 - u7) / 3.0)
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
        out[f"days_since_last_{x}"] = days_between(t, c(f"last_{x}"))
    first_purchase, first_aha = c("first_purchase"), c("first_aha")
    out["days_since_first_purchase"] = days_between(t, first_purchase)
    out["events_per_active_day"] = ratio(c("n_event"), c("c_days"))
    out["events_per_active_week"] = ratio(c("n_event"), c("c_weeks"))
    gap = pl.when(c("c_days") >= 2).then(
        (c("k_first") - c("k_last")).cast(pl.Float64) / (c("c_days") - 1)
    )
    out["mean_active_gap_days"] = gap
    out["recency_over_mean_gap"] = frac_days(t, c("last_event")) / gap

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
    out["days_purchase_to_aha"] = days_between(first_aha, first_purchase)
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
        span = pl.min_horizontal(frac_days(t, c("first_event")), 28.0)
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
    mean_gap = pl.when(n_gaps >= 1).then(frac_days(c("last_purchase"), first_purchase) / n_gaps)
    var = (c("c_p_sq").fill_null(0.0) - n_gaps * mean_gap.pow(2)) / (n_gaps - 1)
    out["mean_order_gap_days"] = mean_gap
    out["std_order_gap_days"] = pl.when(n_gaps >= 2).then(var.clip(lower_bound=0.0).sqrt())
