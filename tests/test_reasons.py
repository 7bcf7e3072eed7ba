"""Reason codes from the shipped model: the words on fixed rows, and on real small bundles
of each shipped kind that every reason's number is the record's own and that moving its
factor to the population median lowers the bundle's churn risk."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lapse.config import LapseConfig, Roles, load_config
from lapse.datasets import generate, write
from lapse.events import read_events
from lapse.modeling import ChurnBundle, LightGBMChurn
from lapse.modeling._treeshap import MIN_ROWS
from lapse.modeling.hazard import LightGBMHazard
from lapse.modeling.race import fit_calibrator
from lapse.modeling.reasons import P_ALIVE, RECENCY, Reason, Words, describe, explain
from lapse.modeling.rules import recency_days
from lapse.train.churn import build_frame, train

# a transaction table: orders only, so BG/NBD and recency count orders
ORDERS = load_config().model_copy(
    update={"roles": Roles(purchase=["order_completed"]), "milestones": []}
)
APP = load_config()  # usage: app_open, device_used -> "sessions"; BG/NBD counts any activity


# -- the words, on fixed rows ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "row", "text"),
    [
        (
            "usage_count_14d",
            {"usage_count_14d": 2, "usage_count_28d": 13},
            "only 2 sessions in the last 14 days, down from 11 the 14 days before",
        ),
        ("usage_count_7d", {"usage_count_7d": 0}, "no sessions in the last 7 days"),
        (
            "usage_count_7d",
            {"usage_count_7d": 1, "usage_count_14d": 1},
            "only 1 session in the last 7 days",
        ),
        (
            "error_count_7d",
            {"error_count_7d": 4, "error_count_14d": 5},
            "4 errors in the last 7 days, up from 1 the 7 days before",
        ),
        ("days_since_last_usage", {"days_since_last_usage": 19}, "no session for 19 days"),
        ("days_since_last_usage", {"days_since_last_usage": 1}, "no session for 1 day"),
        ("days_since_last_event", {"days_since_last_event": None}, "no activity yet"),
        ("days_since_last_error", {"days_since_last_error": 3}, "an error 3 days ago"),
        ("active_days_28d", {"active_days_28d": 3}, "active on only 3 of the last 28 days"),
        ("revenue_28d", {"revenue_28d": 1240.4}, "spent only 1,240 in the last 28 days"),
        ("revenue_28d", {"revenue_28d": 4.5}, "spent only 4.50 in the last 28 days"),
        (
            "decay_ratio_14d",
            {"decay_ratio_14d": 0.2, "usage_count_14d": 2, "usage_count_28d": 12},
            "only 2 sessions in the last 14 days, down from 10 the 14 days before",
        ),
        (
            "dropping_ratio_7d",
            {"dropping_ratio_7d": 0.25, "usage_count_7d": 2, "usage_count_28d": 26},
            "only 2 sessions in the last 7 days, vs about 8 a week in the 3 weeks before",
        ),
        (
            "dropping_ratio_7d",
            {"dropping_ratio_7d": 0.0, "usage_count_7d": 0, "usage_count_28d": 2},
            "no sessions in the last 7 days, vs 2 in the 3 weeks before",
        ),
        (
            "usage_slope_8w",
            {"usage_slope_8w": -2.5},
            "sessions down by about 2.5 a week, week after week, over the last 8 weeks",
        ),
        (
            "recency_over_mean_gap",
            {
                "recency_over_mean_gap": 3.1,
                "mean_active_gap_days": 4.0,
                "days_since_last_event": 12,
            },
            "no activity for 12 days; usually active every 4 days",
        ),
        ("aha_reached", {"aha_reached": False}, "has not reached the aha moment yet"),
        ("setup_incomplete", {"setup_incomplete": True}, "setup started but not completed"),
        (
            "tenure_days_capped",
            {"tenure_days_capped": 12, "tenure_days": 12},
            "a new customer, first seen 12 days ago",
        ),
        (
            "tenure_days_capped",
            {"tenure_days_capped": 90, "tenure_days": 400},
            "customer for 400 days",
        ),
        ("mean_order_gap_days", {"mean_order_gap_days": 44.6}, "usually orders only every 45 days"),
        (
            "events_per_active_day",
            {"events_per_active_day": 2.46},
            "only about 2.5 actions a day when active",
        ),
        ("plan", {"plan": "basic"}, "plan: basic"),
    ],
)
def test_feature_templates(name: str, row: dict[str, object], text: str) -> None:
    assert describe(name, row, APP) == text


@pytest.mark.parametrize(
    ("name", "row"),
    [
        # directions that are no reason for risk: the words would read backwards
        ("recency_over_mean_gap", {"recency_over_mean_gap": 0.04, "mean_active_gap_days": 5.0}),
        ("decay_ratio_14d", {"decay_ratio_14d": 1.5, "usage_count_14d": 6, "usage_count_28d": 10}),
        (
            "dropping_ratio_7d",
            {"dropping_ratio_7d": 2.0, "usage_count_7d": 6, "usage_count_28d": 15},
        ),
        ("usage_slope_8w", {"usage_slope_8w": 1.2}),
        ("aha_reached", {"aha_reached": True}),
        ("setup_incomplete", {"setup_incomplete": False}),
        ("error_count_7d", {"error_count_7d": 0}),
        ("mean_order_gap_days", {"mean_order_gap_days": None}),
    ],
)
def test_no_words_for_values_that_are_no_risk(name: str, row: dict[str, object]) -> None:
    assert describe(name, row, APP) is None


def test_role_words_follow_the_config() -> None:
    def usage(events: list[str]) -> tuple[str, str]:
        return Words.of(LapseConfig(roles=Roles(usage=events))).nouns["usage"]

    assert usage(["brew"]) == ("brew", "brews")
    assert usage(["page_view"]) == ("page view", "page views")
    assert usage(["Search"]) == ("search", "searches")
    assert usage(["device_used"]) == ("session", "sessions")  # a past tense is no noun
    assert usage(["app_open", "device_used"]) == ("session", "sessions")
    assert usage([]) == ("session", "sessions")
    brews = LapseConfig(roles=Roles(usage=["brew"]), labels={"activity_roles": ["usage"]})
    assert describe("usage_count_7d", {"usage_count_7d": 0}, brews) == "no brews in the last 7 days"
    assert (
        describe("days_since_last_usage", {"days_since_last_usage": 5}, brews)
        == "no brew for 5 days"
    )
    assert describe("score_recency", {RECENCY: 5.0}, brews) == "no brew for 5 days"
    assert describe("score_recency", {RECENCY: 5.0}, APP) == "no activity for 5 days"
    assert describe("score_recency", {RECENCY: float("inf")}, ORDERS) == "no order yet"
    # days since any event, when the last event was an order, in the order's word
    since = {"days_since_last_event": 40.0, "days_since_last_purchase": 40.0}
    assert describe("days_since_last_event", since, ORDERS) == "no order for 40 days"
    since["days_since_last_purchase"] = 52.0  # a return since: not an order
    assert describe("days_since_last_event", since, ORDERS) == "no activity for 40 days"
    assert describe("days_since_last_event", since | {"days_since_last_purchase": 40.0}, APP) == (
        "no activity for 40 days"  # BG/NBD counts any activity: no single word for it
    )
    assert Words.of(ORDERS).activity == "purchase" and Words.of(APP).activity == "any"


def _btyd(x: float, t: float, age: float, **extra: float) -> dict[str, float]:
    return {"btyd_frequency": x, "btyd_recency_days": t, "btyd_age_days": age, **extra}


def test_bgnbd_templates_read_in_the_right_direction() -> None:
    # overdue: 96 days against a usual 31 (3 gaps over 93 days), P(alive) 0.18
    overdue = _btyd(3, 93, 190, **{RECENCY: 96.0, P_ALIVE: 0.18})
    assert (
        describe("score_bgnbd", overdue, ORDERS)
        == "no order for 96 days; usually orders every 31 days; about a 20% chance they are still active"
    )
    assert (
        describe("score_bgnbd", {**overdue, P_ALIVE: 0.004}, ORDERS)
        == "no order for 96 days; usually orders every 31 days; under a 1% chance they are still active"
    )
    # early (20 days, usually every 60): never "longer than usual"; told as infrequent
    early = _btyd(2, 120, 141, **{RECENCY: 20.0, P_ALIVE: 0.9})
    assert describe("score_bgnbd", early, ORDERS) == "only 3 orders in 141 days"
    single = _btyd(0, 0, 40, **{RECENCY: 39.0})
    assert describe("score_bgnbd", single, ORDERS) == "a single order so far, 39 days ago"
    assert describe("score_bgnbd", {"btyd_frequency": None}, ORDERS) == "no order yet"
    assert describe("score_bgnbd", _btyd(9, 27, 30, **{RECENCY: 2.0}), APP) == (
        "active on only 10 of the last 30 days"
    )


# -- real bundles of each shipped kind -------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    bundle: ChurnBundle
    rows: pl.DataFrame  # the population scored at the end of the data
    labelled: pl.DataFrame  # the calibration cutoff's rows with churned


def _trained(root: Path, events_path: Path, config: LapseConfig) -> Trained:
    config.models.stacked_lightgbm = True
    config.replenishment.enabled = False
    result = train(events_path, config, out_dir=root / "report", models_dir=root / "models")
    bundle = ChurnBundle.load(result.bundle_path)
    events = read_events(events_path, config)
    cal = result.calibration_cutoff
    labelled, _ = build_frame(events, [cal], config, data_end=result.data_end)
    return Trained(bundle, bundle.prepare(events, result.data_end), labelled)


@pytest.fixture(scope="module")
def orders(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A transaction-only log: the synthetic users' orders, nothing else."""
    root = tmp_path_factory.mktemp("orders")
    events = generate(n_users=2000, n_days=240, seed=4).events
    path = root / "orders.parquet"
    events.filter(pl.col("event") == "order_completed").write_parquet(path)
    config = ORDERS.model_copy(deep=True)
    config.labels.eligibility_days = 90  # orders are weeks apart
    return _trained(root, path, config)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("app")
    files = write(generate(n_users=1500, n_days=200, seed=3), root / "data")
    return _trained(root, files["events"], load_config())


