"""Models, metrics, calibration, rules and reasons: real fits on small data, no mocks."""

from __future__ import annotations

import pickle
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest
from sklearn.base import clone

from lapse.config import load_config
from lapse.datasets import generate
from lapse.features.episodes_covariates import order_covariates, purchase_orders
from lapse.labels.episodes import consumable_skus, episodes, open_episodes
from lapse.modeling import (
    BGNBD,
    Calibrator,
    FitWarning,
    LightGBMChurn,
    binary_metrics,
    describe,
    model_columns,
    reasons,
    rules_score,
    select,
    triggers,
)
from lapse.modeling._treeshap import MIN_ROWS
from lapse.modeling.bgnbd import btyd_arrays
from lapse.modeling.bundle import ChurnBundle
from lapse.modeling.hazard import HALF, LightGBMHazard, half_rows
from lapse.modeling.metrics import expected_calibration_error, top_decile
from lapse.modeling.race import COMPLEXITY, fit_calibrator, fit_scorer
from lapse.modeling.rules import RulesScore
from lapse.modeling.survival import BASELINES, CANDIDATES, DepletionRule, LastGap, SurvivalModel
from lapse.modeling.survival_metrics import HORIZONS
from lapse.train.churn import build_frame

TRUE = {"r": 0.24, "alpha": 4.41, "a": 0.79, "b": 2.43}


def simulate_bgnbd(
    n: int, seed: int, horizon: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Purchase histories from the BG/NBD process; also whether each buys in ``(T, T+horizon]``."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(TRUE["r"], 1 / TRUE["alpha"], n)
    p = rng.beta(TRUE["a"], TRUE["b"], n)
    age = rng.uniform(27, 39, n)  # weeks, like the CDNOW cohort the parameters come from
    k = rng.geometric(p)  # the repeat transaction after which the customer drops out
    arrivals = rng.poisson(lam * age)
    x = np.minimum(k, arrivals)
    t_x = np.where(x > 0, age * rng.beta(np.maximum(x, 1), arrivals - x + 1), 0.0)
    alive = k > arrivals
    buys = alive & (rng.poisson(lam * horizon) > 0)
    return x.astype(float), t_x, age, buys


def test_bgnbd_recovers_known_parameters() -> None:
    x, t_x, age, _ = simulate_bgnbd(40_000, seed=1)
    start = time.perf_counter()
    model = BGNBD().fit(x, t_x, age)
    assert time.perf_counter() - start < 10
    assert model.converged_ and not model.fallback_
    # tolerance: r and alpha within 10%, a and b within 20% (observed errors at this
    # size are about 4% and 12% over seeds 0-4; a and b are the weakly identified pair)
    for name, tol in (("r", 0.10), ("alpha", 0.10), ("a", 0.20), ("b", 0.20)):
        assert model.params_[name] == pytest.approx(TRUE[name], rel=tol), name


def test_bgnbd_probabilities_match_simulation() -> None:
    x, t_x, age, buys = simulate_bgnbd(40_000, seed=2, horizon=8.0)
    model = BGNBD().set_params(penalizer=0.0)
    assert isinstance(model, BGNBD)
    model.params_ = dict(TRUE)  # score with the true parameters: the formulas alone
    p_any = model.p_any_purchase(8.0, x, t_x, age)
    assert p_any.mean() == pytest.approx(buys.mean(), abs=0.01)
    # grouped by predicted decile too: the formula is calibrated, not just on average
    order = np.argsort(p_any)
    for idx in np.array_split(order, 5):
        assert p_any[idx].mean() == pytest.approx(buys[idx].mean(), abs=0.02)
    alive = model.p_alive(x, t_x, age)
    assert np.all((alive > 0) & (alive <= 1))
    assert np.all(alive[x == 0] == 1.0)
    expected = model.expected_purchases(8.0, x, t_x, age)
    assert np.all(expected >= 0) and np.all(np.isfinite(expected))


def test_bgnbd_fit_failure_falls_back_with_a_warning() -> None:
    x = np.array([0.0, 0.0, 1.0])
    with pytest.warns(FitWarning):
        # a single impossible summary cannot be fitted: the likelihood is never finite
        m = BGNBD(max_iter=1).fit(x, np.array([0.0, 0.0, np.inf]), np.array([1.0, 1.0, np.inf]))
    assert m.fallback_ or not m.converged_
    assert np.all(np.isfinite(m.p_any_purchase(28.0, [0.0], [0.0], [10.0])))


def test_bgnbd_rejects_bad_summaries() -> None:
    with pytest.raises(ValueError, match="recency <= age"):
        BGNBD().fit([1.0], [5.0], [2.0])
    with pytest.raises(RuntimeError, match="not fitted"):
        BGNBD().p_alive([1.0], [1.0], [2.0])


def test_metrics_on_a_literal_example() -> None:
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    p = np.linspace(0.95, 0.0, 20)
    m = binary_metrics(y, p)
    # top decile = 2 rows (0.95, 0.90): one positive of three -> rate 0.5, base 0.15
    assert m["top_decile_lift"] == pytest.approx(0.5 / 0.15)
    assert m["top_decile_capture"] == pytest.approx(1 / 3)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # ROC-AUC by counting: pairs (positive, negative) ranked correctly
    pos, neg = p[y == 1], p[y == 0]
    assert m["roc_auc"] == pytest.approx(np.mean(pos[:, None] > neg[None, :]))
    assert set(m) == {
        "roc_auc",
        "pr_auc",
        "brier",
        "log_loss",
        "ece",
        "top_decile_lift",
        "top_decile_capture",
    }


def test_ece_uses_equal_frequency_bins() -> None:
    # 10 bins of 2 rows: bin i predicts 0.5 with labels (0, 1) -> perfectly calibrated
    y = np.tile([0.0, 1.0], 10)
    assert expected_calibration_error(y, np.full(20, 0.5)) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.full(20, 0.8)) == pytest.approx(0.3)
    lift, capture = top_decile(np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), np.arange(10.0)[::-1])
    assert (lift, capture) == (10.0, 1.0)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_fixes_a_miscalibrated_score(method: str) -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(0.01, 0.6, 20_000)
    y = (rng.random(true.size) < true).astype(float)
    skewed = true**0.5  # overconfident
    cal = Calibrator(method).fit(skewed[:10_000], y[:10_000])  # type: ignore[arg-type]
    after = cal.predict(skewed[10_000:])
    assert expected_calibration_error(y[10_000:], skewed[10_000:]) > 0.1
    assert expected_calibration_error(y[10_000:], after) < 0.02
    if method == "platt":  # strictly monotone: the ranking is untouched
        assert np.array_equal(
            np.argsort(after, kind="stable"), np.argsort(skewed[10_000:], kind="stable")
        )
    assert clone(cal).get_params() == cal.get_params()


