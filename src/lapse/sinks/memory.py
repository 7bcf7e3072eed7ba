"""An in-memory sink: for tests, and for ``--dry-run`` (it sends nothing anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from lapse.sinks.base import RECORD_COLUMNS, Item, Limits, Outcome, Record, Sink

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["MemorySink"]


class MemorySink(Sink):
    """Keeps every request it gets in :attr:`requests` (batch id, payload).

    ``like`` borrows another sink's encoding, limits and payload shape, so a dry
    run batches and renders records exactly as that sink would send them.
    """

    name = "memory"
    limits = Limits(max_items=1000)

    def __init__(self, like: Sink | None = None) -> None:
        self.like = like
        if like is not None:
            self.name = like.name
            self.limits = like.limits
            self.full_snapshot = like.full_snapshot
            self.attribute_columns = like.attribute_columns
            self.anonymous_identifier = like.anonymous_identifier
        self.requests: list[tuple[str, Any]] = []
        self.items: list[Item] = []

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> MemorySink:
        return cls()

    def encode(self, record: Record) -> Item | None:
        if self.like is not None:
            return self.like.encode(record)
        return {k: record[k] for k in RECORD_COLUMNS}

    def encode_frame(self, records: pl.DataFrame) -> list[Item | None]:
        if self.like is not None:
            return self.like.encode_frame(records)
        return super().encode_frame(records)

    def payload(self, items: list[Item]) -> Any:
        return self.like.payload(items) if self.like is not None else items

    def objects(self, item: Item) -> int:
        return self.like.objects(item) if self.like is not None else 1

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        self.requests.append((batch_id, self.payload(items)))
        self.items.extend(items)
        return Outcome()

    def describe(self) -> str:
        return f"memory (like {self.like.describe()})" if self.like else "memory"
