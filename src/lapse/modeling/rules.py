"""The built-in deterministic triggers and the rules churn score.

Triggers are conditions over feature rows (names from
:mod:`lapse.features.registry`) in the language of :mod:`lapse.triggers`,
compiled to Polars; the built-ins are presets parameterised by the config's
``rules`` section. A trigger whose roles are empty in the config never fires
(a transaction table has no ``aha`` event to miss).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.modeling.params import ParamsMixin
from lapse.triggers import BUILTIN, CHURN_TRIGGERS, conditions, evaluate, resolve

__all__ = [
    "CHURN_TRIGGERS",
    "TRIGGERS",
    "RulesScore",
    "recency_days",
    "rules_score",
    "trigger_exprs",
    "triggers",
]

TRIGGERS: Final = BUILTIN


def _schema(features: pl.DataFrame | pl.LazyFrame) -> Mapping[str, pl.DataType]:
    return features.collect_schema() if isinstance(features, pl.LazyFrame) else features.schema


def trigger_exprs(features: pl.DataFrame | pl.LazyFrame, config: LapseConfig) -> dict[str, pl.Expr]:
    """One boolean expression per built-in trigger's condition (nulls count as not fired).

    The conditions are the config's (``triggers.<name>.when``, else the preset),
    without audience, cooldown or ``enabled``: what the rules churn score counts.
    """
    schema = _schema(features)
    builtins = [t for t in resolve(config, schema) if t.name in BUILTIN]
    return conditions(builtins, schema, audience=False)


def triggers(features: pl.DataFrame, config: LapseConfig) -> pl.DataFrame:
    """Key columns, a boolean column per enabled trigger, ``triggers`` (fired ids, in order)
    and ``cooldown_keys`` (:func:`lapse.triggers.evaluate`)."""
    return evaluate(features, resolve(config, features.schema))


def recency_days(features: pl.DataFrame, config: LapseConfig) -> npt.NDArray[np.float64]:
    """Days since the last qualifying activity (``labels.activity_roles``); inf when never."""
    cols = [
        f"days_since_last_{r}"
        for r in config.labels.activity_roles
        if config.roles.of(r) and f"days_since_last_{r}" in features.columns
    ]
    if not cols:
        cols = ["days_since_last_event"]
    days = features.select(pl.min_horizontal(*cols).cast(pl.Float64)).to_series()
    out: npt.NDArray[np.float64] = days.fill_null(np.inf).to_numpy().astype(np.float64)
    return out


def rules_score(features: pl.DataFrame, config: LapseConfig) -> npt.NDArray[np.float64]:
    """Fired churn-signalling triggers plus a tie-break in [0, 1) by days since last usage.

    Longer since the last usage (or, without a ``usage`` role, the last
    qualifying activity) is riskier; never counts as the longest.
    """
    exprs = trigger_exprs(features, config)
    n = features.select(
        pl.sum_horizontal(*(exprs[t].cast(pl.Int32) for t in CHURN_TRIGGERS))
    ).to_series()
    if config.roles.usage and "days_since_last_usage" in features.columns:
        days = features["days_since_last_usage"].cast(pl.Float64).fill_null(np.inf).to_numpy()
    else:
        days = recency_days(features, config)
    finite = np.isfinite(days)
    tie = np.full(days.shape, 1.0 - 1e-9)
    tie[finite] = days[finite] / (days[finite] + 1.0)
    out: npt.NDArray[np.float64] = n.to_numpy().astype(np.float64) + tie
    return out


class RulesScore(ParamsMixin):
    """The rules churn score as a model: nothing to learn, so ``fit`` only records columns."""

    def __init__(self) -> None:
        pass

    def fit(self, features: pl.DataFrame, config: LapseConfig) -> RulesScore:
        trigger_exprs(features, config)  # fail early on missing features
        self.n_features_in_ = features.width
        return self

    def score(self, features: pl.DataFrame, config: LapseConfig) -> npt.NDArray[np.float64]:
        return rules_score(features, config)
