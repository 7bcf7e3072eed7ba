"""Triggers as data: named conditions in a small, safe language, compiled to Polars.

The built-ins (``activation_nudge``, ``milestone``, ``friction_alert``,
``usage_decay``, ``dropping_activity``, ``replenishment_due``) and the presets
``upsell``, ``vip``, ``win_back``, ``nth_order`` and ``streak`` are written in
the same language (:mod:`lapse.triggers.presets`); the config's ``triggers``
section adds triggers or sets a built-in's cooldown, priority, audience and
emitted id. :mod:`lapse.conditions` holds the language.
"""

from lapse.conditions import compile_condition, parse
from lapse.exceptions import ExprError
from lapse.triggers.core import (
    SCORE_COLUMNS,
    Trigger,
    apply_cooldowns,
    conditions,
    evaluate,
    for_run,
    names_read,
    resolve,
)
from lapse.triggers.presets import BUILTIN, CHURN_TRIGGERS, PRESETS, preset_when

__all__ = [
    "BUILTIN",
    "CHURN_TRIGGERS",
    "PRESETS",
    "SCORE_COLUMNS",
    "ExprError",
    "Trigger",
    "apply_cooldowns",
    "compile_condition",
    "conditions",
    "evaluate",
    "for_run",
    "names_read",
    "parse",
    "preset_when",
    "resolve",
]
