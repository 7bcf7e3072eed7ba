"""The canonical event schema and the names of event roles.

Every reader maps its source onto these columns; everything downstream
(features, labels, models) sees only this shape.
"""

from __future__ import annotations

from typing import Final

import polars as pl

__all__ = [
    "EVENT_COLUMNS",
    "OPTIONAL_EVENT_COLUMNS",
    "ORDER_ID",
    "REQUIRED_EVENT_COLUMNS",
    "ROLES",
    "TS_DTYPE",
    "USER_ID",
]

USER_ID: Final = "user_id"
TS_DTYPE: Final = pl.Datetime("us", "UTC")

EVENT_COLUMNS: Final[dict[str, pl.DataType]] = {
    "user_id": pl.String(),
    "ts": TS_DTYPE,
    "event": pl.String(),
    "sku": pl.String(),
    "quantity": pl.Float64(),
    "revenue": pl.Float64(),
}
REQUIRED_EVENT_COLUMNS: Final = ("user_id", "ts", "event")
OPTIONAL_EVENT_COLUMNS: Final = ("sku", "quantity", "revenue")
ORDER_ID: Final = "order_id"
"""The order key (a string), present only when ``source.order_id`` maps it: a user's
purchase lines sharing it are one order; a null key leaves a row its own order."""

# The pinned role names of the config's `roles` section, in documentation order.
ROLES: Final = (
    "usage",
    "purchase",
    "aha",
    "error",
    "setup_started",
    "setup_completed",
    "consumption",
    "cancel",
    "return",
)
