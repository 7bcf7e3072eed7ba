"""The sink protocol: what every destination of the per-user records implements.

A sink only knows its destination's shape: how one record becomes one item
(:meth:`Sink.encode`) and how a batch of items is sent (:meth:`Sink.send`).
Batching (by count and bytes), retries, throttling, suppression, delta sync,
the ledger and dead letters live in :mod:`lapse.delivery.batches`, shared by all sinks.

Errors a sink raises from :meth:`Sink.send` tell the delivery layer what to do:

- :class:`RetryableError` (429, 5xx, a dropped connection): retry the same
  batch later, after ``retry_after`` seconds when the destination said so.
  Sinks are idempotent, so a resend after an unseen success changes nothing.
  :class:`ConnectionFailed` says no connection could be made at all (refused,
  unknown host, connect timeout), so nothing of the batch was sent.
- :class:`PayloadTooLarge` (413, or a 400 the platform words as "too large"):
  split the batch in two and send each half; a record alone too large fails.
- :class:`SinkAuthError` (401/403, a missing key): stop the run; nothing of
  the batch is marked sent. It is a :class:`DeliveryStopped`, which the
  delivery layer also raises when a destination cannot be reached: the run
  stops with its pending batches left for ``--resume``.
- :class:`SinkError` (anything else, e.g. 400 for the whole batch): the batch's
  records go to the dead-letter file with the message as their reason.

Per-record rejections inside an accepted batch are returned as
:attr:`Outcome.failed` (index in the batch -> reason).

A batch whose delivery is *in doubt* (its request went out and no answer came
back: the run was killed in flight, the connection dropped after sending) is sent
again. That is harmless for what a destination dedupes (profile upserts, events
with an id). A sink whose destination cannot dedupe some objects (Braze's events)
says so with :meth:`Sink.undeduped` and :meth:`Sink.deduped_part`, and its
``in_doubt`` policy decides: ``resend`` sends them again (they may arrive twice),
``skip`` sends the rest of the record only (they may be missing); either way the
run counts the users concerned.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

# the errors a sink raises, re-exported: a new sink imports everything it needs from here
from lapse.exceptions import (
    ConnectionFailed,
    DeliveryStopped,
    PayloadTooLarge,
    RetryableError,
    SinkAuthError,
    SinkError,
)

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = [
    "RECORD_COLUMNS",
    "RECORD_SCHEMA",
    "ConnectionFailed",
    "DeliveryStopped",
    "InDoubt",
    "Item",
    "Limits",
    "Outcome",
    "PayloadTooLarge",
    "Record",
    "RetryableError",
    "Sink",
    "SinkAuthError",
    "SinkError",
    "json_default",
    "json_size",
]

#: The pinned per-user record columns, in order (the file sink writes exactly these).
RECORD_COLUMNS: tuple[str, ...] = (
    "user_id",
    "as_of",
    "score_run_id",
    "churn_risk",
    "churn_risk_percentile",
    "risk_segment",
    "reasons",
    "triggers",
    "refill_sku",
    "next_order_date",
    "depletion_date",
    "refill_prompt_date",
    "model_name",
    "model_version",
)

#: Their dtypes (dates are calendar days; ``model_version`` is a string: "3", or "local").
RECORD_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "as_of": pl.Date(),
    "score_run_id": pl.String(),
    "churn_risk": pl.Float64(),
    "churn_risk_percentile": pl.Float64(),
    "risk_segment": pl.String(),
    "reasons": pl.List(pl.String()),
    "triggers": pl.List(pl.String()),
    "refill_sku": pl.String(),
    "next_order_date": pl.Date(),
    "depletion_date": pl.Date(),
    "refill_prompt_date": pl.Date(),
    "model_name": pl.String(),
    "model_version": pl.String(),
}

#: One record as a sink sees it: the pinned columns (dates as ``datetime.date``,
#: lists as lists), plus ``previous_risk_segment`` (the segment last delivered to
#: this sink, ``None`` the first time), ``control`` (holdout member, only sent
#: when ``control.send`` is on), ``anonymous`` (``user_id`` is an anonymous id
#: linked to no known user, :mod:`lapse.events.identity`) and the attribute
#: columns the sink asked for.
Record = dict[str, Any]
#: What :meth:`Sink.encode` makes of a record: a JSON-ready object.
Item = Any
#: What a resend does with objects its destination cannot dedupe (see the module docstring).
InDoubt = Literal["resend", "skip"]


@dataclass(frozen=True)
class Limits:
    """A destination's documented limits per request.

    ``max_bytes`` bounds the sum of the items' JSON sizes plus ``envelope_bytes``
    (the request's fixed overhead); an item over ``max_item_bytes`` can never be
    sent and is dead-lettered. ``max_objects`` bounds the platform's own objects
    per request (:meth:`Sink.objects` of each item, e.g. Braze's attribute and
    event objects together); an item holding more can never be sent either.
    ``requests_per_second`` throttles the sends.
    """

    max_items: int
    max_bytes: int | None = None
    max_item_bytes: int | None = None
    envelope_bytes: int = 0
    requests_per_second: float | None = None
    max_objects: int | None = None


@dataclass
class Outcome:
    """What the destination said about an accepted batch: rejected items by index."""

    failed: dict[int, str] = field(default_factory=dict)


class Sink(ABC):
    """A destination of per-user records.

    Subclasses set ``name`` and ``limits`` and implement :meth:`encode` and
    :meth:`send`; ``full_snapshot`` sinks (files) get every record on every
    run, the others only the users whose delta key changed (see
    :mod:`lapse.delivery.batches`). ``attribute_columns`` lists the user-attribute
    columns a sink needs in its records (e.g. ``email`` as the identifier).
    ``anonymous_identifier`` names the field under which the destination
    accepts an anonymous profile's id (Segment ``anonymousId``); ``None``
    (the default) means it accepts none, and anonymous records are held back
    and counted, never sent under the user identifier. ``in_doubt`` is the policy
    for objects the destination cannot dedupe when a batch's delivery is in doubt
    (``None``: it dedupes everything, a resend changes nothing).
    """

    name: str = ""
    limits: Limits = Limits(max_items=1000)
    full_snapshot: bool = False
    attribute_columns: tuple[str, ...] = ()
    anonymous_identifier: str | None = None
    in_doubt: InDoubt | None = None

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> Sink:
        """The sink as configured (credentials come from environment variables)."""
        return cls()

    @abstractmethod
    def encode(self, record: Record) -> Item | None:
        """The item sent for ``record``, or ``None`` to skip it (e.g. no identifier)."""

    def encode_frame(self, records: pl.DataFrame) -> list[Item | None]:
        """:meth:`encode` of every row of ``records``, in order (a sink may do it in bulk)."""
        return [self.encode(r) for r in records.to_dicts()]

    @abstractmethod
    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        """Send one batch; raise the errors in this module's docstring on failure."""

    def payload(self, items: list[Item]) -> Any:
        """The request body :meth:`send` would send for ``items`` (``--dry-run`` shows it)."""
        return items

    def objects(self, item: Item) -> int:
        """The platform objects ``item`` puts in a request, counted against
        ``limits.max_objects`` (one unless the sink says otherwise)."""
        return 1

    def undeduped(self, item: Item) -> int:
        """Objects of ``item`` its destination cannot dedupe: a resend doubles them (none)."""
        return 0

    def deduped_part(self, item: Item) -> Item:
        """``item`` without the objects its destination cannot dedupe (``skip`` sends this)."""
        return item

    def open(self, score_run_id: str) -> None:  # noqa: B027  (optional hook)
        """Called once before the first batch of a run (or of its resume)."""

    def finish(self, score_run_id: str) -> None:  # noqa: B027  (optional hook)
        """Called once after every batch of a run was delivered (e.g. merge part files)."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections; called once, whatever happened."""

    def describe(self) -> str:
        """Where records go, for the summary (never a secret)."""
        return self.name

    def warnings(self) -> list[str]:
        """What the run should warn about the records written (asked after ``finish``)."""
        return []


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback: dates and datetimes as ISO 8601 strings."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_size(item: Item) -> int:
    """Bytes of ``item`` as compact UTF-8 JSON (how the delivery layer sizes batches)."""
    return len(
        json.dumps(item, default=json_default, separators=(",", ":"), ensure_ascii=False).encode()
    )
