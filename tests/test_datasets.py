from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lapse.config import load_config
from lapse.datasets import EVENT_NAMES, SKU_UNITS, SyntheticData, generate, write
from lapse.schema import EVENT_COLUMNS, ROLES

START = date(2026, 1, 1)
DAYS = 180
END = START + timedelta(days=DAYS)
USAGE = ["app_open", "device_used"]


@pytest.fixture(scope="module")
def small() -> SyntheticData:
    return generate(n_users=800, n_days=90, seed=3)


@pytest.fixture(scope="module")
def large() -> SyntheticData:
    # Big enough that the planted effects stand clear of sampling noise.
    return generate(n_users=6000, n_days=DAYS, seed=0, start=START)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    ranks = pl.Series(score).rank("average").to_numpy()
    pos = int(label.sum())
    neg = len(label) - pos
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def person_days(data: SyntheticData) -> pl.DataFrame:
    """truth_hazard rows with the realised 28-day outcome and each user's state that day."""
    return (
        data.truth_hazard.join(data.truth, on="user_id")
        .filter(pl.col("date") <= END - timedelta(days=28))
        .with_columns(
            churns=(pl.col("churn_date") < pl.col("date") + timedelta(days=28)).fill_null(False),
            activated=(pl.col("activation_date") < pl.col("date")).fill_null(False),
            sticky=(pl.col("sticky_date") < pl.col("date")).fill_null(False),
            neutral=(pl.col("neutral_date") < pl.col("date")).fill_null(False),
            tenure_month=((pl.col("date") - pl.col("signup_date")).dt.total_days() // 30).clip(
                0, 6
            ),
        )
    )


def churn_ratio(rows: pl.DataFrame, exposure: str) -> float:
    """Observed / expected 28-day churn among exposed rows, expected from unexposed rows
    of the same tenure month (a crude Mantel-Haenszel control for survivor selection)."""
    strata = rows.group_by("tenure_month").agg(
        n_exp=pl.col(exposure).sum(),
        y_exp=(pl.col(exposure) & pl.col("churns")).sum(),
        rate_unexp=pl.col("churns").filter(~pl.col(exposure)).mean(),
    )
    observed = strata["y_exp"].sum()
    expected = (strata["n_exp"] * strata["rate_unexp"]).sum()
    return float(observed / expected)


# --- shape ------------------------------------------------------------------------


def test_events_have_the_canonical_schema_and_order(small: SyntheticData) -> None:
    events = small.events
    assert events.schema == pl.Schema(EVENT_COLUMNS)
    assert events.height > 0
    assert events.equals(events.sort("user_id", "ts", maintain_order=True))
    assert events["user_id"].str.contains(r"^u\d{6}$").all()
    assert events["event"].null_count() == 0
    assert set(events["event"].unique()) <= set(EVENT_NAMES)


def test_truth_users_and_hazard_frames(small: SyntheticData) -> None:
    ids = pl.Series("user_id", [f"u{i:06d}" for i in range(800)])
    for frame in (small.truth, small.users):
        assert frame["user_id"].equals(ids)
    assert small.truth.schema == pl.Schema(
        {
            "user_id": pl.String,
            "signup_date": pl.Date,
            "churn_date": pl.Date,
            "activation_date": pl.Date,
            "consumption_rate": pl.Float64,
            "has_telemetry": pl.Boolean,
            "is_subscriber": pl.Boolean,
            "sticky_date": pl.Date,
            "neutral_date": pl.Date,
            "depletions": pl.List(
                pl.Struct(
                    {
                        "order_ts": pl.Datetime("us", "UTC"),
                        "sku": pl.String,
                        "units": pl.Int64,
                        "depletion_date": pl.Date,
                    }
                )
            ),
        }
    )
    assert small.users.schema == pl.Schema(
        {
            "user_id": pl.String,
            "plan": pl.String,
            "email": pl.String,
            "phone": pl.String,
            "country": pl.String,
            "signup_channel": pl.String,
            "email_consent": pl.Boolean,
            "do_not_contact": pl.Boolean,
            "external_id": pl.String,
        }
    )
    assert set(small.users["plan"]) == {"basic", "premium"}
    assert small.users["external_id"].n_unique() == 800
    assert not small.users.filter(pl.col("email").is_null())["email_consent"].any()
    assert small.truth_hazard.schema == pl.Schema(
        {"user_id": pl.String, "date": pl.Date, "p_churn_28d": pl.Float32}
    )
    assert small.truth["depletions"].null_count() == 0


def test_truth_hazard_has_one_row_per_live_user_day(small: SyntheticData) -> None:
    end = START + timedelta(days=90)
    expected = small.truth.select(
        "user_id",
        n=(
            pl.min_horizontal(pl.col("churn_date").fill_null(end), pl.lit(end))
            - pl.max_horizontal("signup_date", pl.lit(START))
        )
        .dt.total_days()
        .clip(0),
    ).filter(pl.col("n") > 0)
    got = small.truth_hazard.group_by("user_id").agg(n=pl.len(), distinct=pl.col("date").n_unique())
    both = expected.join(got, on="user_id", how="full", coalesce=True)
    assert (both["n"] == both["n_right"]).all()
    assert (both["distinct"] == both["n_right"]).all()


