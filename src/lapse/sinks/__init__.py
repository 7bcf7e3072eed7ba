"""Destinations of the per-user records; :func:`make_sink` builds one by name.

Each destination is a :class:`~lapse.sinks.base.Sink` in a module of its own;
everything they share (batching, retries, ledger) lives in :mod:`lapse.delivery.batches`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from lapse.exceptions import LapseError
from lapse.sinks.base import RECORD_COLUMNS, RECORD_SCHEMA, Limits, Outcome, Sink

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = [
    "RECORD_COLUMNS",
    "RECORD_SCHEMA",
    "SINKS",
    "Limits",
    "Outcome",
    "Sink",
    "check_sink",
    "make_sink",
]

#: Sink name -> ``module:class``.
SINKS: dict[str, str] = {
    "file": "lapse.sinks.file:FileSink",
    "memory": "lapse.sinks.memory:MemorySink",
    "braze": "lapse.sinks.braze:BrazeSink",
    "klaviyo": "lapse.sinks.klaviyo:KlaviyoSink",
    "customerio": "lapse.sinks.customerio:CustomerioSink",
    "segment": "lapse.sinks.segment:SegmentSink",
    "iterable": "lapse.sinks.iterable:IterableSink",
    "webhook": "lapse.sinks.webhook:WebhookSink",
    "sql": "lapse.sinks.sql:SqlSink",
}


def make_sink(name: str, config: LapseConfig, *, out: Path | None = None) -> Sink:
    """The sink called ``name``, configured from ``config`` and its environment variables."""
    target = SINKS.get(name)
    if target is None:
        raise LapseError(f"unknown sink {name!r}; choose one of: {', '.join(sorted(SINKS))}")
    module, _, cls_name = target.partition(":")
    cls: type[Sink] = getattr(importlib.import_module(module), cls_name)
    return cls.from_config(config, out=out)


def check_sink(name: str, config: LapseConfig) -> str:
    """Verify sink ``name``'s credentials and reachability with the cheapest harmless call
    its platform offers; returns what was checked, raises a :class:`~lapse.sinks.base.SinkError`
    saying what is wrong."""
    sink = make_sink(name, config)
    check = getattr(sink, "check", None)
    if check is None:
        platforms = sorted(n for n in SINKS if n not in ("file", "memory"))
        raise LapseError(
            f"sink {name!r} has no credentials or remote endpoint to check; "
            f"`lapse sinks check` is for: {', '.join(platforms)}"
        )
    try:
        message: str = check()
    finally:
        sink.close()
    return message
