"""The replenishment race end to end on the package's synthetic data (seeds fixed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pytest

from lapse.config import load_config
from lapse.datasets import generate, write
from lapse.labels import data_span
from lapse.modeling.survival import CANDIDATES
from lapse.modeling.survival_metrics import METRIC_NAMES
from lapse.train.replenishment import (
    NotEnoughEpisodes,
    ReplenishmentModel,
    ReplenishmentResult,
    consumables_table,
    evaluate_model,
    run_replenishment,
)

MODELS = {*CANDIDATES, "depletion_rule", "last_gap"}


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep")
    write(generate(n_users=5000, n_days=240, seed=0), out)
    return out


@pytest.fixture(scope="module")
def race(syn: Path, tmp_path_factory: pytest.TempPathFactory) -> ReplenishmentResult:
    events = pl.read_parquet(syn / "events.parquet").lazy()
    _, end = data_span(events)
    report = tmp_path_factory.mktemp("report")
    return run_replenishment(events, load_config(), data_end=end, out_dir=report, truth_dir=syn)


def test_metrics_section_has_the_pinned_shape(race: ReplenishmentResult) -> None:
    section = json.loads(json.dumps(race.metrics))  # JSON-serialisable as written
    assert set(section["models"]) == MODELS
    for name in MODELS:
        assert set(section["models"][name]) == set(METRIC_NAMES)
    n = {section["models"][m]["n"] for m in MODELS}
    assert len(n) == 1 and n.pop() > 100, "every model is scored on the same episodes"
    assert section["selected"] in CANDIDATES and section["target"] == "sku"
    assert set(section["consumables"]) == {"PODS-30", "PODS-60"}
    ranked = race.consumables
    assert set(ranked["sku"]) == {"PODS-30", "PODS-60"}
    assert ranked["repeat_buyers"].is_sorted(descending=True)
    assert dict(zip(ranked["sku"], ranked["units_per_pack"], strict=True)) == {
        "PODS-30": 30.0,
        "PODS-60": 60.0,
    }
    assert set(section["true_depletion"]) >= {"n", *MODELS}
    for plot in race.plots.values():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(race.plots) == {"replenishment_km", "replenishment_calibration"}


def test_quality_bar_concordance(race: ReplenishmentResult) -> None:
    """The issue's bar, first half: measured (seed 0, 5000 users) selected C = 0.82."""
    models = race.metrics["models"]
    assert models[race.selected]["concordance"] >= 0.70


def test_quality_bar_mae_beats_last_gap(race: ReplenishmentResult) -> None:
    """The issue's bar, second half, on the same episodes.

    The survival point estimate is the median time to reorder among the episodes
    that reorder within ``follow_up_days`` (the window the metrics observe).
    Measured (seed 0): selected lognormal_aft 8.90 days vs last_gap 23.61 at 5000
    users, 8.49 vs 23.54 at 20k users (on an earlier generator the plain median,
    which prices in the customers who never reorder, gave 21.6 and 21.9).
    """
    models = race.metrics["models"]
    assert models[race.selected]["mae_days"] < models["last_gap"]["mae_days"]


def test_open_episode_predictions(race: ReplenishmentResult, syn: Path) -> None:
    events = pl.read_parquet(syn / "events.parquet").lazy()
    _, end = data_span(events)
    out = race.model.predict_open(events, end)
    assert out.height > 0
    assert out.select("user_id", "sku").is_duplicated().sum() == 0
    p = out.select("p_reorder_7d", "p_reorder_14d", "p_reorder_30d").to_numpy()
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p, axis=1) >= -1e-12)
    assert (out["days_since_order"] <= load_config().replenishment.max_open_days).all()
    lead = timedelta(days=load_config().replenishment.lead_time_days)
    assert (out["prompt_date"] >= end).all()
    late = out.filter(pl.col("depletion_date") - lead > end)
    assert (late["prompt_date"] == late["depletion_date"] - lead).all()
    # point in time: events on or after the date change nothing
    cut = end - timedelta(days=20)
    early = race.model.predict_open(events, cut)
    again = race.model.predict_open(events.filter(pl.col("ts") < cut), cut)
    assert early.equals(again)


