"""Survival pieces of replenishment: episodes, covariates, models and metrics.

Tiny literal frames pin the meaning; lifelines itself is the oracle for the
closed-form predictions (real fits on small data, no mocks).
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.config import load_config
from lapse.features.episodes_covariates import order_covariates, purchase_orders
from lapse.labels.episodes import consumable_skus, episodes, open_episodes, reorder_outcomes
from lapse.modeling.survival import (
    CANDIDATES,
    ConvergenceProblem,
    DepletionRule,
    LastGap,
    SurvivalModel,
    km_median,
)
from lapse.modeling.survival_metrics import (
    brier,
    calibration_error,
    concordance,
    integrated_brier,
    kaplan_meier,
    survival_metrics,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def d(days: float) -> datetime:
    return T0 + timedelta(days=days)


def _events(rows: list[tuple[str, float, str, str | None, float | None]]) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "user_id": [r[0] for r in rows],
            "ts": [d(r[1]) for r in rows],
            "event": [r[2] for r in rows],
            "sku": [r[3] for r in rows],
            "quantity": [r[4] for r in rows],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


BUY = "order_completed"
USE = "device_used"
# user a: pods on day 0 (one 30-pack, two lines on the same day) and day 20; a mug;
# one pod a day from day 1 (telemetry without a SKU); user b: one pack, never again
EVENTS = _events(
    [
        ("a", 0.0, BUY, "PODS-30", 1.0),
        ("a", 0.5, BUY, "MUG-1", 1.0),
        *[("a", 1.0 + i, USE, None, 1.0) for i in range(30)],
        ("a", 20.25, BUY, "PODS-30", 2.0),
        ("a", 45.0, BUY, "PODS-30", 1.0),
        ("b", 3.0, BUY, "PODS-30", None),
    ]
)


def test_episodes_are_censored_at_the_cutoff() -> None:
    config = load_config()
    ep = episodes(EVENTS, config, cutoff=d(40), skus={"PODS-30": 30.0}, target="sku")
    assert ep.select("user_id", "duration_days", "observed").rows() == [
        ("a", 20.25, True),
        ("a", 19.75, False),  # the day-45 order is past the cutoff
        ("b", 37.0, False),
    ]
    assert (ep["end"] <= d(40)).all()
    # target "any": the mug on day 0.5 is part of day 0's order (same UTC day)
    anything = episodes(EVENTS, config, cutoff=d(40), skus=None, target="any")
    assert anything.filter(pl.col("user_id") == "a")["duration_days"].to_list() == [20.25, 19.75]
    assert set(anything["sku"]) == {"*"}


def test_open_episodes_and_their_outcomes() -> None:
    config = load_config()
    skus = {"PODS-30": 30.0}
    op = open_episodes(EVENTS, config, as_of=d(40), skus=skus, target="sku")
    assert op.select("user_id", "elapsed_days").rows() == [("a", 19.75), ("b", 37.0)]
    out = reorder_outcomes(EVENTS, op, config, as_of=d(40), until=d(50), skus=skus, target="sku")
    assert out.select("user_id", "residual_days", "observed").rows() == [
        ("a", 5.0, True),
        ("b", 10.0, False),
    ]


def test_covariates_at_purchase_by_hand() -> None:
    config = load_config()
    orders = purchase_orders(EVENTS, config, until=d(60), skus={"PODS-30": 30.0}, target="sku")
    cov = order_covariates(EVENTS, orders, config).filter(pl.col("user_id") == "a")
    second = cov.row(1, named=True)
    assert second["order_units"] == 60.0 and second["prior_orders"] == 1.0
    assert second["prev_gap_days"] == 20.25
    # 30 bought; pods used on days 1..20 (20 of them) before day 20.25
    assert second["units_on_hand"] == 10.0
    # 20 pods over the 20.25 days since the first order
    assert second["consumption_rate_28d"] == pytest.approx(20 / 20.25)
    assert second["supply_days"] == pytest.approx(70 / (20 / 20.25))
    first = cov.row(0, named=True)
    assert first["prev_gap_days"] is None and first["supply_days"] is None
    # no usage role events here beyond device_used (which is `usage` in the default roles)
    assert second["usage_28d"] == 20.0


def test_covariates_and_episodes_never_see_the_future() -> None:
    config = load_config()
    skus = {"PODS-30": 30.0}
    later = _events([("a", 41.0 + i, USE, "PODS-30", 5.0) for i in range(3)])
    more = pl.concat([EVENTS, later.select(EVENTS.collect_schema().names())])
    for frame in (EVENTS, more):
        orders = purchase_orders(frame, config, until=d(40), skus=skus, target="sku")
        cov = order_covariates(frame, orders, config)
        ep = episodes(frame, config, cutoff=d(40), skus=skus, target="sku")
        if frame is EVENTS:
            base_cov, base_ep = cov, ep
    assert cov.equals(base_cov) and ep.equals(base_ep)


def test_covariates_of_some_orders_equal_those_of_every_order() -> None:
    """``only`` (the open episodes a score reads: one order per key, summed by joining the
    events to their key's order) gives exactly the rows of the full computation (many
    orders per key: events and orders sorted together)."""
    rng = np.random.default_rng(7)
    rows: list[tuple[str, float, str, str | None, float | None]] = []
    for u in range(40):
        user = f"u{u}"
        for k in range(int(rng.integers(1, 9))):  # up to 8 orders: both sides of JOIN_PROBES
            day = float(rng.integers(0, 80)) + 0.25 * int(rng.integers(0, 4))
            rows.append((user, day, BUY, str(rng.choice(["PODS-30", "PODS-10"])), float(k % 3)))
        for _ in range(int(rng.integers(0, 60))):
            sku = None if rng.random() < 0.8 else "PODS-10"
            rows.append((user, float(rng.integers(0, 90)), USE, sku, 0.5 * int(rng.integers(1, 4))))
        rows += [(user, float(rng.integers(0, 90)), "app_open", None, None) for _ in range(20)]
    events = _events(rows)
    config = load_config()
    skus = {"PODS-30": 30.0, "PODS-10": 10.0}
    orders = purchase_orders(events, config, until=d(85), skus=skus, target="sku")
    assert orders.group_by("user_id", "sku").len()["len"].max() > 4  # the sorted path runs
    every = order_covariates(events, orders, config)
    latest = orders.group_by("user_id", "sku").agg(pl.col("ts").max()).sort("user_id", "sku")
    some = order_covariates(events, orders, config, only=latest)
    expected = every.join(latest, on=["user_id", "sku", "ts"], how="semi", maintain_order="left")
    assert some.height == latest.height
    assert some.equals(expected)
    assert some["units_on_hand"].is_not_null().all() and (some["usage_28d"] > 0).any()


def test_auto_consumables_need_repeat_buyers() -> None:
    config = load_config()
    config.replenishment.min_repeat_buyers = 1
    assert consumable_skus(EVENTS, config, until=d(60)) == {"PODS-30": 30.0}
    config.replenishment.min_repeat_buyers = 2
    assert consumable_skus(EVENTS, config, until=d(60)) == {}
    config.replenishment.consumables = {"NOPE": 1.0}
    with pytest.raises(Exception, match="NOPE"):
        consumable_skus(EVENTS, config, until=d(60))


# -- models ------------------------------------------------------------------------------


def _toy(n: int = 400, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    supply = np.exp(3.3 + 0.4 * rng.normal(size=n))
    t = supply * np.exp(0.3 * x + 0.25 * rng.normal(size=n))
    c = rng.uniform(10, 120, size=n)
    frame = pl.DataFrame({"x": x, "supply_days": supply, "prev_gap_days": supply * 1.1})
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 5 == 0).then(None).otherwise("x").alias("x")
    )
    return frame, np.minimum(t, c), t <= c


def _lifelines_design(model: SurvivalModel, frame: pl.DataFrame) -> object:
    import pandas as pd

    return pd.DataFrame(model.design_.transform(frame), columns=model.covariates_)


@pytest.mark.parametrize("kind", CANDIDATES)
def test_closed_forms_match_lifelines(kind: str) -> None:
    """The vectorised predictions equal lifelines' own on the same design matrix."""
    from lifelines import CoxPHFitter, LogLogisticAFTFitter, LogNormalAFTFitter, WeibullAFTFitter

    frame, t, e = _toy()
    model = SurvivalModel(kind, penalizer=0.01).fit(frame, t, e)  # type: ignore[arg-type]
    x = _lifelines_design(model, frame)
    df = x.copy()  # type: ignore[attr-defined]
    df["T"], df["E"] = t, e
    ref = {
        "weibull_aft": WeibullAFTFitter,
        "lognormal_aft": LogNormalAFTFitter,
        "loglogistic_aft": LogLogisticAFTFitter,
        "cox_ph": CoxPHFitter,
    }[kind](penalizer=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines' fit warnings are not under test here
        ref.fit(df, "T", "E")
    rows = x.iloc[:25]  # type: ignore[attr-defined]
    times = [7.0, 14.0, 30.0, 60.0]
    if kind == "cox_ph":  # lifelines interpolates between event times; compare at them
        times = [float(model.h0_times_[i]) for i in (10, 50, 100, 200)]
    ours = model.predict_survival(frame.head(25), 0.0, times)
    theirs = ref.predict_survival_function(rows, times=times).to_numpy().T
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    if kind != "cox_ph":
        np.testing.assert_allclose(
            model.predict_median(frame.head(25), 0.0),
            np.minimum(ref.predict_median(rows).to_numpy().ravel(), model.max_days_),
            rtol=1e-6,
        )


@pytest.mark.parametrize("kind", CANDIDATES)
def test_conditional_predictions_are_coherent(kind: str) -> None:
    frame, t, e = _toy(seed=1)
    model = SurvivalModel(kind).fit(frame, t, e)  # type: ignore[arg-type]
    times = np.arange(0.0, 91.0, 3.0)
    for elapsed in (0.0, 20.0, 60.0):
        surv = model.predict_survival(frame, elapsed, times)
        assert np.all(np.diff(surv, axis=1) <= 1e-12), "survival curves never increase"
        assert np.all((surv >= 0) & (surv <= 1)) and np.allclose(surv[:, 0], 1.0)
        med = model.predict_median(frame, elapsed)
        assert np.all((med >= 0) & (med <= model.max_days_))
        # the conditional median splits the conditional curve at one half (Cox: a step)
        rows = np.flatnonzero(med < model.max_days_ - 1)[:5]
        assert rows.size
        at = np.array(
            [
                model.predict_survival(frame.slice(int(i), 1), elapsed, [med[i] - 1e-6, med[i]])[0]
                for i in rows
            ]
        )
        if kind == "cox_ph":  # a step function: the first time it reaches one half
            assert np.all((at[:, 0] > 0.5) & (at[:, 1] <= 0.5))
        else:
            np.testing.assert_allclose(at[:, 1], 0.5, atol=1e-6)


@pytest.mark.parametrize("kind", CANDIDATES)
def test_median_within_a_horizon_halves_the_chance_of_reordering_in_it(kind: str) -> None:
    """``horizon=H``: the median of the remaining days among those who reorder within H."""
    frame, t, e = _toy(seed=1)
    model = SurvivalModel(kind).fit(frame, t, e)  # type: ignore[arg-type]
    h = 30.0
    for elapsed in (0.0, 20.0, 60.0):
        med = model.predict_median(frame, elapsed, horizon=h)
        assert np.all((med >= 0) & (med <= h))
        plain = model.predict_median(frame, elapsed)
        assert np.all(med <= plain + 1e-9), "conditioning on a reorder within H only shortens"
        rows = np.flatnonzero((med > 0) & (med < h))[:5]
        assert rows.size
        at = np.array(
            [
                model.predict_survival(frame.slice(int(i), 1), elapsed, [med[i] - 1e-6, med[i], h])[
                    0
                ]
                for i in rows
            ]
        )
        half = (1.0 + at[:, 2]) / 2.0  # S_R(r) = (1 + S_R(H)) / 2 <=> F_R(r) = F_R(H) / 2
        if kind == "cox_ph":  # a step function: the first time it reaches the target
            assert np.all((at[:, 0] > half - 1e-12) & (at[:, 1] <= half + 1e-12))
        else:
            np.testing.assert_allclose(at[:, 1], half, atol=1e-6)
    if kind != "cox_ph":  # AFT: S -> 0, so a horizon far beyond every episode is the median
        np.testing.assert_allclose(
            model.predict_median(frame, 5.0, horizon=1e6),
            model.predict_median(frame, 5.0),
            rtol=1e-6,
        )
    with pytest.raises(ValueError, match="horizon"):
        model.predict_median(frame, 0.0, horizon=0.0)


def test_baselines_ignore_the_horizon() -> None:
    frame = pl.DataFrame({"supply_days": [10.0, None, None], "prev_gap_days": [99.0, 20.0, None]})
    for model in (LastGap(), DepletionRule()):
        model.fit(frame, [5.0, 30.0, 40.0], [True, True, True])
        np.testing.assert_array_equal(
            model.predict_median(frame, 4.0, horizon=7.0), model.predict_median(frame, 4.0)
        )


def test_baselines_by_hand() -> None:
    frame = pl.DataFrame({"supply_days": [10.0, None, None], "prev_gap_days": [99.0, 20.0, None]})
    t, e = np.array([5.0, 30.0, 40.0, 50.0]), np.array([True, True, True, False])
    rule = DepletionRule().fit(frame, [5.0, 30.0, 40.0], [True, True, True])
    assert rule.median_ == 30.0
    assert rule.predict_median(frame, [4.0, 5.0, 40.0]).tolist() == [6.0, 15.0, 0.0]
    gap = LastGap().fit(frame, [5.0, 30.0, 40.0], [True, True, True])
    assert gap.predict_median(frame, 0.0).tolist() == [99.0, 20.0, 30.0]
    assert gap.n_fallback(frame) == 1 and rule.n_fallback(frame) == 2
    assert gap.predict_survival(frame, 0.0, [19.0, 20.0]).tolist() == [[1, 1], [1, 0], [1, 1]]
    assert km_median(t, e) == 30.0


def test_a_cox_fit_started_at_an_earlier_fit_reaches_the_same_optimum() -> None:
    """``start``: Newton's method from the race's earlier fit, the same coefficients."""
    earlier = SurvivalModel("cox_ph").fit(*_toy(seed=1))
    before = earlier.coef_.copy()
    frame, t, e = _toy(seed=2)
    cold = SurvivalModel("cox_ph").fit(frame, t, e)
    warm = SurvivalModel("cox_ph").fit(frame, t, e, start=earlier)
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-6)
    np.testing.assert_allclose(warm.h0_, cold.h0_, rtol=1e-6)
    np.testing.assert_array_equal(earlier.coef_, before)  # lifelines updates its start in place
    # other covariates, or another kind: a cold start, the same fit
    other = SurvivalModel("cox_ph", columns=["x"]).fit(frame, t, e, start=earlier)
    np.testing.assert_allclose(
        other.coef_, SurvivalModel("cox_ph", columns=["x"]).fit(frame, t, e).coef_, atol=1e-9
    )
    aft = SurvivalModel("weibull_aft").fit(frame, t, e, start=earlier)
    np.testing.assert_allclose(
        aft.coef_, SurvivalModel("weibull_aft").fit(frame, t, e).coef_, atol=1e-9
    )


