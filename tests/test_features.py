"""Golden tests for lapse.features: tiny event tables, hand-computed values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lapse import LapseConfig, load_config
from lapse.exceptions import LapseError, MissingColumnsError
from lapse.features import build, build_many, build_sku, expand, markdown_table
from lapse.features.registry import FEATURES_MD, windows_of

T = datetime(2024, 3, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def cfg(**features: object) -> LapseConfig:
    return LapseConfig.model_validate(
        {
            "roles": {
                "usage": ["use"],
                "purchase": ["buy"],
                "error": ["err"],
                "aha": ["aha"],
                "setup_started": ["ss"],
                "setup_completed": ["sc"],
                "consumption": ["use"],
                "return": ["ret"],
            },
            "milestones": [{"name": "uses", "event": "use", "at_counts": [2, 5]}],
            "features": {"windows": [7], **features},
        }
    )


def d(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def events(
    rows: list[tuple[str, datetime, str, str | None, float | None, float | None]],
) -> pl.LazyFrame:
    return pl.LazyFrame(
        rows,
        schema={
            "user_id": pl.String,
            "ts": pl.Datetime("us", "UTC"),
            "event": pl.String,
            "sku": pl.String,
            "quantity": pl.Float64,
            "revenue": pl.Float64,
        },
        orient="row",
    )


GOLDEN = events(
    [
        ("a", d(2024, 1, 1, 10), "buy", "X", 2.0, 20.0),
        ("a", d(2024, 2, 1), "use", None, None, None),  # T - 29d: outside 28d
        ("a", d(2024, 2, 2), "use", None, None, None),  # T - 28d exactly: inside 28d
        ("a", d(2024, 2, 10), "err", None, None, None),
        ("a", d(2024, 2, 16), "use", None, None, None),  # T - 14d exactly
        ("a", d(2024, 2, 20, 23, 59, 59), "use", None, None, None),
        ("a", d(2024, 2, 21, 0, 0, 1), "use", None, None, None),  # next UTC day
        ("a", d(2024, 2, 23), "use", None, None, None),  # T - 7d exactly
        ("a", d(2024, 2, 29, 12), "ret", None, None, -5.0),
        ("a", T - US, "buy", "X", 1.0, 10.0),  # last instant before T
        ("a", T, "use", None, None, 99.0),  # at T: never seen
        ("b", d(2024, 2, 29), "ss", None, None, None),
        ("c", T, "use", None, None, None),  # only at T: no row
        ("d", d(2024, 2, 20), "buy", "X", 1.0, None),
        ("d", d(2024, 2, 25, 6), "aha", None, None, None),
    ]
)

CORE_A = {
    "usage_count_7d": 1,
    "usage_count_14d": 4,
    "usage_count_28d": 5,
    "usage_count_90d": 6,
    "purchase_count_7d": 1,
    "purchase_count_14d": 1,
    "purchase_count_28d": 1,
    "purchase_count_90d": 2,
    "active_days_7d": 2,  # Feb 23, Feb 29
    "active_days_14d": 5,  # + Feb 16, 20, 21
    "active_days_28d": 7,  # + Feb 2, 10
    "active_days_90d": 9,  # + Jan 1, Feb 1
    "revenue_7d": 5.0,
    "revenue_14d": 5.0,
    "revenue_28d": 5.0,
    "revenue_90d": 25.0,
    "days_since_last_usage": 7,
    "days_since_last_purchase": 0,
    "tenure_days": 59,
    "decay_ratio_14d": 4.0,  # 4 / 1
    "dropping_ratio_7d": 0.75,  # 1 / (4 / 3)
}
CORE_B = {
    **{f"{r}_count_{w}d": 0 for r in ("usage", "purchase") for w in (7, 14, 28, 90)},
    **{f"active_days_{w}d": 1 for w in (7, 14, 28, 90)},
    **{f"revenue_{w}d": 0.0 for w in (7, 14, 28, 90)},
    "days_since_last_usage": None,
    "days_since_last_purchase": None,
    "tenure_days": 1,  # Feb 29 00:00 to Mar 1 00:00
    "decay_ratio_14d": None,
    "dropping_ratio_7d": None,
}


@pytest.fixture(scope="module")
def golden() -> pl.DataFrame:
    return build(GOLDEN, T, cfg())


def row(frame: pl.DataFrame, user: str) -> dict[str, object]:
    return frame.filter(pl.col("user_id") == user).row(0, named=True)


def test_rows_are_users_with_an_event_before_the_cutoff(golden: pl.DataFrame) -> None:
    assert golden["user_id"].to_list() == ["a", "b", "d"]


@pytest.mark.parametrize(("user", "expected"), [("a", CORE_A), ("b", CORE_B)])
def test_core_features(golden: pl.DataFrame, user: str, expected: dict[str, object]) -> None:
    got = row(golden, user)
    assert {k: got[k] for k in expected} == expected


def test_further_features(golden: pl.DataFrame) -> None:
    a, b, dd = row(golden, "a"), row(golden, "b"), row(golden, "d")
    assert a["error_count_28d"] == 1
    assert a["days_since_last_error"] == 20
    assert a["return_count_7d"] == 1
    assert a["current_streak_days"] == 1  # Feb 29 active, Feb 28 not
    assert a["longest_streak_days"] == 2
    assert a["order_count"] == 2
    assert a["units_bought_total"] == 3.0
    gap = (T - US - d(2024, 1, 1, 10)) / timedelta(days=1)
    assert a["mean_order_gap_days"] == pytest.approx(gap)
    assert a["std_order_gap_days"] is None
    assert a["milestone_uses_count"] == 6
    assert a["milestone_uses_crossed_7d"] is False  # 5 before T - 7d, 6 now
    assert a["units_consumed_total"] == 6.0
    assert a["units_left"] == 0.0
    assert a["aha_reached"] is False
    assert a["days_since_last_event"] == 0
    assert b["setup_incomplete"] is True
    assert b["current_streak_days"] == 1
    assert b["order_count"] == 0
    assert b["units_left"] is None
    assert b["mean_order_gap_days"] is None
    assert dd["aha_reached"] is True
    assert dd["days_purchase_to_aha"] == 5
    assert dd["days_since_last_aha"] == 4
    assert dd["days_since_first_purchase"] == 10
    assert dd["setup_incomplete"] is False


def test_milestone_crossing_and_usage_trend() -> None:
    ev = events(
        [
            ("u", T - timedelta(days=k) + timedelta(hours=1), "use", None, None, None)
            for k in (1, 2, 3, 10)
        ]
    )
    got = row(build(ev, T, cfg()), "u")
    assert got["milestone_uses_count"] == 4
    assert got["milestone_uses_crossed_7d"] is True  # 1 before T - 7d, 4 now: crossed 2
    # weekly usage oldest->latest: 0,0,0,0,0,0,1,3; slope = (2.5*1 + 3.5*3) / 42
    assert got["usage_slope_8w"] == pytest.approx(13 / 42)
    assert got["current_streak_days"] == 3


def test_active_history_across_64_day_blocks_and_users() -> None:
    """Active days are kept as 64-day bitmasks: a run crossing a block edge is one streak."""
    feb29 = d(2024, 2, 29, 12)  # k = 0: the day of T - 1us

    def day(k: int) -> datetime:
        return feb29 - timedelta(days=k)

    ev = events(
        [
            *(("s", day(k), "use", None, None, None) for k in (65, 64, 63, 62, 0)),
            ("z", day(1), "buy", "P", 2.0, 7.0),
            ("z", day(0), "use", None, None, None),
        ]
    )
    got = build(ev, T, cfg(units_per_pack={"P": 10}))
    s, z = row(got, "s"), row(got, "z")
    assert (s["longest_streak_days"], s["current_streak_days"]) == (4, 1)  # k 65..62, then k 0
    assert s["mean_active_gap_days"] == 65 / 4  # first and last active day 65 days apart
    assert s["events_per_active_day"] == 1.0
    assert s["events_per_active_week"] == 2.5  # Dec 26-29 is one ISO week, Feb 29 another
    assert (s["order_count"], s["units_bought_total"], s["units_bought_7d"]) == (0, 0.0, 0.0)
    assert (z["longest_streak_days"], z["current_streak_days"]) == (2, 2)
    assert (z["units_bought_total"], z["units_bought_7d"], z["revenue_7d"]) == (20.0, 20.0, 7.0)


def test_std_of_order_gaps() -> None:
    ev = events([("u", d(2024, 1, day), "buy", "X", 1.0, None) for day in (1, 3, 7)])
    got = row(build(ev, T, cfg()), "u")
    assert got["mean_order_gap_days"] == pytest.approx(3.0)
    assert got["std_order_gap_days"] == pytest.approx(2**0.5)


def test_cutoff_inside_a_day_splits_windows_and_days() -> None:
    t = d(2024, 2, 21, 12)
    ev = events(
        [
            ("u", d(2024, 2, 14, 6), "use", None, None, None),  # before t - 7d
            ("u", d(2024, 2, 14, 18), "use", None, None, None),  # after t - 7d, same day
            ("u", d(2024, 2, 21, 11), "use", None, None, None),
            ("u", d(2024, 2, 21, 13), "use", None, None, None),  # after t
        ]
    )
    got = row(build(ev, t, cfg()), "u")
    assert got["usage_count_7d"] == 2
    assert got["active_days_7d"] == 2
    assert got["active_days_14d"] == 2
    many = build_many(ev, [t, T], cfg())
    assert many["cutoff"].to_list() == [t, T]
    assert_frame_equal(many.filter(pl.col("cutoff") == t).drop("cutoff"), build(ev, t, cfg()))


def test_registry_matches_build_for_the_default_config() -> None:
    config = load_config()
    ev = events([("u", d(2024, 1, 1), "app_open", None, None, None)])
    frame = build(ev, T, config)
    assert frame.schema == pl.Schema({"user_id": pl.String(), **expand(config)})
    assert windows_of(config) == [7, 14, 28, 56, 90, 180, 365]
    many = build_many(ev, [T], config)
    assert many.columns[:2] == ["user_id", "cutoff"]


def test_empty_result_keeps_the_schema() -> None:
    config = cfg()
    frame = build(GOLDEN, d(2020, 1, 1), config)
    assert frame.height == 0
    assert frame.schema == pl.Schema({"user_id": pl.String(), **expand(config)})


def test_features_md_matches_the_registry() -> None:
    assert FEATURES_MD.read_text(encoding="utf-8") == markdown_table(), (
        "regenerate it with lapse.features.registry.write_feature_table()"
    )


def test_naive_cutoffs_are_refused() -> None:
    with pytest.raises(LapseError, match="no timezone"):
        build(GOLDEN, datetime(2024, 3, 1), cfg())
    with pytest.raises(LapseError, match="no timezone"):
        build_many(GOLDEN, [T, datetime(2024, 3, 1)], cfg())
    with pytest.raises(LapseError, match="empty"):
        build_many(GOLDEN, [], cfg())


def test_missing_columns_are_named() -> None:
    with pytest.raises(MissingColumnsError, match="event"):
        build(GOLDEN.drop("event"), T, cfg())


def test_static_attributes_are_joined() -> None:
    config = cfg()
    config.attributes.static_features = ["plan"]
    attrs = pl.DataFrame({"user_id": ["a", "z"], "plan": ["pro", "free"]})
    frame = build(GOLDEN, T, config, attributes=attrs)
    assert frame["plan"].to_list() == ["pro", None, None]
    with pytest.raises(MissingColumnsError, match="plan"):
        build(GOLDEN, T, config, attributes=attrs.drop("plan"))


def test_build_sku_units_supply_and_gaps() -> None:
    config = cfg(units_per_pack={"X": 30})
    ev = events(
        [
            ("u", d(2024, 1, 1), "buy", "X", 1.0, 10.0),
            ("u", d(2024, 1, 31), "buy", "X", 2.0, 20.0),
            ("u", d(2024, 2, 10), "buy", "Y", 1.0, 5.0),
            ("u", d(2024, 2, 2), "use", None, 3.0, None),  # charged to X (last order)
            ("u", d(2024, 2, 20), "use", None, None, None),  # charged to Y
            ("u", d(2024, 2, 21), "use", "X", 1.0, None),
            ("u", T, "buy", "X", 5.0, None),  # at T: unseen
        ]
    )
    got = build_sku(ev, T, config)
    assert got["sku"].to_list() == ["X", "Y"]
    x, y = got.row(0, named=True), got.row(1, named=True)
    assert x["order_count"] == 2
    assert x["units_bought"] == 90.0
    assert x["last_order_units"] == 60.0
    assert x["units_consumed"] == 4.0
    assert x["units_left"] == 86.0
    assert x["consumption_rate_28d"] == pytest.approx(4 / 28)
    assert x["days_of_supply_left"] == pytest.approx(86 / (4 / 28))
    assert x["days_since_last_order"] == 30
    assert x["days_since_first_order"] == 60
    assert x["mean_order_gap_days"] == pytest.approx(30.0)
    assert x["std_order_gap_days"] is None
    assert y["units_consumed"] == 1.0
    assert y["consumption_rate_28d"] == pytest.approx(1 / 20)  # window cut to 20 days
    assert y["days_since_last_order"] == 20


def test_core_feature_set_equals_the_core_columns_of_the_full_build() -> None:
    config = cfg()
    core = build(GOLDEN, T, config, feature_set="core")
    assert core.schema == pl.Schema({"user_id": pl.String(), **expand(config, "core")})
    assert set(expand(config, "core")) == set(CORE_A)
    assert_frame_equal(core, build(GOLDEN, T, config).select(core.columns))
    t = d(2024, 2, 21, 12)  # a cutoff inside a day
    many = build_many(GOLDEN, [t, T], config, feature_set="core")
    assert many.columns == ["user_id", "cutoff", *core.columns[1:]]
    assert_frame_equal(many.filter(pl.col("cutoff") == T).drop("cutoff"), core)
    assert_frame_equal(
        many.filter(pl.col("cutoff") == t).drop("cutoff"),
        build(GOLDEN, t, config, feature_set="core"),
    )
    with pytest.raises(LapseError, match="feature_set"):
        build(GOLDEN, T, config, feature_set="most")  # type: ignore[arg-type]


def test_build_many_at_midnights_matches_build() -> None:
    # the daily path: every cutoff at 00:00 UTC, spread over more than 90 days
    config = cfg()
    cuts = [d(2023, 6, 1), d(2024, 1, 1), d(2024, 2, 19), d(2024, 2, 26), T, d(2024, 9, 1)]
    many = build_many(GOLDEN, cuts, config, feature_set="core")
    assert many.schema == pl.Schema(
        {"user_id": pl.String(), "cutoff": pl.Datetime("us", "UTC"), **expand(config, "core")}
    )
    assert many.height == sum(build(GOLDEN, t, config, feature_set="core").height for t in cuts)
    for t in cuts:
        one = build(GOLDEN, t, config, feature_set="core")
        assert_frame_equal(many.filter(pl.col("cutoff") == t).drop("cutoff"), one)
    # slices are filtered on the raw stamps: another zone or unit gives the same rows
    tokyo = GOLDEN.with_columns(pl.col("ts").dt.convert_time_zone("Asia/Tokyo"))
    assert_frame_equal(build_many(tokyo, cuts, config, feature_set="core"), many)
    nanos = GOLDEN.with_columns(pl.col("ts").dt.cast_time_unit("ns"))
    assert_frame_equal(build_many(nanos, cuts, config, feature_set="core"), many)
    empty = build_many(GOLDEN, [d(2020, 1, 1)], config, feature_set="core")
    assert empty.height == 0
    assert empty.schema == many.schema


@pytest.mark.parametrize("source", ["events", "orders"])
def test_build_many_of_named_features_equals_those_columns_of_the_full_build(source: str) -> None:
    # each feature alone, and the incremental look-ahead's group: the roll-up computes
    # only what they read, and must give the same values
    config = cfg()
    ev = GOLDEN if source == "events" else ORDERS
    cuts = [d(2024, 2, 21, 12), d(2024, 2, 26), T]  # one inside a day
    full = build_many(ev, cuts, config)
    lookahead = [
        "aha_reached",
        "days_since_first_purchase",
        "decay_ratio_14d",
        "dropping_ratio_7d",
        "error_count_7d",
        "milestone_uses_count",
        "milestone_uses_crossed_7d",
        "setup_incomplete",
        "setup_started_count_7d",
    ]
    for names in [lookahead, *([n] for n in expand(config))]:
        some = build_many(ev, cuts, config, names=names)
        assert some.columns == ["user_id", "cutoff", *(n for n in expand(config) if n in names)]
        assert_frame_equal(some, full.select(some.columns))
    with pytest.raises(LapseError, match=r"\['usage_count_3d'\] are not in the feature registry"):
        build_many(ev, cuts, config, names=["usage_count_3d", "tenure_days"])


# -- an order key: the lines of one order are one order ------------------------------------


def order_lines(
    rows: list[tuple[str, datetime, str, str | None, float | None, float | None, str | None]],
) -> pl.LazyFrame:
    schema = {**events([]).collect_schema(), "order_id": pl.String()}
    return pl.LazyFrame(rows, schema=schema, orient="row")


ORDERS = order_lines(
    [
        ("a", d(2024, 1, 10, 9), "buy", "X", 2.0, 20.0, "1001"),
        ("a", d(2024, 1, 10, 9), "buy", "Y", 1.0, 5.0, "1001"),
        ("a", d(2024, 1, 10, 9, 1), "buy", "X", 1.0, 10.0, "1001"),  # a minute later
        ("a", d(2024, 2, 9, 9), "buy", "X", 1.0, 10.0, "1002"),
        ("a", d(2024, 2, 9, 9), "buy", "Z", 4.0, 8.0, "1002"),
        ("a", d(2024, 2, 12), "ret", "X", -1.0, -10.0, "C1002"),  # a cancellation line
        ("a", d(2024, 2, 20), "buy", "X", 1.0, 10.0, None),  # no order id: an order alone
        ("a", d(2024, 2, 29, 23, 59), "buy", "Y", 1.0, 5.0, "1004"),  # spans the cutoff...
        ("a", T, "buy", "Y", 3.0, 15.0, "1004"),  # ...this line is at T: never seen
        ("b", d(2024, 2, 9, 9), "buy", "X", 1.0, 10.0, "1001"),  # another user's 1001
    ]
)


def test_order_lines_count_as_one_order() -> None:
    config = cfg()
    a = build(ORDERS, T, config).row(0, named=True)
    assert a["order_count"] == 4  # 1001, 1002, the row without an id, 1004
    assert (a["purchase_count_7d"], a["purchase_count_28d"], a["purchase_count_90d"]) == (1, 3, 4)
    assert a["return_count_28d"] == 1  # the cancellation is a return and removes no order
    assert a["event_count_90d"] == 5  # four orders and a return
    assert a["events_per_active_day"] == 1.0  # on 5 days
    assert a["revenue_90d"] == pytest.approx(20 + 5 + 10 + 10 + 8 - 10 + 10 + 5)  # every line
    assert a["units_bought_total"] == 11.0
    assert a["days_since_last_purchase"] == 0
    assert a["days_since_first_purchase"] == 50
    # gaps between the orders' first lines: Jan 10 09:00, Feb 9 09:00, Feb 20, Feb 29 23:59
    gaps = [30.0, 10.625, 9 + (23 * 60 + 59) / 1440]
    assert a["mean_order_gap_days"] == pytest.approx(sum(gaps) / 3)
    assert a["std_order_gap_days"] == pytest.approx(float(pl.Series(gaps).std()))  # type: ignore[arg-type]
    assert build(ORDERS, T, config).row(1, named=True)["order_count"] == 1
    # without the key every purchase row is an order
    lines = build(ORDERS.drop("order_id"), T, config).row(0, named=True)
    assert (lines["order_count"], lines["event_count_90d"]) == (7, 8)


def test_an_order_is_seen_from_its_first_line_with_the_lines_before_the_cutoff() -> None:
    config = cfg()
    t = d(2024, 1, 10, 9, 1)  # between the lines of 1001
    a = build(ORDERS, t, config).row(0, named=True)
    assert (a["order_count"], a["revenue_7d"], a["units_bought_total"]) == (1, 25.0, 3.0)
    # one roll-up for many cutoffs (split days; midnights, which skip the daily path) agrees
    cuts = [t, d(2024, 2, 9, 12), d(2024, 2, 21), T]
    for feature_set in ("all", "core"):
        many = build_many(ORDERS, cuts, config, feature_set=feature_set)  # type: ignore[arg-type]
        for cut in cuts:
            one = build(ORDERS, cut, config, feature_set=feature_set)  # type: ignore[arg-type]
            assert_frame_equal(many.filter(pl.col("cutoff") == cut).drop("cutoff"), one)


def test_build_sku_counts_orders_containing_the_sku() -> None:
    got = build_sku(ORDERS, T, cfg(units_per_pack={"X": 10}))
    x = got.filter(pl.col("user_id") == "a", pl.col("sku") == "X").row(0, named=True)
    assert x["order_count"] == 3  # 1001 (two X lines), 1002, the row without an id
    assert x["units_bought"] == 50.0
    assert x["last_order_units"] == 10.0
    assert x["mean_order_gap_days"] == pytest.approx((30 + 10.625) / 2)
    y = got.filter(pl.col("user_id") == "a", pl.col("sku") == "Y").row(0, named=True)
    assert (y["order_count"], y["units_bought"]) == (2, 2.0)  # 1004's line at T is unseen


def test_orders_on_the_online_retail_reference_match_its_invoices(tmp_path: Path) -> None:
    """``lapse features`` with ``order_id: InvoiceNo`` (skipped without the file)."""
    from typer.testing import CliRunner

    from lapse.cli import app
    from retail import AS_OF, check_orders, reference_file, write_config

    source = reference_file()
    out = tmp_path / "features.parquet"
    args = ["features", str(source), "--as-of", f"{AS_OF:%Y-%m-%d}", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "-c", str(write_config(tmp_path))])
    assert result.exit_code == 0, result.output
    features = pl.read_parquet(out)
    check_orders(features, source)
    a = features.filter(pl.col("user_id") == "12347").row(0, named=True)
    assert a["events_per_active_day"] == 1.0  # seven orders on seven days, not 182 lines
