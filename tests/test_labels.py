"""Labels, eligibility and the cutoff grid on tiny literal frames."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from lapse.config import LapseConfig, load_config
from lapse.exceptions import ConfigError, LapseError
from lapse.labels import churn_labels, cutoff_grid, describe_exclusions, eligible, population


def d(day: int, hour: int = 0) -> datetime:
    return datetime(2024, 1, 1, hour, tzinfo=UTC) + timedelta(days=day - 1)


def events(rows: list[tuple[str, int, str]], hour: int = 12) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "user_id": [r[0] for r in rows],
            "ts": [d(r[1], hour) for r in rows],
            "event": [r[2] for r in rows],
        },
        schema={"user_id": pl.String, "ts": pl.Datetime("us", "UTC"), "event": pl.String},
    )


def cfg(**labels: object) -> LapseConfig:
    c = load_config()
    return c.model_copy(update={"labels": c.labels.model_copy(update=labels)})


def labels_of(frame: pl.DataFrame) -> dict[str, bool]:
    return dict(zip(frame["user_id"], frame["churned"], strict=True))


def test_non_contractual_label_window_is_half_open() -> None:
    # cutoff day 30 (00:00), horizon 28 -> window [day 30, day 58)
    ev = events(
        [
            ("back_first_day", 20, "app_open"),
            ("back_first_day", 30, "app_open"),  # 12:00 on the cutoff day: inside
            ("back_last_day", 20, "app_open"),
            ("back_last_day", 57, "order_completed"),  # last day of the window
            ("gone", 20, "app_open"),
            ("gone", 58, "app_open"),  # first day after the window: churned
            ("non_qualifying", 20, "app_open"),
            ("non_qualifying", 35, "device_error"),  # error is not an activity role
        ]
    )
    out = churn_labels(ev, [d(30)], cfg(), data_end=d(60))
    assert labels_of(out) == {
        "back_first_day": False,
        "back_last_day": False,
        "gone": True,
        "non_qualifying": True,
    }
    assert out.schema["cutoff"] == pl.Datetime("us", "UTC")


def test_activity_exactly_at_cutoff_counts_for_the_label_not_eligibility() -> None:
    ev = pl.LazyFrame(
        {"user_id": ["u", "u"], "ts": [d(10), d(30)], "event": ["app_open", "app_open"]},
        schema={"user_id": pl.String, "ts": pl.Datetime("us", "UTC"), "event": pl.String},
    )
    out = churn_labels(ev, [d(30)], cfg(), data_end=d(60))
    assert labels_of(out) == {"u": False}
    # eligibility sees only ts < cutoff: the day-10 event, 20 days before
    assert eligible(ev, [d(30)], cfg(eligibility_days=19)).height == 0


def test_eligibility_modes() -> None:
    ev = events(
        [
            ("recent", 25, "app_open"),
            ("stale", 1, "app_open"),  # last activity 29 days before day 30
            ("errors_only", 25, "device_error"),
            ("future_only", 31, "app_open"),  # no history before the cutoff
        ]
    )
    active = eligible(ev, [d(30)], cfg())
    assert active["user_id"].to_list() == ["recent"]
    anyone = eligible(ev, [d(30)], cfg(eligibility="any_history"))
    assert sorted(anyone["user_id"]) == ["errors_only", "recent", "stale"]
    longer = eligible(ev, [d(30)], cfg(eligibility_days=60))
    assert sorted(longer["user_id"]) == ["recent", "stale"]


def reasons(frame: pl.DataFrame) -> dict[str, str | None]:
    return dict(zip(frame["user_id"], frame["excluded"], strict=True))


def test_population_says_why_each_user_with_history_is_not_eligible() -> None:
    ev = events(
        [
            ("recent", 25, "app_open"),
            ("stale", 1, "app_open"),
            ("errors_only", 25, "device_error"),
            ("future_only", 31, "app_open"),  # no history before the cutoff: not a customer yet
            ("bought", 5, "order_completed"),
            ("cancelled", 5, "order_completed"),
            ("cancelled", 20, "subscription_cancelled"),
        ]
    )
    active = population(ev, [d(30)], cfg())
    assert reasons(active) == {
        "bought": None,
        "cancelled": None,  # non-contractual labels do not look at cancels
        "errors_only": "no_activity",
        "recent": None,
        "stale": "inactive",
    }
    # eligible is exactly the rows population leaves in
    same = active.filter(pl.col("excluded").is_null()).select("user_id", "cutoff")
    assert eligible(ev, [d(30)], cfg()).equals(same)
    sub = population(ev, [d(30)], cfg(eligibility="subscribed"))
    assert reasons(sub) == {
        "bought": None,
        "cancelled": "cancelled",
        "errors_only": "no_purchase",
        "recent": "no_purchase",
        "stale": "no_purchase",
    }
    contractual = population(ev, [d(30)], cfg(kind="contractual", eligibility_days=60))
    assert reasons(contractual)["cancelled"] == "cancelled"
    assert reasons(contractual)["bought"] is None
    assert reasons(population(ev, [d(30)], cfg(eligibility="any_history"))) == dict.fromkeys(
        ["bought", "cancelled", "errors_only", "recent", "stale"]
    )


def test_exclusions_in_words_name_the_roles_and_the_window() -> None:
    c = cfg(eligibility_days=90)
    counts = {"no_activity": 2, "inactive": 2_842, "cancelled": 1}
    assert describe_exclusions(counts, c, d(30)) == (
        "2,844 had no event of the activity roles (app_open, device_used, order_completed) "
        "in the 90 days before 2024-01-30 (2 of them never had one); "
        "1 had cancelled since their last purchase"
    )
    assert describe_exclusions({}, c, d(30)) == ""


def test_contractual_labels_and_already_cancelled_users() -> None:
    ev = events(
        [
            ("cancels", 5, "order_completed"),
            ("cancels", 40, "subscription_cancelled"),
            ("stays", 5, "order_completed"),
            ("stays", 70, "subscription_cancelled"),  # after the window
            ("gone_before", 5, "order_completed"),
            ("gone_before", 10, "subscription_cancelled"),  # cancelled before T
            ("resubscribed", 5, "subscription_cancelled"),
            ("resubscribed", 12, "order_completed"),
        ]
    )
    c = cfg(kind="contractual", eligibility="any_history")
    out = churn_labels(ev, [d(30)], c, data_end=d(80))
    assert labels_of(out) == {"cancels": True, "resubscribed": False, "stays": False}
    sub = eligible(ev, [d(30)], cfg(eligibility="subscribed"))
    assert sorted(sub["user_id"]) == ["cancels", "resubscribed", "stays"]


def test_transaction_table_with_purchases_only() -> None:
    c = load_config()
    c = c.model_copy(
        update={
            "roles": c.roles.model_copy(update={"usage": [], "purchase": ["purchase"]}),
            "labels": c.labels.model_copy(update={"eligibility_days": 90}),
        }
    )
    ev = events([("a", 1, "purchase"), ("a", 40, "purchase"), ("b", 2, "purchase")])
    assert labels_of(churn_labels(ev, [d(30)], c, data_end=d(60))) == {"a": False, "b": True}


def test_several_cutoffs_at_once_equal_one_by_one() -> None:
    ev = events(
        [
            ("a", 1, "app_open"),
            ("a", 15, "app_open"),
            ("a", 50, "app_open"),
            ("b", 3, "order_completed"),
            ("b", 44, "app_open"),
        ]
    )
    cuts = [d(10), d(20), d(30)]
    together = churn_labels(ev, cuts, cfg(), data_end=d(90))
    apart = pl.concat([churn_labels(ev, [c], cfg(), data_end=d(90)) for c in cuts])
    assert together.equals(apart.sort("cutoff", "user_id"))
    # a at day 20: last activity day 15 (eligible), next day 50 >= day 48 -> churned
    row = together.filter((pl.col("user_id") == "a") & (pl.col("cutoff") == d(20)))
    assert row["churned"].item() is True


def test_incomplete_horizon_is_refused() -> None:
    ev = events([("a", 1, "app_open"), ("a", 40, "app_open")])
    with pytest.raises(LapseError, match="past the end of the data"):
        churn_labels(ev, [d(20)], cfg())  # data ends day 41, window ends day 48


def test_unknown_or_empty_activity_roles() -> None:
    ev = events([("a", 1, "app_open")])
    with pytest.raises(ConfigError, match="unknown role"):
        eligible(ev, [d(5)], cfg(activity_roles=["usage", "nope"]))
    no_roles = cfg(activity_roles=["cancel"])
    no_roles = no_roles.model_copy(
        update={"roles": no_roles.roles.model_copy(update={"cancel": []})}
    )
    with pytest.raises(ConfigError, match="no event names"):
        eligible(ev, [d(5)], no_roles)


def test_cutoff_grid_with_embargo() -> None:
    # data from day 1 to day 300 (last event's day): data_end = day 301
    ev = events([("a", 1, "app_open"), ("a", 300, "app_open")])
    g = cutoff_grid(ev, cfg())
    assert g.data_end == d(301)
    assert g.test == d(301) - timedelta(days=28)
    assert g.validation == g.test - timedelta(days=28)
    assert len(g.training) == 12
    assert g.training[-1] == g.validation - timedelta(days=28)
    assert all(b - a == timedelta(days=7) for a, b in zip(g.training, g.training[1:], strict=False))
    assert all(t + g.horizon <= g.validation for t in g.training)
    assert g.validation + g.horizon <= g.test
    assert g.complete[-1] == g.test
    assert all(c + g.horizon <= g.data_end for c in g.complete)
    assert g.complete[0] >= g.data_start + timedelta(days=28)
    assert all(c.hour == 0 and c.tzinfo is not None for c in g.complete)


def test_cutoff_grid_on_short_data_keeps_what_fits_or_explains() -> None:
    ev = events([("a", 1, "app_open"), ("a", 130, "app_open")])
    g = cutoff_grid(ev, cfg())
    assert 1 <= len(g.training) < 12
    short = events([("a", 1, "app_open"), ("a", 80, "app_open")])
    with pytest.raises(LapseError, match="too short"):
        cutoff_grid(short, cfg())
    with pytest.raises(LapseError, match="empty"):
        cutoff_grid(short.filter(pl.lit(False)), cfg())