def test_same_seed_same_frames_other_seed_differs() -> None:
    a, b = generate(300, 40, seed=5), generate(300, 40, seed=5)
    for name in ("events", "users", "truth", "truth_hazard"):
        assert_frame_equal(getattr(a, name), getattr(b, name))
    assert not a.events.equals(generate(300, 40, seed=6).events)


def test_write_round_trips(small: SyntheticData, tmp_path: Path) -> None:
    paths = write(small, tmp_path / "out")
    assert set(paths) == {"events", "users", "truth", "truth_hazard"}
    for name, path in paths.items():
        assert path.name == f"{name}.parquet"
        assert_frame_equal(pl.read_parquet(path), getattr(small, name))


def test_rejects_empty_population() -> None:
    with pytest.raises(ValueError, match="positive"):
        generate(n_users=0)


# --- events and their invariants -----------------------------------------------------


def test_every_event_of_the_default_roles_appears(large: SyntheticData) -> None:
    roles = load_config(None).roles
    seen = set(large.events["event"].unique())
    for role in ROLES:
        assert roles.of(role), role
        assert set(roles.of(role)) <= seen, role
    assert seen == set(EVENT_NAMES)


def test_no_events_before_signup_or_after_churn(large: SyntheticData) -> None:
    events = large.events.join(large.truth, on="user_id").with_columns(day=pl.col("ts").dt.date())
    assert events.filter(pl.col("day") < pl.max_horizontal("signup_date", pl.lit(START))).is_empty()
    assert events.filter(pl.col("day") >= pl.col("churn_date")).is_empty()
    # Users who sign up inside the window start with their signup event.
    first = events.group_by("user_id").agg(pl.col("event").first(), pl.col("signup_date").first())
    assert (first.filter(pl.col("signup_date") >= START)["event"] == "signup").all()
    assert (
        events.filter(pl.col("event") == "signup").height
        == large.truth.filter(pl.col("signup_date") >= START).height
    )


def test_subscribers_cancel_when_they_decide_to_leave(large: SyntheticData) -> None:
    cancels = (
        large.events.filter(pl.col("event") == "subscription_cancelled")
        .join(large.truth, on="user_id")
        .with_columns(lead=(pl.col("churn_date") - pl.col("ts").dt.date()).dt.total_days())
    )
    assert cancels["user_id"].is_unique().all() and cancels["is_subscriber"].all()
    # on the day churn is decided: up to six weeks before the churn date, or a day before
    # it for a returned device; a null churn date falls after the window
    assert cancels["lead"].drop_nulls().is_between(1, 42).all()
    assert cancels["lead"].null_count() < 0.2 * cancels.height
    assert (cancels["lead"] > 7).mean() > 0.5  # most cancel, then use up their pods
    churned_subs = large.truth.filter(pl.col("is_subscriber") & pl.col("churn_date").is_not_null())
    assert churned_subs["user_id"].is_in(cancels["user_id"].implode()).all()


def test_orders_returns_and_consumption_rows(large: SyntheticData) -> None:
    events = large.events
    orders = events.filter(pl.col("event") == "order_completed")
    assert orders["sku"].null_count() == 0
    assert set(orders["sku"]) == {"DEVICE-1", "PODS-30", "PODS-60", "MUG-1"}
    assert (orders["quantity"] >= 1).all()
    assert (orders["revenue"] > 0).all()
    returns = events.filter(pl.col("event") == "order_returned").join(large.truth, on="user_id")
    assert returns.height > 0
    assert (returns["sku"] == "DEVICE-1").all()
    assert ((returns["quantity"] < 0) & (returns["revenue"] < 0)).all()
    returned_on = returns["ts"].dt.date()
    assert ((returned_on - returns["signup_date"]).dt.total_days() <= 14).all()
    assert (returns["churn_date"] == returned_on + timedelta(days=1)).all()
    used = events.filter(pl.col("event") == "device_used")
    assert (used["quantity"] > 0).all()
    assert used["revenue"].null_count() == used.height
    telemetry = large.truth.filter("has_telemetry")["user_id"]
    assert used["user_id"].is_in(telemetry.implode()).all()