def test_plain_transaction_table_gets_time_to_next_order(tmp_path: Path) -> None:
    """Purchases only (no telemetry, no SKU repeat structure): target "any" still works."""
    data = generate(n_users=1500, n_days=240, seed=5)
    orders = data.events.filter(pl.col("event") == "order_completed").select(
        "user_id", "ts", pl.lit("purchase").alias("event"), "revenue"
    )
    config = load_config()
    config.roles.purchase = ["purchase"]
    for role in ("usage", "consumption", "aha", "error", "setup_started", "setup_completed"):
        setattr(config.roles, role, [])
    events = orders.lazy()
    _, end = data_span(events)
    result = run_replenishment(events, config, data_end=end)
    assert result.metrics["target"] == "any"
    assert any("target: any" in n for n in result.notes)
    assert set(result.metrics["models"]) == MODELS
    assert np.isfinite(result.metrics["models"][result.selected]["concordance"])
    assert result.model.predict_open(events, end)["sku"].unique().to_list() == ["*"]


# -- review metrics of a shipped model (by hand) --------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def d(days: float) -> datetime:
    return T0 + timedelta(days=days)


class Fixed:
    """A predictor whose median remaining days per user is given (step survival curve)."""

    def __init__(self, medians: dict[str, float], default: float = 7.0) -> None:
        self.medians, self.default = medians, default

    def predict_median(self, frame: pl.DataFrame, elapsed: Any, horizon: Any = None) -> np.ndarray:
        return np.array([self.medians.get(u, self.default) for u in frame["user_id"]], float)

    def predict_survival(self, frame: pl.DataFrame, elapsed: Any, times: Sequence[float]) -> Any:
        return (np.asarray(times)[None, :] < self.predict_median(frame, elapsed)[:, None]) * 1.0


# cutoff day 40, follow-up 31 days (to day 71); the data runs to day 95
REVIEW_EVENTS = pl.LazyFrame(
    {
        "user_id": ["a", "a", "a", "b", "c", "c", "c", "e", "e", "m", "z"],
        "ts": [d(x) for x in (0, 20, 45, 3, 10, 30, 50, 35, 90, 20, 95)],
        "event": ["order_completed"] * 10 + ["device_used"],
        "sku": ["PODS-30"] * 9 + ["MUG", None],
        "quantity": [1.0] * 10 + [None],
    },
    schema_overrides={"ts": pl.Datetime("us", "UTC")},
)
# open at day 40: a (elapsed 20, reorders after 5 days), b (37, never), c (10, after 10),
# e (5, reorders on day 90: censored at the window's end, 31); the mug is not a consumable
TRUTH = {"a": 5.0, "b": 31.0, "c": 10.0, "e": 31.0}


def _shipped(predictor: Fixed) -> ReplenishmentModel:
    config = load_config()
    config.replenishment.follow_up_days = 31
    return ReplenishmentModel(
        selected="fixed",
        model=cast(Any, predictor),
        rule=cast(Any, None),
        target="sku",
        skus={"PODS-30": 30.0},
        config=config,
        trained_until=d(40),
    )


def test_evaluate_model_scores_open_episodes_over_the_follow_up() -> None:
    model = _shipped(Fixed({}, default=7.0))
    out = evaluate_model(model, REVIEW_EVENTS, d(40), model.config)
    assert out["n"] == 4 and out["follow_up_days"] == 31.0
    assert out["mae_days"] == pytest.approx((2.0 + 3.0) / 2)  # |7 - 5|, |7 - 10| (observed only)
    assert out["concordance"] == pytest.approx(0.5)  # constant predictions
    assert set(METRIC_NAMES) <= set(out)

    oracle = _shipped(Fixed(TRUTH))
    best = evaluate_model(oracle, REVIEW_EVENTS, d(40), oracle.config)
    assert best["concordance"] == pytest.approx(1.0) and best["mae_days"] == pytest.approx(0.0)
    # censored at the window's end: what happens after day 71 changes nothing
    late = REVIEW_EVENTS.filter(pl.col("ts") < d(71))
    assert evaluate_model(oracle, late, d(40), oracle.config, data_end=d(96)) == best

    # the data stops before the window: censored there, and the window shrinks
    short = evaluate_model(model, REVIEW_EVENTS, d(40), model.config, data_end=d(48))
    assert short["follow_up_days"] == 8.0 and short["n"] == 4
    assert short["mae_days"] == pytest.approx(2.0)  # only a reorders within 8 days
    with pytest.raises(NotEnoughEpisodes, match="no follow-up"):
        evaluate_model(model, REVIEW_EVENTS, d(96), model.config)