def test_selection_prefers_the_simpler_model_on_ties() -> None:
    assert select({"recency": 0.80, "lightgbm": 0.85, "bgnbd": 0.84})[0] == "lightgbm"
    winner, why = select({"recency": 0.8500, "rules": 0.70, "lightgbm": 0.8505})
    assert winner == "recency"
    assert "tie" in why


# -- rules --------------------------------------------------------------------------


def _features(**cols: list[object]) -> pl.DataFrame:
    base: dict[str, list[object]] = {
        "user_id": ["a", "b", "c"],
        "days_since_first_purchase": [10, 3, None],
        "aha_reached": [False, False, True],
        "milestone_brews_crossed_7d": [False, True, False],
        "milestone_app_opens_crossed_7d": [False, False, False],
        "error_count_7d": [0, 5, 1],
        "setup_started_count_7d": [1, 0, 0],
        "setup_incomplete": [False, False, True],
        "decay_ratio_14d": [0.5, None, 0.9],
        "dropping_ratio_7d": [0.4, 0.5, None],
        "days_of_supply_left": [2.0, None, 10.0],
        "days_to_depletion": [2.0, None, 10.0],  # the record's estimate, a score-time column
        "days_since_last_usage": [3, 1, None],
        "days_since_last_purchase": [10, 3, None],
    }
    base.update(cols)
    return pl.DataFrame(base)


def test_triggers_fire_as_documented() -> None:
    config = load_config()
    out = triggers(_features(), config)
    assert out["triggers"].to_list() == [
        # a: purchased 10 >= 7 days ago without aha; decay 0.5 <= 0.5; dropping 0.4 < 0.5;
        #    supply 2 <= 3 days
        ["activation_nudge", "usage_decay", "dropping_activity", "replenishment_due"],
        # b: milestone; 5 errors >= 3; dropping 0.5 is not below 0.5
        ["milestone", "friction_alert"],
        [],  # c: setup incomplete but not started in the last 7 days; nulls never fire
    ]
    # rules score: churn triggers fired + days since last usage / (days + 1)
    assert rules_score(_features(), config).tolist() == pytest.approx(
        [3 + 3 / 4, 1 + 1 / 2, 1 - 1e-9]
    )


