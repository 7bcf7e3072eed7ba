"""Trigger presets: the built-in triggers and the classic campaigns, written in the
condition language and parameterised by the config's ``rules`` section.

A built-in whose roles are empty in the config is ``false`` (a transaction table
has no ``aha`` event to miss).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import polars as pl

from lapse.exceptions import ConfigError

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["BUILTIN", "CHURN_TRIGGERS", "DEFAULT_COOLDOWN", "PRESETS", "preset_when"]

BUILTIN: Final = (
    "activation_nudge",
    "milestone",
    "friction_alert",
    "usage_decay",
    "dropping_activity",
    "replenishment_due",
)
CHURN_TRIGGERS: Final = ("usage_decay", "dropping_activity", "friction_alert", "activation_nudge")
PRESETS: Final = (*BUILTIN, "upsell", "vip", "win_back", "nth_order", "streak")
#: cooldown of each preset when the config gives none (None: fires once per user, ever)
DEFAULT_COOLDOWN: Final[Mapping[str, int | None]] = {
    **dict.fromkeys(BUILTIN, 0),
    "upsell": 30,
    "vip": 90,
    "win_back": 30,
    "nth_order": None,
    "streak": 30,
}


def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


def preset_when(name: str, config: LapseConfig, schema: Mapping[str, pl.DataType]) -> str:
    """The condition of preset ``name`` for ``config`` over the columns in ``schema``.

    Raises
    ------
    ConfigError
        ``rules.friction_window_days`` is not a feature window, or ``name`` is no preset.
    """
    rules, roles = config.rules, config.roles
    w = rules.friction_window_days
    if name == "activation_nudge":
        if not (roles.purchase and roles.aha):
            return "false"
        return f"days_since_first_purchase >= {rules.activation_nudge_days} and not aha_reached"
    if name == "milestone":
        crossed = [f"milestone_{m.name}_crossed_7d" for m in config.milestones]
        return " or ".join(crossed) if crossed else "false"
    if name == "friction_alert":
        if roles.error and f"error_count_{w}d" not in schema:
            windows = sorted(int(c[12:-1]) for c in schema if c.startswith("error_count_"))
            raise ConfigError(
                f"rules.friction_window_days is {w}, which is not a feature window; use one of "
                f"{windows} or add {w} to features.windows"
            )
        parts = []
        if roles.error:
            parts.append(f"error_count_{w}d >= {rules.friction_min_errors}")
        if roles.setup_started and f"setup_started_count_{w}d" in schema:
            parts.append(f"(setup_incomplete and setup_started_count_{w}d > 0)")
        return " or ".join(parts) if parts else "false"
    if name == "usage_decay":
        return f"decay_ratio_14d <= {_num(rules.usage_decay_ratio)}" if roles.usage else "false"
    if name == "dropping_activity":
        return (
            f"dropping_ratio_7d < {_num(rules.dropping_activity_ratio)}" if roles.usage else "false"
        )
    if name == "replenishment_due":  # the record's depletion estimate: due when its prompt is
        if not (roles.purchase and roles.consumption) or "days_to_depletion" not in schema:
            return "false"
        return f"days_to_depletion <= {_num(config.replenishment.lead_time_days)}"
    if name == "upsell":  # outgrew the tier: heavy use on the basic plan
        return f'plan == "basic" and usage_count_28d >= {rules.heavy_usage_28d}'
    if name == "vip":  # heavy use of the premium tier
        return f'plan == "premium" and usage_count_28d >= {rules.heavy_usage_28d}'
    if name == "win_back":  # needs the score-time columns
        return f'risk_segment == "high" and decay_ratio_14d <= {_num(rules.usage_decay_ratio)}'
    if name == "nth_order":  # the order count crossed N in the last 7 days
        if not roles.purchase:
            return "false"
        n = rules.nth_order
        return f"order_count >= {n} and order_count - purchase_count_7d < {n}"
    if name == "streak":
        return f"current_streak_days >= {rules.streak_days}"
    raise ConfigError(f"{name!r} is not a trigger preset; presets: {', '.join(PRESETS)}")
