"""Cell-wise TreeSHAP equals LightGBM's pred_contrib: random data, missing types, the race."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.modeling import _treeshap as ts
from lapse.modeling.lgbm import LightGBMChurn
from lapse.modeling.reasons import reasons

TOL = 1e-9
#: values that sit on LightGBM's special cases: NaN, zeros (signed, tiny, at the edge), negatives
SPECIAL = [np.nan, 0.0, -0.0, 1e-36, -1e-36, ts.ZERO_THRESHOLD, -ts.ZERO_THRESHOLD, -1.0, 1.0]


def _x(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cols = [
        rng.normal(size=n),
        rng.poisson(1.0, n).astype(float),  # many exact zeros
        -rng.exponential(2.0, n),  # negative values
        rng.integers(0, 6, n).astype(float),  # categorical codes
        rng.normal(size=n).round(1),
    ]
    x = np.column_stack(cols)
    for j in (0, 1, 2, 4):  # missing values and special values sprinkled in
        x[rng.random(n) < 0.15, j] = np.nan
        idx = rng.random(n) < 0.1
        x[idx, j] = rng.choice(SPECIAL, int(idx.sum()))
    x[rng.random(n) < 0.1, 3] = np.nan
    return x


def _y(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.nan_to_num(x, nan=0.7)
    logit = z[:, 0] - 0.8 * z[:, 1] + 0.3 * z[:, 2] + (z[:, 3] % 2) - np.isnan(x[:, 4])
    return (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(float)


def _booster(**params: Any) -> lgb.Booster:
    x = _x(3000, 0)
    data = lgb.Dataset(x, _y(x, 1), categorical_feature=[3], params={"verbosity": -1})
    base = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 10, "num_threads": 1}
    base["verbosity"] = -1
    return lgb.train({**base, **params, "seed": 0}, data, num_boost_round=30)


def _top(contrib: np.ndarray) -> np.ndarray:
    return np.argsort(-contrib[:, :-1], axis=1, kind="stable")[:, :3]


@pytest.fixture(scope="module", params=["default", "zero_as_missing", "no_missing"])
def booster(request: pytest.FixtureRequest) -> lgb.Booster:
    params = {
        "default": {},
        "zero_as_missing": {"zero_as_missing": True},
        "no_missing": {"use_missing": False},
    }[request.param]
    return _booster(**params)


def test_cells_equal_pred_contrib_on_random_data(booster: lgb.Booster) -> None:
    tables = ts.build_tables(booster)
    assert tables is not None and 3 in tables.categorical
    x = _x(4000, 7)
    ref = booster.predict(x, pred_contrib=True)
    # small chunks and no minimum: the cell path itself, over several chunks
    fast = ts.contributions(booster, x, tables, num_threads=2, min_rows=0, chunk_rows=1500)
    assert np.abs(fast - ref).max() <= TOL
    assert np.array_equal(_top(fast), _top(ref))
    # the cells are far fewer than the rows: that is the point
    codes, radix = ts._global_codes(x, tables)
    cells = [len(np.unique(ts._tree_key(t, codes, radix, len(x))[0])) for t in tables.trees]
    assert np.mean(cells) < 0.5 * len(x)


@pytest.mark.parametrize("size", [50, 3 * 10**12])  # a dense table of the range, a hash
def test_factorize_gives_each_key_one_cell(size: int) -> None:
    key = np.random.default_rng(5).integers(0, size, 1000)
    reps, cell = ts._factorize(key, size)
    assert np.array_equal(key[reps][cell], key)  # each row's cell has its key
    assert len(reps) == len(np.unique(key))  # one cell per distinct key


def test_fallbacks_stay_exact(booster: lgb.Booster, monkeypatch: pytest.MonkeyPatch) -> None:
    tables = ts.build_tables(booster)
    x = _x(600, 8)
    ref = booster.predict(x, pred_contrib=True)

    def boom(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("the cell path was taken")

    with monkeypatch.context() as m:  # tiny inputs: plain pred_contrib
        m.setattr(ts, "_chunk", boom)
        assert np.abs(ts.contributions(booster, x, tables, num_threads=1) - ref).max() <= TOL
        assert np.abs(ts.contributions(booster, x, None, num_threads=1) - ref).max() <= TOL
    # cells nearly as many as rows: the probe trees are kept, the rest go plain
    monkeypatch.setattr(ts, "MAX_CELL_SHARE", 0.0)
    fast = ts.contributions(booster, x, tables, num_threads=2, min_rows=0)
    assert np.abs(fast - ref).max() <= TOL


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.one_of(st.sampled_from(SPECIAL), st.floats(-3, 3), st.integers(0, 6).map(float)),
            min_size=5,
            max_size=5,
        ),
        min_size=1,
        max_size=60,
    )
)
def test_property_small_frames(rows: list[list[float]]) -> None:
    booster = _PROPERTY_BOOSTER
    x = np.array(rows, dtype=np.float64)
    ref = booster.predict(x, pred_contrib=True)
    fast = ts.contributions(booster, x, _PROPERTY_TABLES, num_threads=2, min_rows=0)
    assert np.abs(fast - ref).max() <= TOL


@pytest.mark.parametrize("params", [{}, {"zero_as_missing": True}, {"use_missing": False}])
def test_moving_one_input_changes_the_log_odds_by_its_trees(params: dict[str, Any]) -> None:
    """Moves.delta (table lookups in the trees that split on the input) equals the
    difference of LightGBM's two predictions, special values included."""
    x = _x(3000, 0)
    data = lgb.Dataset(x, _y(x, 1), categorical_feature=[], params={"verbosity": -1})
    base = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 10, "num_threads": 1}
    booster = lgb.train({**base, **params, "verbosity": -1, "seed": 0}, data, num_boost_round=30)
    leaves = ts.leaf_tables(booster, ts.build_tables(booster))
    assert leaves is not None
    rows = _x(2000, 9)
    rng = np.random.default_rng(4)
    at = np.arange(len(rows))
    cols = rng.integers(0, rows.shape[1], len(rows))
    values = np.where(
        rng.random(len(rows)) < 0.5, rng.choice(SPECIAL, len(rows)), _x(2000, 10)[at, cols]
    )
    moved = rows.copy()
    moved[at, cols] = values
    want = booster.predict(moved, raw_score=True) - booster.predict(rows, raw_score=True)
    got = ts.Moves.of(leaves, rows).delta(at, cols, values)
    assert np.abs(got - want).max() <= TOL and (np.abs(want) > 1e-6).mean() > 0.5
    # a categorical split: no tables (reasons predict the moved rows instead)
    assert ts.leaf_tables(_booster(), ts.build_tables(_booster())) is None


