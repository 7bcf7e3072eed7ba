"""How features are computed: one roll-up, cumulative sums, as-of look-ups.

1. Events with ``ts`` before the last cutoff are rolled up to one row per user
   and *bucket*: a UTC day, split further at the time of day of any cutoff
   that is not midnight, so every window edge ``T - W days`` and every day
   edge is a bucket edge.
2. The bucket rows, sorted per user, get running sums (counts, revenue,
   units, active days and weeks), running maxima (last event of each role)
   and streak bookkeeping.
3. The state at an instant ``b`` is the last bucket row starting before
   ``b`` (an as-of join); a window ``[T - W, T)`` is the state at ``T`` minus
   the state at ``T - W``. One roll-up serves any number of cutoffs.

With an ``order_id`` column, counts take one row per order (:func:`first_line`)
and sums every line.

With ``names`` (a few features of the full set, as the trigger look-ahead asks for)
each step computes only the state columns those features read
(:func:`state_columns`): fewer sums in the roll-up, fewer look-ups.

Nothing here sees an event at or after its cutoff: the roll-up stops at the
last cutoff, and every look-up takes buckets that start strictly before the
instant asked for, which are whole because bucket edges include every cutoff.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import EventsError, MissingColumnsError
from lapse.features.registry import CORE_WINDOWS, expand, windows_of
from lapse.schema import DAY_US, ORDER_ID, ROLES, TS_DTYPE, canonical, days_between, frac_days

_USER = "user_id"
# running sums kept per bucket; each is also a windowed feature
_SUMS = ("n_event", *(f"n_{r}" for r in ROLES), "revenue", "units_bought", "units_consumed")
# roles whose last occurrence is tracked
_LAST = ("event", "usage", "purchase", "error", "aha", "setup_started", "setup_completed")
_SLOPE_WEEKS = 8
# what the core feature set needs: a trimmed roll-up
_CORE_SUMS = ("n_usage", "n_purchase", "revenue")
_CORE_LAST = ("usage", "purchase")


def _sums(core: bool) -> tuple[str, ...]:
    return _CORE_SUMS if core else _SUMS


def has_orders(events: pl.LazyFrame) -> bool:
    """Whether ``events`` carry an order key (``source.order_id``)."""
    return ORDER_ID in events.collect_schema()


def first_line(config: LapseConfig) -> pl.Expr:
    """True on every row that counts as one event: all but the later lines of an order.

    An order is the ``purchase`` rows of one user sharing an ``order_id``; it
    counts once, on its first line by ``ts`` (one of them on a tie). A row
    without an order id, or in no purchase role, is its own event. The flag of a
    row depends only on rows of its order at or before it, so filtering the
    events at a cutoff before or after computing it gives the same flags.
    """
    names = config.roles.of("purchase")
    if not names:
        return pl.lit(True)
    bought = pl.col("event").is_in(names)
    rank = pl.int_range(pl.len()).over(_USER, ORDER_ID, bought, order_by=["ts", "event"])
    return ~bought | pl.col(ORDER_ID).is_null() | (rank == 0)


def units_expr(config: LapseConfig) -> pl.Expr:
    """Units in one event: ``quantity`` (null = 1) times the SKU's units per pack."""
    qty = pl.col("quantity").fill_null(1.0)
    per_pack = config.features.units_per_pack
    if not per_pack:
        return qty
    factor = pl.col("sku").replace_strict(per_pack, default=1.0, return_dtype=pl.Float64)
    return qty * factor.fill_null(1.0)


def _bucket(offsets: Sequence[int]) -> pl.Expr:
    """Bucket start of ``ts``: its UTC day, split at the given times of day (us)."""
    day = pl.col("ts").dt.truncate("1d")
    if not offsets:
        return day
    tod = (pl.col("ts") - day).dt.total_microseconds()
    expr: pl.Expr = day
    for off in sorted(offsets):
        expr = pl.when(tod >= off).then(day + pl.duration(microseconds=off)).otherwise(expr)
    return expr


