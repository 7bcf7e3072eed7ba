"""Invariants of lapse.features: no leakage, build_many == build, a DuckDB oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from lapse import LapseConfig
from lapse.events.identity import LINK_SCHEMA
from lapse.features import build, build_many

BASE = datetime(2024, 1, 1, tzinfo=UTC)
SPAN_S = 120 * 86_400
NAMES = ["use", "buy", "err", "aha", "ss", "sc", "ret", "other"]
SCHEMA = {
    "user_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "event": pl.String,
    "sku": pl.String,
    "quantity": pl.Float64,
    "revenue": pl.Float64,
}
CONFIG = LapseConfig.model_validate(
    {
        "roles": {
            "usage": ["use", "other"],
            "purchase": ["buy"],
            "error": ["err"],
            "aha": ["aha"],
            "setup_started": ["ss"],
            "setup_completed": ["sc"],
            "consumption": ["use"],
            "return": ["ret"],
        },
        "milestones": [
            {"name": "uses", "event": "use", "every_n": 3},
            {"name": "buys", "event": "buy", "at_counts": [1, 4]},
        ],
        "features": {"windows": [3, 7], "units_per_pack": {"P": 10}},
    }
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# instants cluster on day edges and on whole hours, so window and day boundaries get hit
seconds = st.one_of(
    st.integers(0, SPAN_S),
    st.integers(0, 120).map(lambda d: d * 86_400),
    st.integers(0, 120 * 24).map(lambda h: h * 3600),
)
event = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    seconds,
    st.sampled_from(NAMES),
    st.sampled_from([None, "P", "Q"]),
    st.one_of(st.none(), st.sampled_from([1.0, 2.0, 3.0])),
    st.one_of(st.none(), st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 2))),
)
cutoff = st.one_of(
    st.integers(1, 120).map(lambda d: BASE + timedelta(days=d)),
    st.integers(1, SPAN_S).map(lambda s: BASE + timedelta(seconds=s)),
)


def frame(rows: list[tuple[object, ...]]) -> pl.DataFrame:
    data = [(u, BASE + timedelta(seconds=s), *rest) for u, s, *rest in rows]  # type: ignore[operator]
    return pl.DataFrame(data, schema=SCHEMA, orient="row")


def same(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert_frame_equal(a, b, check_exact=False, rel_tol=1e-9, abs_tol=1e-6)


@SETTINGS
@given(
    st.lists(event, min_size=1, max_size=40),
    st.lists(event, min_size=1, max_size=20),
    cutoff,
)
def test_events_at_or_after_the_cutoff_change_nothing(
    rows: list[tuple[object, ...]], later: list[tuple[object, ...]], t: datetime
) -> None:
    ev = frame(rows)
    # move the extra events to [t, t + 200 days): at the cutoff or after it
    extra = frame(later).with_columns((pl.lit(t) + (pl.col("ts") - pl.lit(BASE)) * 2).alias("ts"))
    before = build(ev.lazy(), t, CONFIG)
    after = build(pl.concat([extra, ev]).lazy(), t, CONFIG)
    same(before, after)


@SETTINGS
@given(st.lists(event, min_size=1, max_size=40), st.lists(cutoff, min_size=1, max_size=4))
def test_build_many_equals_build_at_each_cutoff(
    rows: list[tuple[object, ...]], cuts: list[datetime]
) -> None:
    ev = frame(rows).lazy()
    many = build_many(ev, cuts, CONFIG)
    for t in sorted(set(cuts)):
        one = build(ev, t, CONFIG)
        same(many.filter(pl.col("cutoff") == t).drop("cutoff"), one)
    assert many.height == sum(build(ev, t, CONFIG).height for t in set(cuts))


# --- an independent SQL oracle for the core set ------------------------------------

CORE_WINDOWS = (7, 14, 28, 90)


def oracle_sql(t: datetime) -> str:
    """The core set straight from the events: no roll-up, no shared code with lapse."""
    ts = f"TIMESTAMPTZ '{t.isoformat()}'"
    usage, purchase = "event IN ('use', 'other')", "event = 'buy'"

    def since(days: int) -> str:
        return f"ts >= {ts} - INTERVAL {days} DAY"

    cols = []
    for w in CORE_WINDOWS:
        cols += [
            f"count(*) FILTER (WHERE {usage} AND {since(w)}) AS usage_count_{w}d",
            f"count(*) FILTER (WHERE {purchase} AND {since(w)}) AS purchase_count_{w}d",
            f"count(DISTINCT CAST(ts AS DATE)) FILTER (WHERE {since(w)}) AS active_days_{w}d",
            f"coalesce(sum(revenue) FILTER (WHERE {since(w)}), 0) AS revenue_{w}d",
        ]

    def usage_between(lo: int, hi: int) -> str:
        return f"count(*) FILTER (WHERE {usage} AND {since(lo)} AND ts < {ts} - INTERVAL {hi} DAY)"

    day_us = 86_400_000_000
    cols += [
        f"(epoch_us({ts}) - epoch_us(max(ts) FILTER (WHERE {usage}))) // {day_us} AS days_since_last_usage",
        f"(epoch_us({ts}) - epoch_us(max(ts) FILTER (WHERE {purchase}))) // {day_us} AS days_since_last_purchase",
        f"(epoch_us({ts}) - epoch_us(min(ts))) // {day_us} AS tenure_days",
        f"count(*) FILTER (WHERE {usage} AND {since(14)}) / nullif({usage_between(28, 14)}, 0) AS decay_ratio_14d",
        f"count(*) FILTER (WHERE {usage} AND {since(7)}) / nullif({usage_between(28, 7)} / 3, 0) AS dropping_ratio_7d",
    ]
    return f"SELECT user_id, {', '.join(cols)} FROM ev WHERE ts < {ts} GROUP BY user_id ORDER BY user_id"


def oracle(ev: pl.DataFrame, t: datetime) -> pl.DataFrame:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("ev", ev.to_arrow())
    return pl.from_arrow(con.sql(oracle_sql(t)).to_arrow_table())  # type: ignore[return-value]


def check_oracle(ev: pl.DataFrame, t: datetime) -> None:
    got = build(ev.lazy(), t, CONFIG)
    want = oracle(ev, t)
    core = want.columns
    want = want.with_columns(pl.col(c).cast(got.schema[c]) for c in core)
    same(got.select(core), want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, min_size=1, max_size=40), cutoff)
def test_core_set_agrees_with_duckdb_on_arbitrary_events(
    rows: list[tuple[object, ...]], t: datetime
) -> None:
    check_oracle(frame(rows), t)


@pytest.mark.parametrize("seed", [0, 1])
def test_core_set_agrees_with_duckdb_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 20_000
    ev = pl.DataFrame(
        {
            "user_id": rng.integers(0, 300, n).astype(str),
            "ts": BASE + pl.Series(rng.integers(0, SPAN_S * 1_000_000, n)).cast(pl.Duration("us")),
            "event": rng.choice(NAMES, n),
            "sku": rng.choice(["P", "Q"], n),
            "quantity": rng.integers(1, 4, n).astype(float),
            "revenue": np.where(rng.random(n) < 0.3, rng.normal(10, 5, n).round(2), np.nan),
        }
    ).with_columns(pl.col("revenue").fill_nan(None), pl.col("ts").cast(SCHEMA["ts"]))
    for t in (BASE + timedelta(days=100), BASE + timedelta(days=60, hours=7, minutes=3)):
        check_oracle(ev, t)


@SETTINGS
@given(st.lists(event, min_size=1, max_size=40), cutoff)
def test_core_feature_set_equals_the_full_build(
    rows: list[tuple[object, ...]], t: datetime
) -> None:
    ev = frame(rows).lazy()
    core = build(ev, t, CONFIG, feature_set="core")
    same(core, build(ev, t, CONFIG).select(core.columns))


@SETTINGS
@given(st.lists(event, min_size=1, max_size=40), st.lists(cutoff, min_size=1, max_size=4))
def test_core_build_many_equals_core_build(
    rows: list[tuple[object, ...]], cuts: list[datetime]
) -> None:
    ev = frame(rows).lazy()
    many = build_many(ev, cuts, CONFIG, feature_set="core")
    for t in sorted(set(cuts)):
        one = build(ev, t, CONFIG, feature_set="core")
        same(many.filter(pl.col("cutoff") == t).drop("cutoff"), one)


# --- an order key: the purchase lines sharing an order_id are one order --------------

ORDER_SCHEMA = {**SCHEMA, "order_id": pl.String}
# many purchases and few ids, so an order's lines are common, also on both sides of a cutoff
ordered_event = st.tuples(
    st.sampled_from(["a", "b"]),
    seconds,
    st.sampled_from([*NAMES, "buy", "buy", "buy"]),
    st.sampled_from([None, "P", "Q"]),
    st.one_of(st.none(), st.sampled_from([1.0, 2.0, 3.0])),
    st.one_of(st.none(), st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 2))),
    st.sampled_from([None, "o1", "o2"]),
)


def order_frame(rows: list[tuple[object, ...]]) -> pl.DataFrame:
    data = [(u, BASE + timedelta(seconds=s), *rest) for u, s, *rest in rows]  # type: ignore[operator]
    return pl.DataFrame(data, schema=ORDER_SCHEMA, orient="row")


@SETTINGS
@given(
    st.lists(ordered_event, min_size=1, max_size=40),
    st.lists(ordered_event, min_size=1, max_size=20),
    cutoff,
)
def test_with_orders_events_at_or_after_the_cutoff_change_nothing(
    rows: list[tuple[object, ...]], later: list[tuple[object, ...]], t: datetime
) -> None:
    """Later lines of an order begun before the cutoff included."""
    ev = order_frame(rows)
    extra = order_frame(later).with_columns(
        (pl.lit(t) + (pl.col("ts") - pl.lit(BASE)) * 2).alias("ts")
    )
    same(build(ev.lazy(), t, CONFIG), build(pl.concat([extra, ev]).lazy(), t, CONFIG))


@SETTINGS
@given(st.lists(ordered_event, min_size=1, max_size=40), st.lists(cutoff, min_size=1, max_size=4))
def test_with_orders_build_many_equals_build_at_each_cutoff(
    rows: list[tuple[object, ...]], cuts: list[datetime]
) -> None:
    ev = order_frame(rows).lazy()
    for feature_set in ("all", "core"):
        many = build_many(ev, cuts, CONFIG, feature_set=feature_set)
        for t in sorted(set(cuts)):
            one = build(ev, t, CONFIG, feature_set=feature_set)
            same(many.filter(pl.col("cutoff") == t).drop("cutoff"), one)


def order_oracle(ev: pl.DataFrame, t: datetime) -> pl.DataFrame:
    """The core set in SQL, a purchase counted on the first line of its order only."""
    ts = f"TIMESTAMPTZ '{t.isoformat()}'"
    first = (
        "SELECT * REPLACE (CASE WHEN event = 'buy' AND order_id IS NOT NULL AND row_number() "
        "OVER (PARTITION BY user_id, order_id, event ORDER BY ts) > 1 THEN 'line' ELSE event END "
        f"AS event) FROM ev WHERE ts < {ts}"
    )
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("ev", ev.to_arrow())
    con.execute(f"CREATE TABLE lines AS {first}")
    # a later line keeps its revenue and its day (the event name 'line' is in no role)
    sql = oracle_sql(t).replace("FROM ev", "FROM lines")
    return pl.from_arrow(con.sql(sql).to_arrow_table())  # type: ignore[return-value]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ordered_event, min_size=1, max_size=40), cutoff)
def test_with_orders_the_core_set_agrees_with_duckdb(
    rows: list[tuple[object, ...]], t: datetime
) -> None:
    ev = order_frame(rows)
    got = build(ev.lazy(), t, CONFIG)
    want = order_oracle(ev, t)
    want = want.with_columns(pl.col(c).cast(got.schema[c]) for c in want.columns)
    same(got.select(want.columns), want)


# --- identity: links apply only before the cutoff ----------------------------------

PEOPLE = ["a", "b", "c"]
DEVICES = ["x", "y", "z"]
identified_event = st.tuples(
    st.sampled_from(PEOPLE + DEVICES), seconds, st.sampled_from(NAMES), st.none(), st.none(),
    st.none(),
)  # fmt: skip
link = st.tuples(st.sampled_from([*DEVICES, "b"]), st.sampled_from([*PEOPLE, None]), seconds)


def link_frame(rows: list[tuple[str, str | None, int]]) -> pl.DataFrame:
    data = [(i, u, BASE + timedelta(seconds=s)) for i, u, s in rows if i != u]
    return pl.DataFrame(data, schema=LINK_SCHEMA, orient="row")


def oracle_ids(rows: list[tuple[str, str | None, int]], t: datetime) -> dict[str, str]:
    """Union-find over the links before ``t``; a person's id is its user id linked first."""
    seen = sorted(
        (BASE + timedelta(seconds=s), i, u) for i, u, s in rows if u is not None and i != u
    )
    seen = [r for r in seen if r[0] < t]
    first: dict[str, tuple[datetime, str]] = {}
    for ts, _, u in seen:
        first.setdefault(u, (ts, u))
    parent: dict[str, str] = {}

    def find(v: str) -> str:
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    for _, i, u in seen:
        parent[find(i)] = find(u)
    groups: dict[str, list[str]] = {}
    for v in list(parent):
        groups.setdefault(find(v), []).append(v)
    out = {}
    for members in groups.values():
        head = min(first[m] for m in members if m in first)[1]
        out.update(dict.fromkeys(members, head))
    return out