def _shipping(trained: Trained, kind: str) -> ChurnBundle:
    """The trained bundle as if ``kind`` had won the race (calibrated as training does)."""
    b, lab = trained.bundle, trained.labelled
    y = lab["churned"].cast(pl.Float64).to_numpy()
    calibrator = fit_calibrator(kind, b.scorer.score(kind, lab), y, b.config)
    return replace(b, selected=kind, calibrator=calibrator)


def _tree_model(bundle: ChurnBundle) -> LightGBMChurn | LightGBMHazard:
    """The shipped LightGBM of ``bundle`` (plain, stacked or hazard)."""
    scorer = bundle.scorer
    model = {"lightgbm_stacked": scorer.stacked, "lightgbm_hazard": scorer.hazard}.get(
        bundle.selected, scorer.lightgbm
    )
    assert model is not None
    return model


def _moved(bundle: ChurnBundle, row: pl.DataFrame, factor: str) -> float:
    """The bundle's churn risk of ``row`` with ``factor`` at the population's median."""
    scorer = bundle.scorer
    if bundle.selected == "bgnbd":
        m = scorer.bgnbd.typical_
        if factor == "frequency":
            moved = row.with_columns(pl.lit(m["frequency"]).alias("btyd_frequency"))
        elif row["btyd_frequency"].item() > 0:  # the last active day moved later
            moved = row.with_columns(
                (pl.col("btyd_age_days") - m["days_since"]).alias("btyd_recency_days")
            )
        else:  # a single active day so far: a younger customer
            moved = row.with_columns(pl.lit(m["days_since"]).alias("btyd_age_days"))
        return float(bundle.predict_proba(moved)[0])
    model = _tree_model(bundle)
    j = model.feature_names_.index(factor)
    median = model.typical_[j]
    if factor in model.categories_:
        value: object = model.categories_[factor][int(median)]
    elif np.isnan(median):
        value = None
    else:
        value = float(median)
    if factor in ("score_bgnbd", "score_recency"):  # the stacked model's own inputs
        inputs = scorer.with_scores(row).with_columns(pl.lit(value).alias(factor))
        assert model.predict_proba(scorer.with_scores(row))[0] == pytest.approx(
            scorer.score("lightgbm_stacked", row)[0]
        )
        return float(bundle.calibrator.predict(model.predict_proba(inputs))[0])
    dtype = row.schema[factor]
    return float(bundle.predict_proba(row.with_columns(pl.lit(value).cast(dtype).alias(factor)))[0])