def test_values_past_a_split_at_infinity_take_its_left_branch() -> None:
    """A split sending every number left and NaN right is ``x <= inf`` in the booster but
    dumped as ``1e300``: values above 1e300 (``inf`` included) go left, keyed and moved
    as the booster predicts them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2))
    missing = rng.random(len(x)) < 0.3
    x[missing, 0] = np.nan
    y = (missing | (x[:, 1] > 0)).astype(float)
    params = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbosity": -1}
    booster = lgb.train(
        {**params, "num_threads": 1, "seed": 0}, lgb.Dataset(x, y), num_boost_round=5
    )
    tables = ts.build_tables(booster)
    assert tables is not None and tables.thresholds[0][-1] >= 1e300  # dumped as 1e300
    rows = _x(400, 11)[:, :2]
    rows[::4, 0] = [1e299, 1e300, 2e300, 1e308, np.inf][: len(rows[::4])] * 20
    ref = booster.predict(rows, pred_contrib=True)
    fast = ts.contributions(booster, rows, tables, num_threads=1, min_rows=0)
    assert np.abs(fast - ref).max() <= TOL
    leaves = ts.leaf_tables(booster, tables)
    assert leaves is not None
    at, cols = np.arange(len(rows)), np.zeros(len(rows), dtype=np.int64)
    values = np.resize([np.inf, 1e301, np.nan, 0.5], len(rows))
    moved = rows.copy()
    moved[:, 0] = values
    want = booster.predict(moved, raw_score=True) - booster.predict(rows, raw_score=True)
    assert np.abs(ts.Moves.of(leaves, rows).delta(at, cols, values) - want).max() <= TOL


_PROPERTY_BOOSTER = _booster(zero_as_missing=True)
_PROPERTY_TABLES = ts.build_tables(_PROPERTY_BOOSTER)


def test_race_model_on_synthetic_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race's LightGBM trained by ``lapse.train.churn`` on generated users: same SHAP, same reasons."""
    from lapse.config import load_config
    from lapse.events import validate_events
    from lapse.registry import load_bundle
    from worlds import trained_world

    world = trained_world(tmp_path, n_users=600, n_days=150, seed=5, train_days=120, score_day=130)
    config = load_config()
    bundle = load_bundle(world.bundle, config).bundle
    events, _ = validate_events(world.events, config, as_of=world.as_of)
    frame = bundle.prepare(events.lazy(), world.as_of)
    model = bundle.scorer.lightgbm
    # enough rows for the cell path: the users, repeated with jitter-free copies
    big = pl.concat([frame] * max(1, -(-6000 // frame.height)))
    assert big.height >= ts.MIN_ROWS
    x = model.encode(big)
    ref = model._fitted().predict(x, pred_contrib=True)
    fast = model.contributions(big)
    assert np.abs(fast - ref).max() <= TOL
    assert np.array_equal(_top(fast), _top(ref))
    # reasons are unchanged: the same words as from plain pred_contrib
    out = reasons(bundle.scorer, "lightgbm", big)
    names = model.feature_names_
    expected = [[names[j] for j in order if ref[i, j] > 0] for i, order in enumerate(_top(ref))]
    got = [[names[j] for j in order if fast[i, j] > 0] for i, order in enumerate(_top(fast))]
    assert got == expected and out.height == big.height
    # a move checked by table lookups gives the same reasons as predicting the moved rows
    with monkeypatch.context() as patch:
        patch.setattr(model, "moves", lambda x: None)
        assert reasons(bundle.scorer, "lightgbm", big).equals(out)
    assert out["reasons"].list.len().sum() > 0
    # the tables are cached on the model but not pickled: old and new bundles load alike
    assert "_shap_cache" in model.__dict__
    again = pickle.loads(pickle.dumps(model))
    assert "_shap_cache" not in again.__dict__ and "_leaf_cache" not in again.__dict__
    assert np.abs(again.contributions(big) - ref).max() <= TOL


def test_old_pickles_without_cache_still_work() -> None:
    rng = np.random.default_rng(0)
    n = 6000
    frame = pl.DataFrame(
        {
            "usage_count_14d": rng.poisson(5, n),
            "days_since_last_usage": np.where(rng.random(n) < 0.2, None, rng.integers(0, 30, n)),
            "plan": rng.choice(["basic", "pro"], n),
        }
    )
    y = (rng.random(n) < 0.3).astype(float)
    model = LightGBMChurn(max_trees=40).fit(frame, y)
    # an instance as unpickled from a bundle made before the cache existed
    old = LightGBMChurn.__new__(LightGBMChurn)
    old.__dict__.update({k: v for k, v in model.__dict__.items() if k != "_shap_cache"})
    ref = model._fitted().predict(model.encode(frame), pred_contrib=True)
    assert np.abs(old.contributions(frame) - ref).max() <= TOL