@pytest.mark.parametrize("identified", [30, 42])
def test_review_outcomes_follow_a_visitor_who_identifies(identified: int) -> None:
    """``a`` orders anonymously (``anon-a``) until it identifies on day ``identified``: the
    episode open at day 40 has the id of the links before it, its reorder on day 45
    (as ``a``) follows the person either way; without the links it is never seen."""
    from lapse.events.identity import LINK_SCHEMA
    from lapse.train.replenishment import predict_outcomes

    model = _shipped(Fixed({}, default=7.0))
    anonymous = pl.col("user_id").eq("a") & pl.col("ts").lt(d(identified))
    events = REVIEW_EVENTS.with_columns(
        pl.when(anonymous).then(pl.lit("anon-a")).otherwise("user_id").alias("user_id")
    )
    links = pl.DataFrame({"id": ["anon-a"], "user_id": ["a"], "ts": [d(identified)]}, LINK_SCHEMA)
    got = predict_outcomes(model, events, d(40), model.config, links=links)
    want = predict_outcomes(model, REVIEW_EVENTS, d(40), model.config)
    known = "a" if identified < 40 else "anon-a"
    assert got.equals(want.with_columns(pl.col("user_id").replace("a", known)))
    assert evaluate_model(model, events, d(40), model.config, links=links) == evaluate_model(
        model, REVIEW_EVENTS, d(40), model.config
    )
    unlinked = predict_outcomes(model, events, d(40), model.config)
    assert unlinked.filter(pl.col("user_id") == "anon-a")["observed"].to_list() == [False]


# -- orders from an order key ----------------------------------------------------------------


def test_an_order_key_makes_orders_of_order_ids_not_days() -> None:
    from lapse.features.episodes_covariates import purchase_orders
    from lapse.labels.episodes import consumable_skus, episodes

    ev = pl.LazyFrame(
        {
            "user_id": ["a"] * 6 + ["b"] * 2 + ["c"] * 2,
            "ts": [d(x) for x in (0, 0, 0.5, 10, 10, 20.5, 3, 3, 1, 1.25)],
            "event": ["order_completed"] * 10,
            "sku": ["P", "P", "P", "P", "Q", "P", "P", "P", "R", "R"],
            "quantity": [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            # a: two orders on day 0, one holding P and Q, a row without an id;
            # b: two orders at the same instant (one order: no episode lasts 0 days)
            "order_id": ["1", "1", "2", "3", "3", None, "7", "8", "9", "10"],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    config = load_config()
    config.replenishment.min_repeat_buyers = 1
    any_ = purchase_orders(ev, config, until=d(30), skus=None, target="any")
    a = any_.filter(pl.col("user_id") == "a")
    assert a["ts"].to_list() == [d(0), d(0.5), d(10), d(20.5)]
    assert a["units"].to_list() == [3.0, 1.0, 2.0, 1.0]
    assert a["lines"].to_list() == [2, 1, 2, 1]
    assert any_.filter(pl.col("user_id") == "b")["lines"].to_list() == [2]
    durations = episodes(ev, config, cutoff=d(30), skus=None, target="any").filter(
        pl.col("user_id") == "a"
    )
    assert durations["duration_days"].to_list() == [0.5, 9.5, 10.5, 9.5]
    # an order of a SKU is an order holding it; c ordered R twice on one day
    assert consumable_skus(ev, config, until=d(30)) == {"P": 1.0, "R": 1.0}
    by_day = ev.drop("order_id")
    assert consumable_skus(by_day, config, until=d(30)) == {"P": 1.0}
    days = purchase_orders(by_day, config, until=d(30), skus=None, target="any")
    assert days.filter(pl.col("user_id") == "a")["lines"].to_list() == [3, 2, 1]


def test_the_report_ranks_consumables_in_a_short_table() -> None:
    ranked = pl.DataFrame(
        {
            "sku": [f"S{i:02d}" for i in range(13)],
            "repeat_buyers": [130 - 10 * i for i in range(13)],
            "units_per_pack": [1.0] * 12 + [30.0],
        }
    )
    lines = consumables_table(ranked)
    rows = [line for line in lines if line.startswith("| S0") or line.startswith("| S1")]
    assert rows[0] == "| S00 | 130 | 1 |" and len(rows) == 10
    assert lines[-1] == "and 3 more." and "13 in all" in lines[1]
    assert consumables_table(ranked.head(3))[-1] == "| S02 | 110 | 1 |"
    assert consumables_table(ranked.clear()) == []