def test_triggers_without_roles_never_fire() -> None:
    config = load_config()
    config = config.model_copy(
        update={"roles": config.roles.model_copy(update={"aha": [], "usage": [], "error": []})}
    )
    out = triggers(_features(), config)
    for t in ("activation_nudge", "usage_decay", "dropping_activity"):
        assert not out[t].any()
    # no usage role: the tie-break uses days since the last purchase
    assert rules_score(_features(), config)[0] == pytest.approx(10 / 11)


# -- LightGBM and reasons ----------------------------------------------------------------


def _churn_frame(n: int, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    usage_14 = rng.poisson(6, n)
    usage_28 = usage_14 + rng.poisson(6, n)
    recency = rng.integers(0, 20, n)
    plan = rng.choice(["basic", "pro"], n)
    logit = -2.0 + 0.25 * recency - 0.3 * usage_14 + 0.8 * (plan == "basic")
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    frame = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(n)],
            "cutoff": [datetime(2024, 1, 1 + i % 3, tzinfo=UTC) for i in range(n)],
            "usage_count_14d": usage_14,
            "usage_count_28d": usage_28,
            "days_since_last_usage": recency,
            "tenure_days": rng.integers(0, 400, n),
            "plan": plan,
            "churned": y.astype(bool),
        }
    )
    return frame, y


def test_lightgbm_learns_and_explains() -> None:
    """(Determinism, clone and pickling: :func:`test_model_contract`.)"""
    frame, y = _churn_frame(3000, 0)
    groups = frame["cutoff"].dt.epoch("s").to_numpy()
    a = LightGBMChurn(random_state=3, n_jobs=2).fit(frame, y, groups=groups)
    assert a.feature_names_ == [
        "usage_count_14d",
        "usage_count_28d",
        "days_since_last_usage",
        "plan",
    ]
    assert "tenure_days" not in model_columns(frame)  # grows by construction
    test, y_test = _churn_frame(2000, 1)
    assert binary_metrics(y_test, a.predict_proba(test))["roc_auc"] > 0.75
    contrib = a.contributions(test.head(5))
    # SHAP values add up to the raw log-odds
    p = a.predict_proba(test.head(5))
    assert contrib.sum(axis=1) == pytest.approx(np.log(p / (1 - p)), abs=1e-6)
    assert set(a.get_params()) >= {"learning_rate", "random_state", "search"}
    imp = a.importance(test.head(100))
    assert imp.columns == ["feature", "gain", "mean_abs_shap"]