def test_convergence_problems_name_the_covariate() -> None:
    frame, t, e = _toy(seed=3)
    frame = frame.with_columns((pl.col("supply_days") * 2.0 + 1.0).alias("supply_copy"))
    with pytest.raises(ConvergenceProblem, match=r"supply_copy.*collinear"):
        SurvivalModel("cox_ph", penalizer=0.0).fit(frame.fill_null(0.0), t, e)


# -- metrics -----------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    dur = np.array([2.0, 4.0, 6.0, 8.0])
    obs = np.array([True, True, True, True])
    np.testing.assert_allclose(kaplan_meier(dur, obs, [1, 2, 5, 8]), [1.0, 0.75, 0.5, 0.0])
    assert concordance(dur, obs, dur) == 1.0 and concordance(dur, obs, -dur) == 0.0
    s = np.array([0.1, 0.9, 0.9, 0.9])  # P(no reorder by 3)
    # no censoring: the plain Brier score
    assert brier(dur, obs, s, 3.0) == pytest.approx(np.mean((s - [0, 1, 1, 1]) ** 2))
    # censoring before t: the censored row weighs nothing, the rest are reweighted
    cens = np.array([True, False, True, True])
    g = kaplan_meier(dur, ~cens, [5.0])[0]
    expect = (0.1**2 / 1.0 + (1 - 0.9) ** 2 / g + (1 - 0.9) ** 2 / g) / 4
    assert brier(dur, cens, s, 5.0) == pytest.approx(expect)
    surv = np.column_stack([s, s])
    assert integrated_brier(dur, obs, surv, [3.0, 3.5]) == pytest.approx(brier(dur, obs, s, 3.0))
    ece, pred, got = calibration_error(dur, obs, 1 - s, 3.0, n_bins=2)
    np.testing.assert_allclose(pred, [0.1, 0.5])
    np.testing.assert_allclose(got, [0.0, 0.5])
    assert ece == pytest.approx(0.05)
    times = [1.0, 7.0, 14.0, 30.0]
    m = survival_metrics(dur, obs, dur, np.ones((4, 4)), times)
    assert m["mae_days"] == 0.0 and m["n"] == 4.0 and m["concordance"] == 1.0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.1, 100), st.booleans()), min_size=1, max_size=30),
    st.lists(st.floats(0, 120), min_size=1, max_size=10),
)
def test_kaplan_meier_never_increases(rows: list[tuple[float, bool]], times: list[float]) -> None:
    dur = np.array([r[0] for r in rows])
    obs = np.array([r[1] for r in rows])
    q = np.sort(np.array(times))
    s = kaplan_meier(dur, obs, q)
    assert np.all(np.diff(s) <= 1e-12) and np.all((s >= 0) & (s <= 1))