@SETTINGS
@given(
    st.lists(identified_event, min_size=1, max_size=30),
    st.lists(link, max_size=8),
    st.lists(link, max_size=4),
    cutoff,
)
def test_links_at_or_after_the_cutoff_change_nothing(
    rows: list[tuple[object, ...]],
    linked: list[tuple[str, str | None, int]],
    later: list[tuple[str, str | None, int]],
    t: datetime,
) -> None:
    ev = frame(rows)
    links = link_frame(linked)
    got = build(ev.lazy(), t, CONFIG, links=links)
    # the events and links truncated at t give the same features
    truncated = build(
        ev.filter(pl.col("ts") < t).lazy(), t, CONFIG, links=links.filter(pl.col("ts") < t)
    )
    same(got, truncated)
    # links observed at or after t (an identify tomorrow) change nothing today
    moved = link_frame(later).with_columns(
        (pl.lit(t) + (pl.col("ts") - pl.lit(BASE)) * 2).alias("ts")
    )
    same(got, build(ev.lazy(), t, CONFIG, links=pl.concat([links, moved])))
    # and the ids are those of an independent union-find over the earlier links
    ids = oracle_ids(linked, t)
    expected = ev.with_columns(pl.col("user_id").replace(ids))
    same(got, build(expected.lazy(), t, CONFIG))


@SETTINGS
@given(
    st.lists(identified_event, min_size=1, max_size=30),
    st.lists(link, max_size=8),
    st.lists(cutoff, min_size=1, max_size=4),
)
def test_with_links_build_many_equals_build_at_each_cutoff(
    rows: list[tuple[object, ...]],
    linked: list[tuple[str, str | None, int]],
    cuts: list[datetime],
) -> None:
    ev = frame(rows).lazy()
    links = link_frame(linked)
    many = build_many(ev, cuts, CONFIG, links=links)
    for t in sorted(set(cuts)):
        one = build(ev, t, CONFIG, links=links)
        same(many.filter(pl.col("cutoff") == t).drop("cutoff"), one)
    assert many.height == sum(build(ev, t, CONFIG, links=links).height for t in set(cuts))
    core = build_many(ev, cuts, CONFIG, links=links, feature_set="core")
    same(core, many.select(core.columns))