def _hazard_frame(n_users: int, seed: int) -> pl.DataFrame:
    """Weekly cutoffs; the days to the next activity are exponential with a mean that grows
    with the days since the last one (null when none came within 60 days)."""
    rng = np.random.default_rng(seed)
    n = n_users * 8
    recency = rng.integers(0, 40, n)
    wait = rng.exponential(3.0 + 1.5 * recency)
    return pl.DataFrame(
        {
            "user_id": [f"u{i % n_users}" for i in range(n)],
            "cutoff": [
                datetime(2024, 1, 1, tzinfo=UTC) + timedelta(weeks=i // n_users) for i in range(n)
            ],
            "days_since_last_usage": recency,
            "usage_count_28d": rng.poisson(4, n),
            "churned": wait >= 28,
            "days_to_next": np.where(wait < 60, wait, np.nan),
        }
    ).with_columns(pl.col("days_to_next").fill_nan(None))


def test_hazard_halves_train_only_on_windows_that_end_by_the_label_end() -> None:
    day = [datetime(2024, 1, d, tzinfo=UTC) for d in (1, 15, 22)]
    frame = pl.DataFrame(
        {
            "user_id": ["a", "b", "c", "a", "a"],
            "cutoff": [day[0], day[0], day[0], day[1], day[2]],
            "days_to_next": [3.0, 20.0, None, 16.0, 1.0],
        }
    )
    # horizon 28: halves [0, 14) and [14, 28); label end Jan 29
    rows = half_rows(frame, 28, datetime(2024, 1, 29, tzinfo=UTC))
    got = rows.select("user_id", pl.col("cutoff").dt.day(), HALF, "_quiet").rows()
    assert got == [
        ("a", 1, 0, False),  # bought on day 3: not quiet, and no longer at risk in the second
        ("b", 1, 0, True),
        ("c", 1, 0, True),
        ("a", 15, 0, True),  # Jan 15 + 14 days ends by Jan 29; its second half does not
        ("b", 1, 1, False),
        ("c", 1, 1, True),
    ]  # Jan 22's first half ends after Jan 29: not a row


def test_hazard_lightgbm_learns_and_never_reads_past_the_label_end() -> None:
    frame = _hazard_frame(400, 0)
    end = datetime(2024, 2, 26, tzinfo=UTC)  # the last cutoff (Feb 19) fits no half
    model = LightGBMHazard(horizon_days=28, random_state=1, n_jobs=2).fit(frame, label_end=end)
    assert model.feature_names_ == ["days_since_last_usage", "usage_count_28d"]
    test = _hazard_frame(400, 1)
    p = model.predict_proba(test)
    assert binary_metrics(test["churned"].to_numpy(), p)["roc_auc"] > 0.75
    assert np.array_equal(clone(model).fit(frame, label_end=end).predict_proba(test), p)
    # outcomes the label end hides: beyond the first half at Feb 5 and Feb 12, all at Feb 19
    c = pl.col("cutoff")
    hidden = (c >= datetime(2024, 2, 5, tzinfo=UTC)) & (pl.col("days_to_next") >= 14)
    blind = frame.with_columns(
        pl.when(c == datetime(2024, 2, 19, tzinfo=UTC))
        .then(0.5)
        .when(hidden)
        .then(20.0)
        .otherwise(pl.col("days_to_next"))
        .alias("days_to_next")
    )
    assert not blind.equals(frame)
    again = LightGBMHazard(horizon_days=28, random_state=1, n_jobs=2).fit(blind, label_end=end)
    assert np.array_equal(again.predict_proba(test), p)
    # the summed SHAP values and the last column add up to log P(churn)
    x = model.encode(test.head(5))
    assert model.contributions_encoded(x).sum(axis=1) == pytest.approx(np.log(p[:5]))


def test_hazard_moves_equal_the_change_of_the_predicted_log_p() -> None:
    frame = _hazard_frame(400, 0)
    end = datetime(2024, 2, 26, tzinfo=UTC)
    model = LightGBMHazard(horizon_days=28, random_state=1, n_jobs=2).fit(frame, label_end=end)
    x = model.encode(_hazard_frame(300, 1))
    moves = model.moves(x)
    assert moves is not None
    rng = np.random.default_rng(0)
    at = np.arange(len(x))
    cols = rng.integers(0, x.shape[1], len(x))
    values = rng.permutation(x[:, cols[0]])  # other rows' values, both sides of a split
    moved = x.copy()
    moved[at, cols] = values
    want = model.predict_encoded(moved, raw_score=True) - model.predict_encoded(x, raw_score=True)
    assert np.abs(moves.delta(at, cols, values) - want).max() <= 1e-9
    assert np.abs(want).max() > 0.01


def test_lightgbm_split_on_an_input_gives_parts_that_add_up_to_the_model() -> None:
    """``split_on``: the trees that split on an input, and the others, each a model of its
    own whose raw scores and SHAP values add up to the whole model's; a part may hold no
    tree (it predicts 0)."""
    frame, y = _churn_frame(3000, 0)
    frame = frame.with_columns(pl.lit(1.0).alias("constant"))  # no tree can split on it
    model = LightGBMChurn(random_state=3, n_jobs=2).fit(frame, y)
    names = model.feature_names_
    on, off = model.split_on(names.index("days_since_last_usage"))
    assert on.n_trees_ > 0 and off.n_trees_ > 0
    assert on.n_trees_ + off.n_trees_ == model.booster_.num_trees()
    x = model.encode(_churn_frame(500, 1)[0].with_columns(pl.lit(1.0).alias("constant")))
    raw = model.predict_encoded(x, raw_score=True)
    parts = on.predict_encoded(x, raw_score=True) + off.predict_encoded(x, raw_score=True)
    assert np.abs(parts - raw).max() <= 1e-12
    shap = on.contributions_encoded(x) + off.contributions_encoded(x)
    assert np.abs(shap - model.contributions_encoded(x)).max() <= 1e-9
    assert not off.contributions_encoded(x)[:, names.index("days_since_last_usage")].any()
    none, every = model.split_on(names.index("constant"))
    assert none.n_trees_ == 0 and not none.predict_encoded(x, raw_score=True).any()
    assert np.array_equal(every.predict_encoded(x, raw_score=True), raw)


def test_hazard_shared_trees_once_equal_the_whole_model_on_each_half() -> None:
    """The trees that never split on the half predict and are explained once for both
    halves: the same P(churn), SHAP values and moves as running the whole per-half model
    on each half (how the hazard model computed them before, issue #26)."""
    frame = _hazard_frame(400, 0)
    end = datetime(2024, 2, 26, tzinfo=UTC)
    model = LightGBMHazard(horizon_days=28, random_state=1, n_jobs=2).fit(frame, label_end=end)
    inner = model.model_
    halved, shared = inner.split_on(len(inner.feature_names_) - 1)
    assert halved.n_trees_ > 0 and shared.n_trees_ > 0  # both kinds of tree exist
    test = _hazard_frame(700, 1)
    x = model.encode(test)
    assert len(x) >= MIN_ROWS  # TreeSHAP's cells and the moves' tables
    halves = [np.column_stack([x, np.full(len(x), float(k))]) for k in (0, 1)]
    p = inner.predict_encoded(halves[0]) * inner.predict_encoded(halves[1])
    assert np.abs(model.predict_proba(test) - p).max() <= 1e-12
    summed = inner.contributions_encoded(halves[0]) + inner.contributions_encoded(halves[1])
    shap, moves = model.drivers(x, moves=True)
    assert np.abs(shap[:, :-1] - summed[:, :-2]).max() <= 1e-9
    assert np.abs(shap.sum(axis=1) - np.log(p)).max() <= 1e-9
    assert np.array_equal(model.contributions_encoded(x), shap)
    small = model.contributions_encoded(x[:50])  # below MIN_ROWS: plain pred_contrib
    assert np.abs(small[:, :-1] - summed[:50, :-2]).max() <= 1e-9
    # a driver moved: the change of log P(churn), both halves predicted in full
    assert moves is not None
    rng = np.random.default_rng(0)
    at = np.arange(len(x))
    cols = rng.integers(0, x.shape[1], len(x))
    values = rng.permutation(x[:, 0])
    moved = x.copy()
    moved[at, cols] = values
    after = [np.column_stack([moved, h[:, -1]]) for h in halves]
    want = np.log(inner.predict_encoded(after[0]) * inner.predict_encoded(after[1]) / p)
    assert np.abs(moves.delta(at, cols, values) - want).max() <= 1e-9
    assert np.abs(want).max() > 0.01
    # the parts are built on first use and not pickled
    assert "_parts_cache" in model.__dict__
    again = pickle.loads(pickle.dumps(model))
    assert "_parts_cache" not in again.__dict__
    assert np.array_equal(again.predict_proba(test), model.predict_proba(test))


def test_lightgbm_search_runs_and_keeps_input_intact() -> None:
    frame, y = _churn_frame(1500, 2)
    before = frame.clone()
    m = LightGBMChurn(search=True, n_search=2, max_trees=200).fit(
        frame, y, groups=frame["cutoff"].dt.epoch("s").to_numpy()
    )
    assert len(m.search_results_) == 3
    assert frame.equals(before)
    with pytest.raises(ValueError, match="both classes"):
        LightGBMChurn().fit(frame, np.zeros(frame.height))


def test_lightgbm_refit_reuses_trees_and_tuning_without_a_holdout() -> None:
    """The shipped model's refit: a fitted model's tree count and tuned parameters, no search."""
    frame, y = _churn_frame(1500, 2)
    groups = frame["cutoff"].dt.epoch("s").to_numpy()
    race = LightGBMChurn(search=True, n_search=2, max_trees=200).fit(frame, y, groups=groups)
    refit = LightGBMChurn(n_trees=race.n_trees_, tuned=race.best_params_).fit(
        frame, y, groups=groups
    )
    assert refit.booster_.num_trees() == race.n_trees_ and refit.search_results_ == []
    assert refit.best_params_ == race.best_params_
    # the race's final fit is this one: all rows, the same parameters and trees
    assert np.array_equal(refit.predict_proba(frame), race.predict_proba(frame))


def test_reasons_name_risk_raising_features_in_words() -> None:
    from lapse.modeling import RaceScorer

    frame, y = _churn_frame(3000, 4)
    model = LightGBMChurn(random_state=0).fit(frame, y)
    scorer = RaceScorer(config=load_config(), lightgbm=model, bgnbd=BGNBD())
    risky = pl.DataFrame(
        {
            "user_id": ["x"],
            "cutoff": [datetime(2024, 1, 1, tzinfo=UTC)],
            "usage_count_14d": [0],
            "usage_count_28d": [9],
            "days_since_last_usage": [19],
            "tenure_days": [30],
            "plan": ["basic"],
        }
    )
    out = reasons(scorer, "lightgbm", risky)
    texts = out["reasons"].item().to_list()
    assert 1 <= len(texts) <= 3
    assert "no session for 19 days" in texts
    assert "no sessions in the last 14 days, down from 9 the 14 days before" in texts


def test_describe_renders_common_features() -> None:
    assert (
        describe("days_since_last_purchase", {"days_since_last_purchase": None}) == "no order yet"
    )
    assert (
        describe("active_days_28d", {"active_days_28d": 3})
        == "active on only 3 of the last 28 days"
    )
    assert describe("aha_reached", {"aha_reached": False}) == "has not reached the aha moment yet"
    assert describe("error_count_7d", {"error_count_7d": 4}) == "4 errors in the last 7 days"
    assert describe("plan", {"plan": "basic"}) == "plan: basic"


def test_rfm_summary_sees_only_activity_before_a_mid_day_cutoff() -> None:
    from lapse.modeling.bgnbd import rfm_summary

    ts = [datetime(2024, 1, 1, 9, tzinfo=UTC), datetime(2024, 1, 4, 15, tzinfo=UTC)]
    events = pl.LazyFrame({"user_id": ["a", "a"], "ts": ts, "event": ["app_open"] * 2})
    events = events.with_columns(pl.col("ts").dt.cast_time_unit("us"))
    noon = datetime(2024, 1, 4, 12, tzinfo=UTC)
    row = rfm_summary(events, [noon], load_config()).row(0, named=True)
    # the 15:00 visit on the cutoff's day is after the cutoff: no repeat day yet
    assert row["btyd_frequency"] == 0.0 and row["btyd_recency_days"] == 0.0
    assert row["btyd_age_days"] == 3.5  # from the first active day (midnight) to noon


def test_rfm_summary_at_one_cutoff_equals_its_rows_among_several() -> None:
    """One cutoff (bitmasks of active days) and several (active days grouped once) are two
    implementations of the same rows: active days 64+ days apart, before 1970, same day."""
    from lapse.modeling.bgnbd import rfm_summary

    rng = np.random.default_rng(3)
    base = datetime(1969, 11, 1, tzinfo=UTC)
    n = 3_000
    events = pl.LazyFrame(
        {
            "user_id": [f"u{i}" for i in rng.integers(0, 60, n)],
            "ts": [base + timedelta(hours=float(h)) for h in rng.exponential(24 * 90, n)],
            "event": rng.choice(["app_open", "order_completed", "signup"], n).tolist(),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    cutoffs = [datetime(1970, 1, 1, tzinfo=UTC), datetime(1970, 4, 20, 13, 30, tzinfo=UTC)]
    several = rfm_summary(events, cutoffs, load_config())
    for cutoff in cutoffs:
        one = rfm_summary(events, [cutoff], load_config())
        assert one.height > 20
        assert one.equals(several.filter(pl.col("cutoff") == cutoff))


# -- the model contract --------------------------------------------------------------------
#
# Eight models can ship: the churn race's recency, rules, BG/NBD, LightGBM, stacked and
# hazard LightGBM (race.COMPLEXITY), and replenishment's survival regression (the winner of
# survival.CANDIDATES: Weibull, log-normal, log-logistic AFT or Cox) with the depletion rule
# beside it. The contract runs over every name the two races fit, so a new candidate joins
# it; the last_gap baseline is raced but never shipped, and is the depletion rule's fallback.

START = datetime(2026, 1, 1, tzinfo=UTC)  # generate()'s first day
AS_OF = START + timedelta(days=120)
SOLO = "solo"  # a customer whose whole history is one order, two days before AS_OF
# the covariates the baselines read plus usage: the fits stay quick (all of them: seconds)
SURVIVAL_COVARIATES = ["prev_gap_days", "order_units", "supply_days", "usage_28d"]
Predictions = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def contract_events() -> pl.LazyFrame:
    events = generate(n_users=500, n_days=140, seed=0).events
    solo = pl.DataFrame(
        {
            "user_id": [SOLO],
            "ts": [AS_OF - timedelta(days=2)],
            "event": ["order_completed"],
            "sku": ["PODS-30"],
            "quantity": [1.0],
            "revenue": [20.0],
        },
        schema=events.schema,
    )
    return pl.concat([events, solo]).lazy()


class ChurnContract:
    """The churn race's candidates, fitted by the race's own code, shipped in a bundle."""

    SLOT: ClassVar[dict[str, str]] = {"lightgbm_stacked": "stacked", "lightgbm_hazard": "hazard"}

    def __init__(self, events: pl.LazyFrame) -> None:
        self.config = load_config()
        cutoffs = [START + timedelta(days=d) for d in (63, 70, 77, 84)]
        frame, rfm = build_frame(events, cutoffs, self.config, data_end=START + timedelta(days=140))
        self.train = frame.filter(pl.col("cutoff") < cutoffs[-1])
        self.validation = frame.filter(pl.col("cutoff") == cutoffs[-1])
        self.btyd_fit = rfm.filter(pl.col("cutoff") == cutoffs[-1])
        self.label_end = cutoffs[-1]
        self.y = self.train["churned"].cast(pl.Float64).to_numpy()
        self.groups = self.train["cutoff"].dt.epoch("s").to_numpy()
        before = self.train.clone()
        self.scorer = fit_scorer(
            self.train, self.btyd_fit, self.config, recent=self.train, label_end=self.label_end
        )
        assert self.scorer.names == list(COMPLEXITY)
        self.rows = self.ship("recency", None).prepare(events, AS_OF)
        self.inputs = [(self.train, before), (self.rows, self.rows.clone())]
        self.bounds = {"churn_risk": 1.0}

    def fit(self, name: str) -> Any:
        """The estimator behind ``name`` (recency: none, it learns nothing; rules: the
        RulesScore wrapper of the rules_score function the race calls)."""
        if name == "recency":
            return None
        if name == "rules":
            return RulesScore().fit(self.train, self.config)
        return getattr(self.scorer, self.SLOT.get(name, name))

    def refit(self, name: str, model: Any) -> Any:
        if name == "rules":
            return model.fit(self.train, self.config)
        if name == "bgnbd":
            return model.fit(*btyd_arrays(self.btyd_fit))
        if name == "lightgbm_hazard":
            return model.fit(self.train, label_end=self.label_end)
        frame = self.scorer.with_scores(self.train) if name == "lightgbm_stacked" else self.train
        return model.fit(frame, self.y, groups=self.groups)

    def ship(self, name: str, model: Any) -> ChurnBundle:
        """A bundle shipping ``name`` with ``model`` in the race's scorer, calibrated on
        the validation cutoff as the race does."""
        learned = name not in ("recency", "rules")  # the scorer holds no model of theirs
        scorer = (
            replace(self.scorer, **{self.SLOT.get(name, name): model}) if learned else self.scorer
        )
        y_val = self.validation["churned"].cast(pl.Float64).to_numpy()
        calibrator = fit_calibrator(name, scorer.score(name, self.validation), y_val, self.config)
        return ChurnBundle(
            name="contract",
            config=self.config,
            feature_schema={},
            training_end=AS_OF,
            selected=name,
            scorer=scorer,
            calibrator=calibrator,
            score_reference=np.linspace(0.0, 1.0, 11),
            metrics={},
            cutoffs={},
            created_at=AS_OF,
        )

    def predict(self, shipped: ChurnBundle) -> Predictions:
        return {"churn_risk": shipped.predict_proba(self.rows)}


class ReplenishmentContract:
    """Replenishment's models on real episodes, predicting the episodes open at AS_OF."""

    def __init__(self, events: pl.LazyFrame) -> None:
        self.config = load_config()
        cutoff = START + timedelta(days=100)
        skus = consumable_skus(events, self.config, until=cutoff)

        def with_covariates(episode_rows: pl.DataFrame, until: datetime) -> pl.DataFrame:
            orders = purchase_orders(events, self.config, until=until, skus=skus, target="sku")
            covariates = order_covariates(events, orders, self.config).rename({"ts": "start"})
            return episode_rows.join(covariates, on=["user_id", "sku", "start"], how="left")

        self.train = with_covariates(
            episodes(events, self.config, cutoff=cutoff, skus=skus, target="sku"), cutoff
        )
        self.rows = with_covariates(
            open_episodes(events, self.config, as_of=AS_OF, skus=skus, target="sku"), AS_OF
        )
        self.inputs = [(self.train, self.train.clone()), (self.rows, self.rows.clone())]
        self.bounds = {"median_days_to_next_order": np.inf} | {
            f"p_reorder_{h}d": 1.0 for h in HORIZONS
        }

    def fit(self, name: str) -> Any:
        return self.refit(name, self._new(name))

    def _new(self, name: str) -> Any:
        if name == "depletion_rule":
            return DepletionRule()
        if name == "last_gap":
            return LastGap()
        return SurvivalModel(name, self.config.replenishment.penalizer, SURVIVAL_COVARIATES)  # type: ignore[arg-type]

    def refit(self, name: str, model: Any) -> Any:
        return model.fit(self.train, self.train["duration_days"], self.train["observed"])

    def ship(self, name: str, model: Any) -> Any:
        return model  # pickled as it is into the bundle's extras

    def predict(self, shipped: Any) -> Predictions:
        elapsed = self.rows["elapsed_days"].to_numpy()
        horizon = self.config.replenishment.follow_up_days
        surv = shipped.predict_survival(self.rows, elapsed, HORIZONS)
        return {
            "median_days_to_next_order": shipped.predict_median(self.rows, elapsed, horizon)
        } | {f"p_reorder_{h}d": 1.0 - surv[:, k] for k, h in enumerate(HORIZONS)}


@pytest.fixture(scope="module")
def churn_contract(contract_events: pl.LazyFrame) -> ChurnContract:
    return ChurnContract(contract_events)


@pytest.fixture(scope="module")
def replenishment_contract(contract_events: pl.LazyFrame) -> ReplenishmentContract:
    return ReplenishmentContract(contract_events)


def _assert_same(a: Predictions, b: Predictions) -> None:
    assert a.keys() == b.keys()
    for col in a:
        np.testing.assert_array_equal(a[col], b[col], err_msg=col)


@pytest.mark.parametrize("name", [*COMPLEXITY, *CANDIDATES, *BASELINES])
def test_model_contract(name: str, request: pytest.FixtureRequest) -> None:
    """Every model the races fit: fitted on real-shaped data, shipped, predicted, pickled."""
    family = request.getfixturevalue(
        "churn_contract" if name in COMPLEXITY else "replenishment_contract"
    )
    model = family.fit(name)
    shipped = family.ship(name, model)
    out = family.predict(shipped)

    # one finite prediction per row and in range, the customer with one order included
    assert SOLO in family.rows["user_id"].to_list()
    assert out.keys() == family.bounds.keys()
    for col, values in out.items():
        assert values.shape == (family.rows.height,), col
        assert np.all(np.isfinite(values)), col
        assert np.all((values >= 0) & (values <= family.bounds[col])), col
    if "p_reorder_7d" in out:  # more days, more reorders
        assert np.all(out["p_reorder_7d"] <= out["p_reorder_14d"])
        assert np.all(out["p_reorder_14d"] <= out["p_reorder_30d"])

    # what ships pickles and predicts the same after the round trip
    _assert_same(family.predict(pickle.loads(pickle.dumps(shipped))), out)

    # the scikit-learn contract: params round-trip through clone, fit returns self,
    # learned state ends in "_", and a refit with the same seed ships the same predictions
    if model is not None:
        twin = clone(model)
        assert twin.get_params() == model.get_params()
        assert family.refit(name, twin) is twin
        learned = [k for k in vars(twin) if k not in twin.get_params()]
        assert learned and all(k.endswith("_") for k in learned), learned
        _assert_same(family.predict(family.ship(name, twin)), out)

    # neither fitting nor predicting touched the frames they were given
    for frame, before in family.inputs:
        assert frame.equals(before)