def _flag(config: LapseConfig, role: str) -> pl.Expr:
    names = config.roles.of(role)
    return pl.col("event").is_in(names) if names else pl.lit(False)


def rollup(
    events: pl.LazyFrame,
    cutoffs: Sequence[datetime],
    config: LapseConfig,
    core: bool = False,
    need: Collection[str] | None = None,
) -> pl.DataFrame:
    """One row per user and bucket before the last cutoff, with per-bucket aggregates.

    ``core`` keeps only what the core feature set needs (fewer columns read, fewer sums);
    ``need`` (:func:`state_columns`) only the aggregates those state columns come from.
    """
    end = max(cutoffs)
    offsets = sorted(
        {
            int(
                (c - c.replace(hour=0, minute=0, second=0, microsecond=0))
                / timedelta(microseconds=1)
            )
            for c in cutoffs
        }
        - {0}
    )
    ts = pl.col("ts")
    roles = _CORE_LAST if core else ROLES
    lf = canonical(events, ["user_id", "ts", "event", "revenue", ORDER_ID] if core else None)
    lf = lf.filter(ts < end)
    # with order ids, counts take one row per order (see first_line); sums every line
    orders = has_orders(events)
    if orders:
        lf = lf.with_columns(first_line(config).alias("_one"))

    def counted(flag: pl.Expr) -> pl.Expr:
        return flag & pl.col("_one") if orders else flag

    flags = {r: counted(_flag(config, r)).alias(f"_is_{r}") for r in roles}
    lf = lf.with_columns(_bucket(offsets).alias("bucket"), *flags.values())
    is_ = {r: pl.col(f"_is_{r}") for r in roles}
    p = is_["purchase"]
    lines = _flag(config, "purchase") if orders else p
    if core:
        rolled_core = lf.group_by(_USER, "bucket").agg(
            *(is_[r].sum().cast(pl.Int64).alias(f"n_{r}") for r in roles),
            pl.col("revenue").sum().alias("revenue"),
            ts.min().alias("first_event"),
            *(pl.when(is_[r]).then(ts).max().alias(f"last_{r}") for r in roles),
        )
        return rolled_core.collect(engine="streaming")
    aggs: list[pl.Expr] = [
        (pl.col("_one").sum() if orders else pl.len()).cast(pl.Int64).alias("n_event"),
        *(is_[r].sum().cast(pl.Int64).alias(f"n_{r}") for r in ROLES),
        pl.col("revenue").sum().alias("revenue"),
        pl.when(lines).then(units_expr(config)).sum().alias("units_bought"),
        pl.when(is_["consumption"])
        .then(pl.col("quantity").fill_null(1.0))
        .sum()
        .alias("units_consumed"),
        *(
            counted(pl.col("event") == m.event).sum().cast(pl.Int64).alias(f"ms_{i}")
            for i, m in enumerate(config.milestones)
        ),
        ts.min().alias("first_event"),
        ts.max().alias("last_event"),
        *(pl.when(is_[r]).then(ts).max().alias(f"last_{r}") for r in _LAST[1:]),
        pl.when(p).then(ts).min().alias("first_purchase"),
        pl.when(is_["aha"]).then(ts).min().alias("first_aha"),
    ]
    if need is not None:
        keep = _sources(need)
        aggs = [a for a in aggs if a.meta.output_name() in keep]
    rolled = lf.group_by(_USER, "bucket").agg(aggs)
    if need is not None and "c_p_sq" not in need:
        return rolled.collect(engine="in-memory")
    # squared gaps (days) from each purchase to the user's previous one, summed per bucket;
    # purchases are few, so this small second query beats sorting inside every bucket
    gap = (ts.diff().dt.total_microseconds() / DAY_US).over(_USER, order_by="ts")
    gaps = (
        lf.filter(p)
        .select(_USER, "bucket", gap.pow(2).fill_null(0.0).alias("p_sq"))
        .group_by(_USER, "bucket")
        .agg(pl.col("p_sq").sum())
    )
    main, extra = pl.collect_all([rolled, gaps], engine="in-memory")
    return main.join(extra, on=[_USER, "bucket"], how="left").with_columns(
        pl.col("p_sq").fill_null(0.0)
    )


