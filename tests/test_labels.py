"""Labels, eligibility and the cutoff grid on tiny literal frames."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from lapse.config import LabelsConfig, LapseConfig, load_config
from lapse.exceptions import ConfigError, LapseError
from lapse.labels import (
    MIN_TRAIN_CUTOFFS,
    churn_labels,
    customer_quantile,
    cutoff_grid,
    describe_exclusions,
    eligible,
    fit_grid,
    population,
    propose_labels,
    repeat_gaps,
    training_cutoffs_fit,
)


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


def test_days_to_next_gives_the_label_at_any_horizon() -> None:
    # cutoff day 30 (00:00); the events are at 12:00
    ev = events(
        [
            ("soon", 20, "app_open"),
            ("soon", 32, "app_open"),  # the first one at or after the cutoff counts
            ("soon", 40, "app_open"),
            ("late", 20, "app_open"),
            ("late", 50, "order_completed"),
            ("never", 20, "app_open"),
            ("never", 35, "device_error"),  # not an activity role
        ]
    )
    out = churn_labels(ev, [d(30)], cfg(), data_end=d(60), days_to_next=True)
    got = dict(zip(out["user_id"], out["days_to_next"], strict=True))
    assert got == {"soon": 2.5, "late": 20.5, "never": None}
    assert labels_of(out) == {u: v is None or v >= 28 for u, v in got.items()}
    plain = churn_labels(ev, [d(30)], cfg(), data_end=d(60))
    assert plain.columns == ["user_id", "cutoff", "churned"]


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


@pytest.mark.parametrize(
    "labels",
    [{}, {"eligibility": "subscribed"}, {"kind": "contractual", "eligibility_days": 20}],
)
def test_population_at_many_cutoffs_equals_one_by_one(labels: dict[str, object]) -> None:
    """Many cutoffs (the look-ahead's 15-minute slots: an as-of join) give each cutoff's
    population as one cutoff alone (a single pass) does; an event at a cutoff is after it."""
    ev = events(
        [
            ("a", 1, "app_open"),
            ("a", 9, "order_completed"),
            ("a", 30, "app_open"),
            ("b", 3, "order_completed"),
            ("b", 12, "subscription_cancelled"),
            ("b", 25, "order_completed"),
            ("c", 20, "device_error"),
            ("d", 29, "subscription_cancelled"),
        ],
        hour=6,
    )
    cuts = [d(k, h) for k in (2, 9, 12, 25, 29, 30, 31) for h in (0, 6, 7)]
    together = population(ev, cuts, cfg(**labels))
    apart = pl.concat([population(ev, [c], cfg(**labels)) for c in cuts])
    assert len(cuts) > 8 and together.equals(apart)
    assert together["excluded"].null_count() > 0 and together["excluded"].drop_nulls().len() > 0


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


# -- fitting the grid to the span --------------------------------------------------------


def span(days: int) -> pl.LazyFrame:
    """Events on day 1 and on day ``days``: ``days`` days of data."""
    return events([("a", 1, "app_open"), ("a", days, "app_open")])


@pytest.mark.parametrize("horizon", [7, 10, 28, 30, 56])
@pytest.mark.parametrize("every", [1, 3, 7])
def test_training_cutoffs_fit_counts_what_the_grid_lays(horizon: int, every: int) -> None:
    for days in (90, 131, 200, 365):
        n = training_cutoffs_fit(days, horizon_days=horizon, every_days=every, min_history_days=28)
        c = cfg(horizon_days=horizon, cutoff_every_days=every, train_cutoffs=10_000)
        if n == 0:
            with pytest.raises(LapseError, match="too short"):
                cutoff_grid(span(days), c)
        else:
            assert len(cutoff_grid(span(days), c).training) == n


def test_fit_grid_keeps_a_grid_that_fits() -> None:
    fit = fit_grid(LabelsConfig(), 300)
    assert fit.labels == LabelsConfig() and fit.note is None and fit.fits >= 12


def test_fit_grid_notes_fewer_cutoffs_than_asked() -> None:
    # 180 days, 28-day horizon, weekly: 10 of 12 fit (the synthetic demo's case)
    fit = fit_grid(LabelsConfig(), 180)
    assert fit.labels == LabelsConfig() and fit.fits == 10
    assert fit.note is not None and "10 of the 12 training cutoffs" in fit.note


def test_fit_grid_adapts_the_step_rather_than_train_on_a_handful() -> None:
    # 130 days: only 3 weekly training cutoffs fit; every 2 days, 10 do
    assert training_cutoffs_fit(130, horizon_days=28, every_days=7, min_history_days=28) == 3
    fit = fit_grid(LabelsConfig(), 130)
    assert fit.labels.cutoff_every_days == 2
    assert fit.labels.horizon_days == 28  # what churn means is never changed
    assert fit.note is not None
    assert "only 3 training cutoff(s) fit" in fit.note and "every 2 days" in fit.note
    grid = cutoff_grid(span(130), cfg(**fit.labels.model_dump()))
    assert len(grid.training) >= MIN_TRAIN_CUTOFFS
    assert all(
        b - a == timedelta(days=2) for a, b in zip(grid.training, grid.training[1:], strict=False)
    )


def test_fit_grid_fails_in_one_line_naming_a_horizon_that_fits() -> None:
    with pytest.raises(LapseError) as caught:
        fit_grid(LabelsConfig(horizon_days=56), 150)
    message = str(caught.value)
    assert "\n" not in message and "150 days" in message
    longest = int(message.split("labels.horizon_days to ")[1].split()[0])
    fit = fit_grid(LabelsConfig(horizon_days=longest), 150)
    assert fit.fits >= MIN_TRAIN_CUTOFFS
    with pytest.raises(LapseError):
        fit_grid(LabelsConfig(horizon_days=longest + 7), 150)


def test_repeat_gaps_count_active_days_and_weigh_customers_equally() -> None:
    ev = events(
        [
            ("weekly", 1, "order"),
            ("weekly", 1, "order"),  # a second line of the same day's order: one visit
            ("weekly", 8, "order"),
            ("weekly", 15, "order"),
            ("weekly", 29, "order"),  # gaps 7, 7, 14
            ("monthly", 1, "order"),
            ("monthly", 31, "order"),  # gap 30
            ("once", 5, "order"),  # no gap
        ]
    )
    gaps = repeat_gaps(ev).sort("user_id", "gap_days")
    assert gaps.rows() == [("monthly", 30.0), ("weekly", 7.0), ("weekly", 7.0), ("weekly", 14.0)]
    # weights: each weekly gap 1/3, the monthly gap 1: shares 1/6, 1/3, 1/2, 1 (of 2)
    assert customer_quantile(gaps, 0.3) == 7.0
    assert customer_quantile(gaps, 0.5) == 14.0
    assert customer_quantile(gaps, 0.8) == 30.0


def cadence_log(gap: float, days: int, users: int = 300, seed: int = 0) -> pl.LazyFrame:
    """Users ordering every ``gap`` days on average (gamma-jittered), over ``days`` days."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, int, str]] = []
    for u in range(users):
        t = float(rng.uniform(1, gap))
        while t <= days:
            rows.append((f"u{u}", int(t), "purchase"))
            t += max(1.0, rng.gamma(8.0, gap / 8.0))
    rows += [("edge", 1, "purchase"), ("edge", days, "purchase")]
    return events(rows)


@pytest.mark.parametrize(
    ("gap", "days", "horizon"),
    [
        (7, 365, (14, 21)),  # weekly buyers: a two- to three-week horizon
        (91, 730, (98, 126)),  # quarterly buyers with two years of data
    ],
)
def test_proposed_horizon_follows_the_customers_cadence(
    gap: float, days: int, horizon: tuple[int, int]
) -> None:
    log = cadence_log(gap, days)
    fit = propose_labels(days, repeat_gaps(log), purchase_only=True)
    lab = fit.labels
    assert horizon[0] <= lab.horizon_days <= horizon[1] and lab.horizon_days % 7 == 0
    assert lab.eligibility == "any_history" and lab.activity_roles == ["purchase"]
    assert lab.cutoff_every_days == 7 and lab.train_cutoffs == 12 and fit.fits >= 12
    # the config it proposes trains: the grid lays every training cutoff it asks for
    grid = cutoff_grid(log, cfg(**lab.model_dump()))
    assert len(grid.training) == lab.train_cutoffs


def test_proposed_horizon_is_shortened_until_the_training_cutoffs_fit() -> None:
    # quarterly buyers, one year: their gaps want ~17 weeks; 8 weekly cutoffs allow 13
    log = cadence_log(91, 365)
    fit = propose_labels(365, repeat_gaps(log), purchase_only=False)
    lab = fit.labels
    assert lab.horizon_days == 91 and fit.note is not None and "shortened from 1" in fit.note
    week_longer = training_cutoffs_fit(365, horizon_days=98, every_days=7, min_history_days=28)
    assert fit.fits >= MIN_TRAIN_CUTOFFS > week_longer
    assert lab.eligibility == "active" and lab.eligibility_days == lab.horizon_days
    assert len(cutoff_grid(log, cfg(**lab.model_dump())).training) == lab.train_cutoffs


def test_proposal_on_a_short_history_uses_more_cutoffs_not_a_handful() -> None:
    log = cadence_log(7, 75)
    fit = propose_labels(75, repeat_gaps(log), purchase_only=True)
    assert fit.labels.horizon_days == 7
    assert fit.labels.cutoff_every_days < 7 and fit.fits >= MIN_TRAIN_CUTOFFS
    assert fit.note is not None and "cutoff grid adapted" in fit.note
    with pytest.raises(LapseError, match="supply more history"):
        propose_labels(40, repeat_gaps(log), purchase_only=True)