def _names_own_value(bundle: ChurnBundle, row: pl.DataFrame, reason: Reason) -> bool | None:
    """Whether the reason's first number is the record's own value as said (zero is "no",
    never is "yet"); None for factors whose words show other numbers first."""
    f, text = reason.factor, reason.text
    first = re.search(r"\d[\d,]*", text)
    said = None if first is None else first[0]
    if f in ("days_since", "score_recency") or (
        f == "score_bgnbd" and not text.startswith(("only", "active on only"))
    ):
        days = recency_days(row, bundle.config)[0]
        return text.endswith("yet") if np.isinf(days) else said == f"{days:,.0f}"
    if f in ("frequency", "score_bgnbd"):
        return said == f"{row['btyd_frequency'].item() + 1:,.0f}"
    if re.match(r"^(days_since_last_(?!error)|\w+_count_\d+d$|active_days_)", f):
        v = row[f].item()
        if v is None:
            return text.endswith("yet")
        return text.startswith(("no ", "not ")) if v == 0 else said == f"{v:,.0f}"
    if f in (
        "mean_active_gap_days",
        "mean_order_gap_days",
        "std_order_gap_days",
        "tenure_days_capped",
    ):
        v = row["tenure_days" if f == "tenure_days_capped" else f].item()
        n = math.floor(v + 0.5)
        # "every day", "first seen in the last day": no number
        low = v < 1 if f == "tenure_days_capped" else n <= 1
        return said is None if low else said == f"{n:,}"
    if f.startswith("revenue_"):
        v = row[f].item()
        return said == (f"{math.floor(v + 0.5):,}" if v >= 10 else f"{v:.2f}")
    return None


