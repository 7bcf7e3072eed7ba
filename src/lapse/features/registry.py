"""The one registry of feature definitions, and the Markdown table built from it.

Names may hold two placeholders: ``{W}`` (a window in days: the core 7, 14, 28
and 90 plus ``features.windows``) and ``{milestone}`` (a configured milestone
name). :func:`expand` turns the registry into the exact columns
:func:`lapse.features.build` returns for a config, in order; a test keeps the
two in step, and another keeps ``FEATURES.md`` equal to :func:`markdown_table`.

Rewrite ``FEATURES.md`` with
``python -c "from lapse.features.registry import write_feature_table as w; w()"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import polars as pl

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = [
    "CORE_WINDOWS",
    "FEATURES",
    "SKU_FEATURES",
    "FeatureDef",
    "expand",
    "markdown_table",
    "windows_named",
    "windows_of",
    "write_feature_table",
]

CORE_WINDOWS: Final = (7, 14, 28, 90)
_GROUPS: Final = ("core", "activity", "heartbeat", "activation", "friction", "replenishment")


@dataclass(frozen=True)
class FeatureDef:
    """One feature: its (possibly templated) name, meaning, dtype and group."""

    name: str
    description: str
    dtype: pl.DataType
    group: str


def _f(name: str, description: str, dtype: pl.DataType, group: str) -> FeatureDef:
    return FeatureDef(name, description, dtype, group)


_I, _F, _B = pl.Int64(), pl.Float64(), pl.Boolean()
_WIN = "in the half-open window [T - W days, T)"

FEATURES: Final[tuple[FeatureDef, ...]] = (
    # core: names pinned by the issue; triggers and the README rely on them
    _f("usage_count_{W}d", f"`usage` events {_WIN}", _I, "core"),
    _f("purchase_count_{W}d", f"orders (`purchase` events) {_WIN}", _I, "core"),
    _f("active_days_{W}d", f"distinct UTC calendar days with any event {_WIN}", _I, "core"),
    _f(
        "revenue_{W}d",
        f"sum of non-null revenue of all events {_WIN} (net of returns; 0 when none)",
        _F,
        "core",
    ),
    _f(
        "days_since_last_usage",
        "whole days since the last `usage` event; null when never",
        _I,
        "core",
    ),
    _f(
        "days_since_last_purchase",
        "whole days since the last `purchase` event; null when never",
        _I,
        "core",
    ),
    _f("tenure_days", "whole days since the user's first event", _I, "core"),
    _f(
        "decay_ratio_14d",
        "usage in [T-14d, T) / usage in [T-28d, T-14d); null when the latter is 0",
        _F,
        "core",
    ),
    _f(
        "dropping_ratio_7d",
        "usage in [T-7d, T) / mean weekly usage in [T-28d, T-7d); null when that mean is 0",
        _F,
        "core",
    ),
    # activity
    _f("event_count_{W}d", f"events of any name {_WIN}", _I, "activity"),
    _f("aha_count_{W}d", f"`aha` events {_WIN}", _I, "activity"),
    _f("setup_started_count_{W}d", f"`setup_started` events {_WIN}", _I, "activity"),
    _f("setup_completed_count_{W}d", f"`setup_completed` events {_WIN}", _I, "activity"),
    _f("consumption_count_{W}d", f"`consumption` events {_WIN}", _I, "activity"),
    _f("cancel_count_{W}d", f"`cancel` events {_WIN}", _I, "activity"),
    _f("return_count_{W}d", f"`return` events {_WIN}", _I, "activity"),
    _f("days_since_last_event", "whole days since the last event of any name", _I, "activity"),
    _f(
        "days_since_last_aha",
        "whole days since the last `aha` event; null when never",
        _I,
        "activity",
    ),
    _f(
        "days_since_first_purchase",
        "whole days since the first `purchase` event; null when never",
        _I,
        "activity",
    ),
    _f("events_per_active_day", "events before T / distinct active days before T", _F, "activity"),
    _f(
        "events_per_active_week",
        "events before T / distinct active ISO weeks (Monday start, UTC) before T",
        _F,
        "activity",
    ),
    _f(
        "mean_active_gap_days",
        "mean gap in days between consecutive active days; null with fewer than 2",
        _F,
        "activity",
    ),
    _f(
        "recency_over_mean_gap",
        "days since the last event (fractional) / `mean_active_gap_days`",
        _F,
        "activity",
    ),
    # heartbeat
    _f(
        "usage_slope_8w",
        "least-squares slope of weekly usage counts over the 8 weeks before T (events per week per week)",
        _F,
        "heartbeat",
    ),
    _f(
        "current_streak_days",
        "consecutive active UTC days ending on the day of T - 1 microsecond; 0 when that day is inactive",
        _I,
        "heartbeat",
    ),
    _f(
        "longest_streak_days",
        "longest run of consecutive active UTC days before T",
        _I,
        "heartbeat",
    ),
    # activation and milestones
    _f("aha_reached", "whether any `aha` event happened before T", _B, "activation"),
    _f(
        "days_purchase_to_aha",
        "whole days from the first purchase to the first `aha` event (negative when aha came first); null unless both happened",
        _I,
        "activation",
    ),
    _f(
        "milestone_{milestone}_count",
        "events of the milestone's event name before T",
        _I,
        "activation",
    ),
    _f(
        "milestone_{milestone}_crossed_7d",
        "whether the milestone count crossed one of its thresholds in [T-7d, T)",
        _B,
        "activation",
    ),
    # friction
    _f("error_count_{W}d", f"`error` events {_WIN}", _I, "friction"),
    _f(
        "days_since_last_error",
        "whole days since the last `error` event; null when never",
        _I,
        "friction",
    ),
    _f(
        "setup_incomplete",
        "a `setup_started` event with no `setup_completed` at or after the last one",
        _B,
        "friction",
    ),
    # replenishment (per user; per user-SKU rows come from build_sku)
    _f(
        "units_bought_{W}d",
        f"units bought (purchase quantity x units per pack; null quantity = 1 pack) {_WIN}",
        _F,
        "replenishment",
    ),
    _f(
        "units_consumed_{W}d",
        f"units consumed (consumption quantity, null = 1) {_WIN}; null without a `consumption` role",
        _F,
        "replenishment",
    ),
    _f("order_count", "orders (`purchase` events) before T", _I, "replenishment"),
    _f("units_bought_total", "units bought before T", _F, "replenishment"),
    _f(
        "units_consumed_total",
        "units consumed before T; null without a `consumption` role",
        _F,
        "replenishment",
    ),
    _f(
        "units_left",
        "max(0, units bought - units consumed); null without telemetry or without a purchase",
        _F,
        "replenishment",
    ),
    _f(
        "consumption_rate_28d",
        "units consumed per day over [T-28d, T) (the window is cut to the user's tenure); null without telemetry",
        _F,
        "replenishment",
    ),
    _f(
        "days_of_supply_left",
        "`units_left` / `consumption_rate_28d`; null when either is null or the rate is 0",
        _F,
        "replenishment",
    ),
    _f(
        "mean_order_gap_days",
        "mean gap in days between consecutive orders; null with fewer than 2",
        _F,
        "replenishment",
    ),
    _f(
        "std_order_gap_days",
        "sample standard deviation of those gaps; null with fewer than 3 orders",
        _F,
        "replenishment",
    ),
)

SKU_FEATURES: Final[tuple[FeatureDef, ...]] = (
    _f("order_count", "orders of this SKU before T", _I, "sku"),
    _f("units_bought", "units of this SKU bought before T", _F, "sku"),
    _f("last_order_units", "units in the latest order of this SKU", _F, "sku"),
    _f(
        "units_consumed",
        "units consumed from this SKU (consumption events carrying the SKU, or without SKU and attributed to the user's latest purchased SKU at that time); null without a `consumption` role",
        _F,
        "sku",
    ),
    _f("units_left", "max(0, units bought - units consumed); null without telemetry", _F, "sku"),
    _f(
        "consumption_rate_28d",
        "units of this SKU consumed per day over [T-28d, T), the window cut to the time since its first order; null without telemetry",
        _F,
        "sku",
    ),
    _f(
        "days_of_supply_left",
        "`units_left` / `consumption_rate_28d`; null when the rate is 0 or null",
        _F,
        "sku",
    ),
    _f("days_since_last_order", "whole days since the latest order of this SKU", _I, "sku"),
    _f("days_since_first_order", "whole days since the first order of this SKU", _I, "sku"),
    _f(
        "mean_order_gap_days",
        "mean gap in days between consecutive orders of this SKU; null with fewer than 2",
        _F,
        "sku",
    ),
    _f(
        "std_order_gap_days",
        "sample standard deviation of those gaps; null with fewer than 3 orders",
        _F,
        "sku",
    ),
)


def windows_of(config: LapseConfig) -> list[int]:
    """The windows built for ``config``: the core set plus ``features.windows``, sorted."""
    return sorted(set(CORE_WINDOWS) | set(config.features.windows))


def windows_named(names: Iterable[str]) -> set[int]:
    """The windows (days) that feature ``names`` of windowed features ask for.

    >>> sorted(windows_named(["error_count_3d", "usage_count_7d", "plan"]))
    [3, 7]
    """
    patterns = [
        re.compile("^" + re.escape(f.name).replace(re.escape("{W}"), "([1-9][0-9]*)") + "$")
        for f in FEATURES
        if "{W}" in f.name
    ]
    return {int(m.group(1)) for n in names for p in patterns if (m := p.match(n))}


def expand(
    config: LapseConfig, feature_set: Literal["core", "all"] = "all"
) -> dict[str, pl.DataType]:
    """Every feature column ``build`` returns for ``config`` (keys excluded), in order.

    ``feature_set="core"`` keeps the core group over :data:`CORE_WINDOWS` only:
    the columns of ``build(..., feature_set="core")``.
    """
    core = feature_set == "core"
    windows = list(CORE_WINDOWS) if core else windows_of(config)
    out: dict[str, pl.DataType] = {}
    for feat in FEATURES:
        if core and feat.group != "core":
            continue
        if "{W}" in feat.name:
            names = [feat.name.replace("{W}", str(w)) for w in windows]
        elif "{milestone}" in feat.name:
            names = [feat.name.replace("{milestone}", m.name) for m in config.milestones]
        else:
            names = [feat.name]
        for name in names:
            out[name] = feat.dtype
    return out


def _rows(feats: tuple[FeatureDef, ...]) -> list[str]:
    rows = ["| feature | group | dtype | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {f.group} | {f.dtype} | {f.description} |" for f in feats]
    return rows


def markdown_table() -> str:
    """The feature tables (per user, then per user-SKU) as Markdown."""
    order = {g: i for i, g in enumerate(_GROUPS)}
    feats = tuple(sorted(FEATURES, key=lambda f: order[f.group]))
    lines = [
        "<!-- generated by lapse.features.registry.write_feature_table(); do not edit -->",
        "# lapse features",
        "",
        "T is the cutoff (`as_of`); features see events with `ts < T` only. `{W}` is a",
        "window in days: always 7, 14, 28 and 90, plus `features.windows` (default adds 56,",
        "180 and 365). `{milestone}` is each configured milestone's name. Nulls mean never",
        "happened.",
        "An order is a `purchase` event; with `source.order_id`, the purchase lines of one",
        "order are one order and one event in every count, at its first line's time, while",
        "sums (revenue, units) and active days take each line at its own time.",
        "Key columns: `user_id` (and `cutoff` from `build_many`); configured",
        "`attributes.static_features` follow the features.",
        "",
        '`build(..., feature_set="core")` (and `build_many`) return only the `core`',
        "group over the windows 7, 14, 28 and 90 days, with the same values as the full set.",
        "",
        "## Per user: `lapse.features.build` / `build_many`",
        "",
        *_rows(feats),
        "",
        "## Per user and SKU: `lapse.features.build_sku`",
        "",
        "Key columns `user_id`, `sku`; one row per pair with an order before T.",
        "",
        *_rows(SKU_FEATURES),
    ]
    return "\n".join(lines) + "\n"


FEATURES_MD: Final = Path(__file__).with_name("FEATURES.md")


def write_feature_table(path: Path = FEATURES_MD) -> Path:
    """Write :func:`markdown_table` to ``path`` (default: next to this module)."""
    path.write_text(markdown_table(), encoding="utf-8")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(write_feature_table())