def cumulate(
    buckets: pl.DataFrame,
    config: LapseConfig,
    core: bool = False,
    need: Collection[str] | None = None,
) -> pl.DataFrame:
    """Running state per user after each bucket, sorted by user and bucket (with ``need``,
    :func:`state_columns`: only those columns besides the keys and ``first_event``)."""
    u = "uid"
    day = pl.col("bucket").dt.truncate("1d")
    week = pl.col("bucket").dt.truncate("1w")
    prev_day = pl.col("day").shift(1).over(u)
    have = set(buckets.columns)
    cum = [pl.col(s).cum_sum().over(u) for s in _sums(core) if s in have]
    user = pl.col(_USER)
    if core:
        return (
            buckets.lazy()
            .sort(_USER, "bucket")
            .with_columns((user != user.shift(1)).fill_null(True).cum_sum().cast(pl.Int64).alias(u))
            .with_columns(day.alias("day"))
            .with_columns(
                (prev_day.is_null() | (pl.col("day") != prev_day)).alias("_new_day"),
                pl.col("bucket").max().over(u, "day").alias("day_max_bucket"),
                *cum,
                *(pl.col(f"last_{r}").cum_max().forward_fill().over(u) for r in _CORE_LAST),
            )
            .with_columns(pl.col("_new_day").cum_sum().cast(pl.Int64).over(u).alias("c_days"))
            .drop("_new_day")
            .collect(engine="in-memory")
        )
    milestones = [f"ms_{i}" for i in range(len(config.milestones))]
    cum += [pl.col(m).cum_sum().over(u) for m in milestones if m in have]
    if "p_sq" in have:
        cum.append(pl.col("p_sq").cum_sum().over(u).alias("c_p_sq"))
    lasts = [pl.col(f"last_{r}") for r in _LAST if f"last_{r}" in have]
    state = (
        buckets.lazy()
        .sort(_USER, "bucket")
        # a dense integer user key: grouping on it is much cheaper than on strings
        .with_columns((user != user.shift(1)).fill_null(True).cum_sum().cast(pl.Int64).alias(u))
        .with_columns(day.alias("day"), week.alias("_week"))
        .with_columns(
            (prev_day.is_null() | (pl.col("day") != prev_day)).alias("_new_day"),
            (prev_day.is_null() | ((pl.col("day") - prev_day) > pl.duration(days=1))).alias(
                "_new_run"
            ),
            (pl.col("_week") != pl.col("_week").shift(1).over(u))
            .fill_null(True)
            .alias("_new_week"),
            pl.col("bucket").max().over(u, "day").alias("day_max_bucket"),
            *cum,
            *(last.cum_max().forward_fill().over(u) for last in lasts),
        )
        .with_columns(
            pl.col("_new_day").cum_sum().cast(pl.Int64).over(u).alias("c_days"),
            pl.col("_new_week").cum_sum().cast(pl.Int64).over(u).alias("c_weeks"),
            pl.when("_new_run").then("day").forward_fill().over(u).alias("_run_start"),
        )
        .with_columns(
            ((pl.col("day") - pl.col("_run_start")).dt.total_days() + 1).alias("streak"),
        )
        .with_columns(pl.col("streak").cum_max().over(u).alias("longest"))
        .drop("_week", "_new_day", "_new_run", "_new_week", "_run_start", "p_sq", strict=False)
    )
    if need is not None:  # the columns not asked for are never computed (projection pushdown)
        keep = _sources(need) | {_USER, u, "bucket"}
        state = state.select(c for c in state.collect_schema() if c in keep)
    return state.collect(engine="in-memory")


