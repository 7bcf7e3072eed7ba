"""The built-in deterministic triggers and the rules churn score.

Triggers are Polars expressions over feature rows (names from
:mod:`lapse.features.registry`); parameters come from the config's ``rules``
section. A trigger whose roles are empty in the config never fires (a
transaction table has no ``aha`` event to miss).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import ConfigError
from lapse.modeling._base import ParamsMixin

__all__ = [
    "CHURN_TRIGGERS",
    "TRIGGERS",
    "RulesScore",
    "recency_days",
    "rules_score",
    "trigger_exprs",
    "triggers",
]

TRIGGERS: Final = (
    "activation_nudge",
    "milestone",
    "friction_alert",
    "usage_decay",
    "dropping_activity",
    "replenishment_due",
)
CHURN_TRIGGERS: Final = ("usage_decay", "dropping_activity", "friction_alert", "activation_nudge")


def _col(features: pl.DataFrame | pl.LazyFrame, name: str) -> pl.Expr:
    schema = features.collect_schema() if isinstance(features, pl.LazyFrame) else features.schema
    if name not in schema:
        raise ConfigError(
            f"rules: feature {name!r} is missing from the feature rows; rebuild the features "
            "with the same config"
        )
    return pl.col(name)


def trigger_exprs(features: pl.DataFrame | pl.LazyFrame, config: LapseConfig) -> dict[str, pl.Expr]:
    """One boolean expression per trigger id (nulls count as not fired)."""
    rules, roles = config.rules, config.roles
    never = pl.lit(False)
    w = rules.friction_window_days
    schema = features.collect_schema() if isinstance(features, pl.LazyFrame) else features.schema
    if roles.error and f"error_count_{w}d" not in schema:
        windows = sorted(int(c[12:-1]) for c in schema if c.startswith("error_count_"))
        raise ConfigError(
            f"rules.friction_window_days is {w}, which is not a feature window; use one of "
            f"{windows} or add {w} to features.windows"
        )
    out: dict[str, pl.Expr] = {}
    out["activation_nudge"] = (
        (_col(features, "days_since_first_purchase") >= rules.activation_nudge_days)
        & ~_col(features, "aha_reached")
        if roles.purchase and roles.aha
        else never
    )
    crossed = [_col(features, f"milestone_{m.name}_crossed_7d") for m in config.milestones]
    out["milestone"] = pl.any_horizontal(crossed) if crossed else never
    friction = []
    if roles.error:
        friction.append(_col(features, f"error_count_{w}d") >= rules.friction_min_errors)
    if roles.setup_started and f"setup_started_count_{w}d" in schema:
        friction.append(
            _col(features, "setup_incomplete") & (pl.col(f"setup_started_count_{w}d") > 0)
        )
    out["friction_alert"] = pl.any_horizontal(friction) if friction else never
    usage = bool(roles.usage)
    out["usage_decay"] = (
        _col(features, "decay_ratio_14d") <= rules.usage_decay_ratio if usage else never
    )
    out["dropping_activity"] = (
        _col(features, "dropping_ratio_7d") < rules.dropping_activity_ratio if usage else never
    )
    out["replenishment_due"] = (
        _col(features, "days_of_supply_left") <= config.replenishment.lead_time_days
        if roles.purchase and roles.consumption
        else never
    )
    return {k: v.fill_null(False).alias(k) for k, v in out.items()}


def triggers(features: pl.DataFrame, config: LapseConfig) -> pl.DataFrame:
    """Key columns, a boolean column per trigger id, and ``triggers`` (fired ids, in order)."""
    keys = [c for c in ("user_id", "cutoff") if c in features.columns]
    exprs = trigger_exprs(features, config)
    flags = features.select(*keys, *exprs.values())
    fired = pl.concat_list(
        [pl.when(pl.col(t)).then(pl.lit(t)).otherwise(pl.lit(None, pl.String)) for t in TRIGGERS]
    ).list.drop_nulls()
    return flags.with_columns(fired.alias("triggers"))


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