def _check_high_risk(bundle: ChurnBundle, rows: pl.DataFrame, n: int = 25) -> int:
    risk = bundle.predict_proba(rows)
    high = rows[np.argsort(-risk)[:n]]
    found = explain(bundle.scorer, bundle.selected, high)
    assert sum(map(len, found)) >= n, "high-risk records get reasons"
    assert bundle.reasons(high)["reasons"].to_list() == [[r.text for r in rs] for rs in found]
    checked = 0
    for i, reasons in enumerate(found):
        row = high[i]
        base = float(bundle.predict_proba(row)[0])
        assert len(reasons) <= 3 and len({r.text for r in reasons}) == len(reasons)
        for reason in reasons:
            assert _moved(bundle, row, reason.factor) < base, (reason, base)
            own = _names_own_value(bundle, row, reason)
            if own is not None:
                assert own, reason
                checked += 1
    return checked


@pytest.mark.parametrize("kind", ["bgnbd", "lightgbm_stacked", "lightgbm", "lightgbm_hazard"])
def test_transaction_log_reasons_from_the_shipped_model(orders: Trained, kind: str) -> None:
    bundle = _shipping(orders, kind)
    assert _check_high_risk(bundle, orders.rows) > 0
    found = explain(bundle.scorer, kind, orders.rows)
    texts = [r.text for rs in found for r in rs]
    assert texts and not any("session" in t or "score" in t for t in texts)
    if kind == "bgnbd":
        overdue = r"no order for \d+ days; usually orders every \d+ days.*"
        assert any(re.fullmatch(overdue, t) for t in texts)
    else:  # spend is a reason only when below the population's: never high spend
        model = _tree_model(bundle)
        names = model.feature_names_
        for i, reasons in enumerate(found):
            for r in reasons:
                if r.factor.startswith("revenue_"):
                    median = model.typical_[names.index(r.factor)]
                    assert orders.rows[r.factor][i] < median, r