def state_columns(config: LapseConfig, names: Collection[str]) -> set[str]:
    """The state columns (of :func:`state_at_cutoffs`, ``name@d`` at ``T - d days``) that
    the full set's features ``names`` read, besides ``cutoff``."""
    exprs = _feature_exprs(config, core=False)
    return {c for n in names for c in exprs[n].meta.root_names()} - {"cutoff"}


def _sources(need: Collection[str]) -> set[str]:
    """The columns of state at ``T`` the state columns ``need`` come from (``first_event``
    always: it says whether a user has a row at a cutoff)."""
    return {c.split("@")[0] for c in need} | {"first_event"}


def _windows(config: LapseConfig, core: bool) -> list[int]:
    return list(CORE_WINDOWS) if core else windows_of(config)


def _offsets(
    config: LapseConfig, core: bool = False, need: Collection[str] | None = None
) -> dict[int, list[str]]:
    """Days before the cutoff at which state is looked up, with the columns needed there
    (with ``need``: those of its ``name@d`` columns only)."""
    if need is not None:
        wanted = {
            d: [c for c in cols if f"{c}@{d}" in need] for d, cols in _offsets(config).items()
        }
        return {d: cols for d, cols in wanted.items() if cols}
    window_cols = [*_sums(core), "c_days", "day", "day_max_bucket"]
    at: dict[int, list[str]] = {}
    for w in _windows(config, core):
        at.setdefault(w, []).extend(window_cols)
    if core:
        return {d: list(dict.fromkeys(cols)) for d, cols in sorted(at.items())}
    for k in range(1, _SLOPE_WEEKS + 1):
        at.setdefault(7 * k, []).append("n_usage")
    at.setdefault(7, []).extend(f"ms_{i}" for i in range(len(config.milestones)))
    return {d: list(dict.fromkeys(cols)) for d, cols in sorted(at.items())}


def state_at_cutoffs(
    buckets: pl.DataFrame,
    cutoffs: Sequence[datetime],
    config: LapseConfig,
    core: bool = False,
    need: Collection[str] | None = None,
) -> pl.LazyFrame:
    """One row per (user, cutoff) with any event before it: state at T and at T - d
    (with ``need``, :func:`state_columns`: only the look-ups of those columns)."""
    u = "uid"
    state = cumulate(buckets, config, core, need).lazy()
    first_cols = ["first_event"] if core else ["first_event", "first_purchase", "first_aha"]
    first_cols = [c for c in first_cols if c in state.collect_schema()]
    firsts = state.group_by(u).agg(pl.col(_USER).first(), *(pl.col(f).min() for f in first_cols))
    state = state.drop(_USER, *first_cols[1:])
    cut = pl.LazyFrame({"cutoff": list(cutoffs)}, schema={"cutoff": TS_DTYPE})
    q = (
        firsts.join(cut, how="cross")
        .filter(pl.col("first_event") < pl.col("cutoff"))
        .sort(u, "cutoff")
    )
    # state at T: everything
    q = q.join_asof(
        state.drop("first_event"),
        left_on="cutoff",
        right_on="bucket",
        by=u,
        allow_exact_matches=False,
        check_sortedness=False,
    ).drop("bucket")
    for d, cols in _offsets(config, core, need).items():
        right = state.select(u, "bucket", *(pl.col(c).alias(f"{c}@{d}") for c in cols))
        q = (
            q.with_columns((pl.col("cutoff") - pl.duration(days=d)).alias("_at"))
            .join_asof(
                right,
                left_on="_at",
                right_on="bucket",
                by=u,
                allow_exact_matches=False,
                check_sortedness=False,
            )
            .drop("bucket")
            .with_columns(
                pl.col(f"{c}@{d}").fill_null(0) for c in cols if c in _SUMS or c.startswith("ms_")
            )
        )
    days = [f"c_days@{w}" for w in _windows(config, core)]
    return q.with_columns(pl.col(c).fill_null(0) for c in days if need is None or c in need).drop(
        "_at", strict=False
    )


def ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den != 0).then(num.cast(pl.Float64) / den)


def features(
    state: pl.LazyFrame,
    config: LapseConfig,
    core: bool = False,
    names: Collection[str] | None = None,
) -> pl.LazyFrame:
    """Feature columns from the state rows (``cutoff`` kept; registry order; with
    ``names``, those features of the full set only)."""
    out = _feature_exprs(config, core)
    dtypes = expand(config, "core" if core else "all")
    if names is not None:
        dtypes = {n: d for n, d in dtypes.items() if n in names}
    return state.select(
        _USER, "cutoff", *(out[name].cast(dtype).alias(name) for name, dtype in dtypes.items())
    )


def _feature_exprs(config: LapseConfig, core: bool) -> dict[str, pl.Expr]:
    """Every feature as an expression over the state rows of :func:`state_at_cutoffs`
    (with ``core`` the state lacks the other columns: only the core ones may be read)."""
    t = pl.col("cutoff")
    c = pl.col
    windows = _windows(config, core)
    telemetry = bool(config.roles.of("consumption"))

    def win(col: str, w: int) -> pl.Expr:
        return c(col) - c(f"{col}@{w}")

    out: dict[str, pl.Expr] = {}
    for w in windows:
        start = t - pl.duration(days=w)
        # a day cut by the window start counts when it has buckets on both sides
        split = (c(f"day@{w}") == start.dt.truncate("1d")) & (c(f"day_max_bucket@{w}") >= start)
        out[f"active_days_{w}d"] = (
            c("c_days") - c(f"c_days@{w}") + split.fill_null(False).cast(pl.Int64)
        )
        out[f"revenue_{w}d"] = win("revenue", w)
        out[f"event_count_{w}d"] = win("n_event", w)
        for r in ROLES:
            out[f"{r}_count_{w}d"] = win(f"n_{r}", w)
        out[f"units_bought_{w}d"] = win("units_bought", w)
        out[f"units_consumed_{w}d"] = win("units_consumed", w) if telemetry else pl.lit(None)
    for name, role in [
        ("usage", "usage"),
        ("purchase", "purchase"),
        ("event", "event"),
        ("aha", "aha"),
        ("error", "error"),
    ]:
        out[f"days_since_last_{name}"] = days_between(t, c(f"last_{role}"))
    out["tenure_days"] = days_between(t, c("first_event"))
    u14, u28 = win("n_usage", 14), c("n_usage@14") - c("n_usage@28")
    out["decay_ratio_14d"] = ratio(u14, u28)
    out["dropping_ratio_7d"] = ratio(win("n_usage", 7), (c("n_usage@7") - c("n_usage@28")) / 3.0)

    first_purchase = pl.when(c("first_purchase") < t).then(c("first_purchase"))
    first_aha = pl.when(c("first_aha") < t).then(c("first_aha"))
    out["days_since_first_purchase"] = days_between(t, first_purchase)
    out["events_per_active_day"] = ratio(c("n_event"), c("c_days"))
    out["events_per_active_week"] = ratio(c("n_event"), c("c_weeks"))
    gap = pl.when(c("c_days") >= 2).then(
        frac_days(c("day"), c("first_event").dt.truncate("1d")) / (c("c_days") - 1)
    )
    out["mean_active_gap_days"] = gap
    out["recency_over_mean_gap"] = frac_days(t, c("last_event")) / gap

    # weekly usage, oldest week x=1 ... latest x=8; slope = sum((x - 4.5) * y) / 42
    weeks = [
        (c("n_usage") if k == 1 else c(f"n_usage@{7 * (k - 1)}")) - c(f"n_usage@{7 * k}")
        for k in range(1, _SLOPE_WEEKS + 1)
    ]
    xbar = (_SLOPE_WEEKS + 1) / 2
    sxx = sum((x - xbar) ** 2 for x in range(1, _SLOPE_WEEKS + 1))
    out["usage_slope_8w"] = (
        pl.sum_horizontal(
            [
                (_SLOPE_WEEKS + 1 - k - xbar) * y.cast(pl.Float64)
                for k, y in enumerate(weeks, start=1)
            ]
        )
        / sxx
    )
    last_day = (t - pl.duration(microseconds=1)).dt.truncate("1d")
    out["current_streak_days"] = pl.when(c("day") == last_day).then(c("streak")).otherwise(0)
    out["longest_streak_days"] = c("longest")

    out["aha_reached"] = first_aha.is_not_null()
    out["days_purchase_to_aha"] = days_between(first_aha, first_purchase)
    for i, m in enumerate(config.milestones):
        now, before = c(f"ms_{i}"), c(f"ms_{i}@7")
        out[f"milestone_{m.name}_count"] = now
        if m.every_n is not None:
            crossed = (now // m.every_n) > (before // m.every_n)
        else:
            crossed = pl.any_horizontal(
                [pl.lit(False), *(((before < k) & (now >= k)) for k in m.at_counts or [])]
            )
        out[f"milestone_{m.name}_crossed_7d"] = crossed
    ss, sc = c("last_setup_started"), c("last_setup_completed")
    out["setup_incomplete"] = ss.is_not_null() & (sc.is_null() | (sc < ss)).fill_null(True)

    orders = c("n_purchase")
    out["order_count"] = orders
    out["units_bought_total"] = c("units_bought")
    if telemetry:
        left = pl.when(orders > 0).then(
            pl.max_horizontal(c("units_bought") - c("units_consumed"), 0.0)
        )
        span = pl.min_horizontal(frac_days(t, c("first_event")), 28.0)
        rate = win("units_consumed", 28) / span
        out["units_consumed_total"] = c("units_consumed")
        out["units_left"] = left
        out["consumption_rate_28d"] = rate
        out["days_of_supply_left"] = pl.when(rate > 0).then(left / rate)
    else:
        for name in (
            "units_consumed_total",
            "units_left",
            "consumption_rate_28d",
            "days_of_supply_left",
        ):
            out[name] = pl.lit(None)
    n_gaps = orders - 1
    mean_gap = pl.when(n_gaps >= 1).then(frac_days(c("last_purchase"), first_purchase) / n_gaps)
    var = (c("c_p_sq") - n_gaps * mean_gap.pow(2)) / (n_gaps - 1)
    out["mean_order_gap_days"] = mean_gap
    out["std_order_gap_days"] = pl.when(n_gaps >= 2).then(var.clip(lower_bound=0.0).sqrt())

    wanted = expand(config, "core" if core else "all")
    assert set(wanted) <= set(out), set(wanted) - set(out)
    return out


def with_attributes(
    frame: pl.DataFrame, attributes: pl.DataFrame | None, config: LapseConfig
) -> pl.DataFrame:
    """``frame`` with the configured static attributes joined on ``user_id``."""
    wanted = config.attributes.static_features
    if attributes is None or not wanted:
        return frame
    missing = [c for c in [_USER, *wanted] if c not in attributes.columns]
    if missing:
        raise MissingColumnsError(
            f"attributes table lacks {missing} (attributes.static_features = {wanted}); "
            f"it has {attributes.columns}"
        )
    clash = [c for c in wanted if c in frame.columns]
    if clash:
        raise EventsError(f"static attributes {clash} clash with feature names; rename them")
    attrs = attributes.select(pl.col(_USER).cast(pl.String), *wanted).unique(_USER, keep="first")
    return frame.join(attrs, on=_USER, how="left")
