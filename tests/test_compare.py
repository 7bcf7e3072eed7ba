"""Paired bootstrap intervals and the promotion rule (lapse.modeling.compare).

The weighted metrics are checked against scikit-learn and lifelines on the rows a
resample draws (each row repeated as often as its user was drawn); the rule on
intervals written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index

from lapse.modeling.compare import (
    METRICS,
    Interval,
    Paired,
    decide,
    interval_metrics,
    intervals_from_metrics,
    judge,
    metric_value,
    paired_interval,
    settle,
)
from lapse.modeling.metrics import binary_metrics


def churn_rows(n: int = 2000, seed: int = 0, shift: float = 0.0) -> Paired:
    """Scores rounded to two decimals (many ties); the challenger is ``shift`` noisier."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    champion = np.round(np.clip(0.25 * y + 0.75 * rng.random(n), 0, 1), 2)
    challenger = np.round(np.clip(champion + shift * rng.normal(size=n), 0, 1), 2)
    users = rng.integers(0, n // 2, n)
    codes = np.unique(users, return_inverse=True)[1].astype(np.int64)
    return Paired(y, champion, challenger, codes)


def survival_rows(n: int = 400, seed: int = 1) -> Paired:
    rng = np.random.default_rng(seed)
    days = np.round(rng.exponential(20, n))
    observed = rng.random(n) < 0.7
    champion = np.round(days * 0.5 + rng.exponential(10, n))
    challenger = np.round(days * 0.3 + rng.exponential(10, n))
    return Paired(days, champion, challenger, (np.arange(n) // 2).astype(np.int64), observed)


def test_weighted_metrics_equal_the_libraries_on_drawn_rows() -> None:
    rows = churn_rows()
    rng = np.random.default_rng(7)
    draws = rng.multinomial(rows.users.max() + 1, np.full(rows.users.max() + 1, 1 / 1000), 3)
    for counts in draws:
        w = counts[rows.users].astype(np.float64)
        idx = np.repeat(np.arange(rows.truth.size), counts[rows.users])
        expected = binary_metrics(rows.truth[idx], rows.champion[idx])
        for name, metric in METRICS["churn"].items():
            got = metric(rows.truth, None, rows.champion, w[None, :])[0]
            assert got == pytest.approx(expected[name], abs=1e-12), name

    surv = survival_rows()
    assert surv.observed is not None
    for counts in rng.multinomial(200, np.full(200, 1 / 200), 3):
        w = counts[surv.users].astype(np.float64)
        idx = np.repeat(np.arange(surv.truth.size), counts[surv.users])
        c = METRICS["replenishment"]["concordance"](
            surv.truth, surv.observed, surv.champion, w[None, :]
        )
        assert c[0] == pytest.approx(
            concordance_index(surv.truth[idx], surv.champion[idx], surv.observed[idx]), abs=1e-12
        )
    seen = surv.observed
    assert metric_value("replenishment", "mae_days", surv, "challenger") == pytest.approx(
        np.mean(np.abs(surv.challenger[seen] - surv.truth[seen]))
    )


def test_paired_interval_is_seeded_and_covers_the_difference() -> None:
    same = churn_rows()
    twin = Paired(same.truth, same.champion, same.champion.copy(), same.users)
    assert paired_interval("churn", "roc_auc", twin, resamples=200) == (0.0, 0.0)

    worse = churn_rows(shift=0.15)
    low, high = paired_interval("churn", "roc_auc", worse, resamples=300)
    assert (low, high) == paired_interval("churn", "roc_auc", worse, resamples=300)
    assert (low, high) != paired_interval("churn", "roc_auc", worse, resamples=300, seed=1)
    delta = metric_value("churn", "roc_auc", worse, "challenger") - metric_value(
        "churn", "roc_auc", worse, "champion"
    )
    assert low < delta < high < 0, "noise added to the champion's scores costs AUC"
    # a lower-is-better metric: the noisier challenger's Brier score is higher
    b_low, b_high = paired_interval("churn", "brier", worse, resamples=300)
    assert 0 < b_low < b_high


def iv(delta: float, low: float, high: float, key: str = "churn.roc_auc") -> Interval:
    return Interval(key=key, delta=delta, low=low, high=high, users=1000, cutoffs=2)


@pytest.mark.parametrize(
    ("interval", "verdict"),
    [
        (iv(-0.004, -0.0049, -0.003), "promote"),  # worse side within the tolerance
        (iv(0.01, 0.002, 0.02), "promote"),
        (iv(-0.004, -0.009, 0.0), "inconclusive"),  # the 0.004-worse challenger
        (iv(-0.02, -0.03, -0.006), "refuse"),  # all of it worse than the tolerance
        (iv(0.002, 0.0, 0.004, "churn.brier"), "promote"),  # lower is better: +0.004 is worse
        (iv(0.008, 0.006, 0.01, "churn.brier"), "refuse"),
        (iv(float("nan"), float("nan"), float("nan")), "inconclusive"),
    ],
)
def test_judge(interval: Interval, verdict: str) -> None:
    assert judge(interval, 0.005) == verdict


def test_decide_says_which_rule_decided_and_how_to_settle() -> None:
    refuse = decide(
        {"churn.roc_auc": iv(-0.02, -0.03, -0.011), "x.concordance": iv(0, -0.01, 0.01, "x.c")},
        0.005,
    )
    assert refuse.verdict == "refuse"
    assert refuse.rule.startswith(
        "refuse: the whole 95% interval of churn.roc_auc (-0.0300 to -0.0110) is worse"
    )
    assert refuse.lines[0] == "churn.roc_auc -0.0200 (95% interval -0.0300 to -0.0110): refuse"

    open_ = decide({"churn.roc_auc": iv(-0.002, -0.011, 0.007)}, 0.005)
    assert open_.verdict == "inconclusive"
    # to promote, the worse bound (0.009 below the point) must shrink to 0.003: 9 times the rows
    assert "about 8,000 more users, or 16 more cutoffs at this size" in open_.rule

    ok = decide({"churn.roc_auc": iv(0.001, -0.004, 0.006)}, 0.005)
    assert ok.verdict == "promote" and "churn.roc_auc -0.0040" in ok.rule
    assert "no sample size" in settle(iv(-0.005, -0.01, 0.0), 0.005)
    with pytest.raises(ValueError, match="no primary metric"):
        decide({}, 0.005)


def test_intervals_round_trip_through_flat_metrics() -> None:
    intervals = {"churn.roc_auc": iv(-0.01, -0.02, 0.0)}
    flat = interval_metrics(intervals)
    assert flat["low.churn.roc_auc"] == -0.02 and flat["users.churn.roc_auc"] == 1000.0
    assert intervals_from_metrics({**flat, "delta.churn.brier": 0.1, "n_cutoffs": 2}) == intervals