@pytest.mark.parametrize("kind", ["lightgbm", "lightgbm_stacked", "lightgbm_hazard", "bgnbd"])
def test_app_reasons_from_the_shipped_model(app: Trained, kind: str) -> None:
    bundle = _shipping(app, kind)
    assert _check_high_risk(bundle, app.rows) > 0


def test_hazard_reasons_on_many_rows_equal_predicting_the_moved_rows(
    app: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From MIN_ROWS rows a move is summed over the trees that split on the input (both
    halves, each through its sigmoid): the same reasons as predicting the moved rows."""
    bundle = _shipping(app, "lightgbm_hazard")
    big = pl.concat([app.rows] * -(-MIN_ROWS // app.rows.height))
    model = _tree_model(bundle)
    assert isinstance(model, LightGBMHazard) and model.moves(model.encode(big.head(3)))
    fast = explain(bundle.scorer, "lightgbm_hazard", big)
    drivers = model.drivers
    monkeypatch.setattr(model, "drivers", lambda x, moves: (drivers(x, moves=False)[0], None))
    assert explain(bundle.scorer, "lightgbm_hazard", big) == fast
    assert sum(map(len, fast)) > 0


def test_every_reason_raises_risk_for_everyone_explained(app: Trained) -> None:
    """Not only the riskiest: any record's reasons, moved to the median, lower its risk."""
    bundle = _shipping(app, "lightgbm")
    sample = app.rows.sample(n=60, seed=1)
    base = bundle.predict_proba(sample)
    for i, reasons in enumerate(explain(bundle.scorer, "lightgbm", sample)):
        for reason in reasons:
            assert _moved(bundle, sample[i], reason.factor) < base[i], reason


def test_recency_and_rules_reasons(app: Trained) -> None:
    rows = app.rows
    for kind in ("recency", "rules"):
        bundle = _shipping(app, kind)
        high = rows[np.argsort(-bundle.predict_proba(rows))[:20]]
        found = explain(bundle.scorer, kind, high, top=5)
        assert all(found), kind
        if kind == "recency":
            assert all(len(r) == 1 and r[0].text.startswith("no activity for ") for r in found)
            continue
        fired = {r.factor for rs in found for r in rs}
        assert fired & {"usage_decay", "dropping_activity", "friction_alert", "activation_nudge"}
        # the tie-break: days since the last usage, in the usage word
        since = [r.text for rs in found for r in rs if r.factor == "days_since"]
        assert since and all(re.fullmatch(r"no session (for \d+ days?|yet)", t) for t in since)
    assert explain(app.bundle.scorer, "lightgbm", rows.head(3), top=0) == [[], [], []]
    with pytest.raises(ValueError, match="no reasons for model"):
        explain(app.bundle.scorer, "oracle", rows.head(1))


def test_the_cutoff_is_kept_as_a_key(app: Trained) -> None:
    out = app.bundle.reasons(app.rows.head(4))
    assert out.columns == ["user_id", "cutoff", "reasons"]
    assert isinstance(out["cutoff"][0], datetime)


def test_bundles_from_before_the_medians_still_explain(app: Trained) -> None:
    """Models pickled before they kept ``typical_`` use the explained rows' own medians."""
    bundle = _shipping(app, "lightgbm")
    old = copy.deepcopy(bundle)
    del old.scorer.lightgbm.typical_, old.scorer.bgnbd.typical_
    rows = app.rows.head(200)
    for kind in ("lightgbm", "bgnbd", "recency"):
        found = explain(old.scorer, kind, rows)
        assert any(found), kind
