"""Reason codes: the top drivers of a user's churn risk, in words.

Drivers are the features with the largest positive SHAP values of the race's
LightGBM (``pred_contrib``, log-odds). SHAP costs about 100x a prediction, so
:func:`reasons` takes the subset of rows to explain.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import polars as pl

from lapse.modeling.lgbm import LightGBMChurn

__all__ = ["describe", "reasons"]

_COUNT = re.compile(r"^(?P<role>[a-z_]+)_count_(?P<w>\d+)d$")
_ROLE_WORDS = {
    "usage": "usage",
    "purchase": "purchases",
    "event": "events",
    "error": "errors",
    "aha": "aha moments",
    "setup_started": "setups started",
    "setup_completed": "setups completed",
    "consumption": "consumption events",
    "cancel": "cancellations",
    "return": "returns",
}


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.0f}" if v == int(v) else f"{v:.2f}".rstrip("0").rstrip(".")
    return str(v)


def _count(name: str, row: Mapping[str, Any]) -> str | None:
    m = _COUNT.match(name)
    if not m:
        return None
    role, w = m["role"], int(m["w"])
    words = _ROLE_WORDS.get(role, role.replace("_", " "))
    text = f"{words} in last {w} days: {_num(row[name])}"
    longer = row.get(f"{role}_count_{2 * w}d")
    if longer is not None and row[name] is not None:
        before = longer - row[name]
        trend = (
            "down from" if before > row[name] else "up from" if before < row[name] else "same as"
        )
        text += f", {trend} {_num(before)} the {w} days before"
    return text


def _days_since(name: str, row: Mapping[str, Any]) -> str | None:
    if not name.startswith("days_since_last_"):
        return None
    what = name.removeprefix("days_since_last_").replace("_", " ")
    v = row[name]
    if v is None:
        return f"no {what} yet"
    return f"last {what} {_num(v)} day{'s' if v != 1 else ''} ago"


_FIXED: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "decay_ratio_14d": lambda r: (
        f"usage in last 14 days: {_num(r.get('usage_count_14d'))}, vs "
        f"{_num(None if r.get('usage_count_28d') is None or r.get('usage_count_14d') is None else r['usage_count_28d'] - r['usage_count_14d'])}"
        " the 14 days before"
    ),
    "dropping_ratio_7d": lambda r: (
        f"usage this week: {_num(r.get('usage_count_7d'))}, vs "
        f"{_num(None if r.get('usage_count_28d') is None or r.get('usage_count_7d') is None else round((r['usage_count_28d'] - r['usage_count_7d']) / 3, 1))}"
        " a week in the 3 weeks before"
    ),
    "setup_incomplete": lambda r: (
        "setup started but not completed" if r["setup_incomplete"] else "setup completed"
    ),
    "aha_reached": lambda r: (
        "has reached the aha moment" if r["aha_reached"] else "has not reached the aha moment yet"
    ),
    "tenure_days_capped": lambda r: (
        f"customer for {_num(r.get('tenure_days', r['tenure_days_capped']))} days"
    ),
    "days_of_supply_left": lambda r: f"supply left: about {_num(r['days_of_supply_left'])} days",
    "current_streak_days": lambda r: f"current daily streak: {_num(r['current_streak_days'])} days",
    "usage_slope_8w": lambda r: (
        f"weekly usage trend over 8 weeks: {_num(r['usage_slope_8w'])} per week"
    ),
    "recency_over_mean_gap": lambda r: (
        f"away {_num(r['recency_over_mean_gap'])}x longer than the usual gap between active days"
    ),
}


def describe(name: str, row: Mapping[str, Any]) -> str:
    """A human sentence for feature ``name`` given the user's feature ``row``.

    Examples
    --------
    >>> describe("usage_count_14d", {"usage_count_14d": 2, "usage_count_28d": 13})
    'usage in last 14 days: 2, down from 11 the 14 days before'
    """
    if name in _FIXED:
        try:
            return _FIXED[name](row)
        except (KeyError, TypeError):
            pass
    for render in (_count, _days_since):
        text = render(name, row)
        if text is not None:
            return text
    m = re.match(r"^active_days_(\d+)d$", name)
    if m:
        return f"active on {_num(row[name])} of the last {m[1]} days"
    m = re.match(r"^revenue_(\d+)d$", name)
    if m:
        return f"spend in last {m[1]} days: {_num(row[name])}"
    return f"{name.replace('_', ' ')}: {_num(row.get(name))}"


class _Row(Mapping[str, Any]):
    """Row ``i`` of a frame as a read-only mapping; columns become lists on first use.

    :func:`describe` reads a handful of columns per row, so this avoids turning
    every row into a dict of every feature (gigabytes at a million rows).
    """

    def __init__(self, frame: pl.DataFrame, cache: dict[str, list[Any]], i: int) -> None:
        self._frame, self._cache, self._i = frame, cache, i

    def __getitem__(self, name: str) -> Any:
        col = self._cache.get(name)
        if col is None:
            if name not in self._frame.columns:
                raise KeyError(name)
            col = self._cache[name] = self._frame[name].to_list()
        return col[self._i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._frame.columns)

    def __len__(self) -> int:
        return self._frame.width


#: Rows explained at a time: bounds the SHAP matrix (~80 MB at 100 features); larger
#: chunks share more of the TreeSHAP work (:mod:`lapse.modeling._treeshap`).
CHUNK_ROWS = 100_000


def reasons(
    model: LightGBMChurn,
    frame: pl.DataFrame,
    *,
    top: int = 3,
) -> pl.DataFrame:
    """The ``top`` risk-raising drivers per row: key columns plus ``reasons`` (list of str).

    Only features pushing risk up (positive SHAP) are named, so a row may get
    fewer than ``top`` reasons. Rows are explained in chunks of
    :data:`CHUNK_ROWS`, so memory stays bounded whatever the frame's size.
    """
    keys = [c for c in ("user_id", "cutoff") if c in frame.columns]
    names = model.feature_names_
    out: list[list[str]] = []
    for start in range(0, frame.height, CHUNK_ROWS):
        chunk = frame.slice(start, CHUNK_ROWS)
        contrib = model.contributions(chunk)[:, :-1]
        order = np.argsort(-contrib, axis=1, kind="stable")[:, :top]
        cache: dict[str, list[Any]] = {}
        for i in range(chunk.height):
            row = _Row(chunk, cache, i)
            out.append([describe(names[j], row) for j in order[i] if contrib[i, j] > 0])
    return frame.select(keys).with_columns(pl.Series("reasons", out, dtype=pl.List(pl.String)))