def test_activity_is_heavy_tailed_and_weekly(large: SyntheticData) -> None:
    usage = large.events.filter(pl.col("event").is_in(USAGE))
    per_user = usage.group_by("user_id").len()["len"].sort(descending=True)
    top_decile = per_user.head(len(per_user) // 10).sum()
    assert top_decile / per_user.sum() > 0.3
    by_weekday = usage.group_by(pl.col("ts").dt.weekday()).len().sort("ts")["len"]
    assert by_weekday[5:].mean() > 1.05 * by_weekday[:5].mean()


# --- planted behavior ------------------------------------------------------------


def test_usage_drops_before_churn_but_not_perfectly(large: SyntheticData) -> None:
    churned = large.truth.filter(
        pl.col("churn_date").is_between(START + timedelta(days=28), END - timedelta(days=1))
        & (pl.col("signup_date") <= pl.col("churn_date") - timedelta(days=56))
    )
    lag = (pl.col("churn_date") - pl.col("ts").dt.date()).dt.total_days()
    windows = (
        large.events.filter(pl.col("event").is_in(USAGE))
        .join(churned.select("user_id", "churn_date"), on="user_id")
        .group_by("user_id")
        .agg(last=lag.is_between(1, 14).sum(), prev=lag.is_between(15, 28).sum())
    )
    windows = churned.select("user_id").join(windows, on="user_id", how="left").fill_null(0)
    assert windows.height > 200
    assert windows["last"].mean() < 0.6 * windows["prev"].mean()
    dropped = (windows["last"] <= 0.5 * windows["prev"]).mean()
    assert 0.4 < dropped < 0.95


def test_sticky_behavior_lowers_churn_and_neutral_does_not(large: SyntheticData) -> None:
    rows = person_days(large).filter("activated", pl.col("tenure_month") >= 1)
    sticky, neutral = churn_ratio(rows, "sticky"), churn_ratio(rows, "neutral")
    assert sticky < 0.65
    assert 0.75 < neutral < 1.3
    assert neutral - sticky > 0.25


def test_activated_users_churn_less(large: SyntheticData) -> None:
    rows = person_days(large).filter(pl.col("tenure_month") >= 1)
    assert churn_ratio(rows, "activated") < 0.7


def test_truth_hazard_is_a_probability_that_ranks_churners(large: SyntheticData) -> None:
    p = large.truth_hazard["p_churn_28d"]
    assert p.min() >= 0.0 and p.max() <= 1.0
    rows = person_days(large)
    label = rows["churns"].to_numpy()
    assert (
        rows.filter("churns")["p_churn_28d"].mean()
        > 5 * rows.filter(~pl.col("churns"))["p_churn_28d"].mean()
    )
    assert auc(rows["p_churn_28d"].to_numpy(), label) > 0.85
    # Before the decision (0 < p < 1) the score is a forecast, not an oracle: still useful.
    healthy = rows.filter(pl.col("p_churn_28d").is_between(0, 1, closed="none"))
    assert 0.6 < auc(healthy["p_churn_28d"].to_numpy(), healthy["churns"].to_numpy()) < 0.9


# --- consumables ---------------------------------------------------------------


def depletions(data: SyntheticData) -> pl.DataFrame:
    return (
        data.truth.select("user_id", "depletions")
        .explode("depletions")
        .unnest("depletions")
        .drop_nulls("order_ts")
        .sort("user_id", "order_ts")
    )


def test_depletions_cover_every_consumable_order(large: SyntheticData) -> None:
    dep = depletions(large)
    orders = large.events.filter(
        (pl.col("event") == "order_completed") & pl.col("sku").is_in(list(SKU_UNITS))
    )
    assert dep.height == orders.height
    assert dep["order_ts"].equals(orders.sort("user_id", "ts")["ts"].alias("order_ts"))
    units = orders.sort("user_id", "ts").select(
        (pl.col("quantity") * pl.col("sku").replace_strict(SKU_UNITS)).cast(pl.Int64)
    )
    assert dep["units"].equals(units.to_series().alias("units"))


def test_depletion_follows_order_and_reorders_follow_depletion(large: SyntheticData) -> None:
    dep = depletions(large)
    ran_out = dep.drop_nulls("depletion_date")
    assert ran_out.height > 0.3 * dep.height
    assert (ran_out["depletion_date"] > ran_out["order_ts"].dt.date()).all()
    reorders = dep.with_columns(next_order=pl.col("order_ts").shift(-1).over("user_id")).drop_nulls(
        ["next_order", "depletion_date"]
    )
    gap = (reorders["next_order"].dt.date() - reorders["depletion_date"]).dt.total_days()
    assert (gap >= -7).mean() > 0.8  # most reorders come once supply is (nearly) gone
    assert 0 <= gap.median() <= 7  # usually a little late
    assert (gap > 0).mean() > 0.4


def test_users_without_telemetry_still_reorder(large: SyntheticData) -> None:
    counts = (
        depletions(large)
        .group_by("user_id")
        .len()
        .join(large.truth.select("user_id", "has_telemetry"), on="user_id")
        .group_by("has_telemetry")
        .agg(pl.col("len").mean())
        .sort("has_telemetry")
    )
    dark, lit = counts["len"]
    assert dark > 0.8 * lit


def test_scan_truth_reads_what_write_wrote_and_names_a_missing_file(tmp_path: Path) -> None:
    from lapse.datasets import scan_truth
    from lapse.exceptions import LapseError

    data = generate(n_users=30, n_days=20, seed=1)
    write(data, tmp_path)
    assert scan_truth(tmp_path, "truth_hazard").collect().equals(data.truth_hazard)
    with pytest.raises(LapseError, match=r"elsewhere/truth\.parquet: not found"):
        scan_truth(tmp_path / "elsewhere", "truth")
