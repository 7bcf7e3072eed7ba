"""The events layer: the only code that opens event and attribute files.

``scan_source`` reads a raw source lazily, ``map_events`` turns it into the
canonical columns of :data:`lapse.schema.EVENT_COLUMNS`, ``read_events`` and
``validate_events`` add rejects, duplicates and future-event checks,
``read_attributes`` reads the per-user table and ``init_config`` drafts a
config for a new file. ``event_files``, ``new_event_users`` and
``read_user_events`` serve incremental trigger runs (an append-only folder).
``read_links`` reads the identity links (``read_events_with_links`` and
``validate_with_links`` read both at once) that :mod:`lapse.events.identity`
resolves into one id per person at a cutoff. Wherever a path to events is
taken, a source-shaped Polars or pandas frame (:data:`EventSource`) is too.
"""

from __future__ import annotations

from lapse.events.attributes import AttributesReport, load_attributes, read_attributes
from lapse.events.inspect import init_config
from lapse.events.mapping import map_events
from lapse.events.readers import EventSource, scan_source
from lapse.events.validate import (
    REJECT_REASONS,
    ValidationReport,
    event_files,
    new_event_users,
    read_events,
    read_events_with_links,
    read_links,
    read_user_events,
    validate_events,
    validate_with_links,
)

__all__ = [
    "REJECT_REASONS",
    "AttributesReport",
    "EventSource",
    "ValidationReport",
    "event_files",
    "init_config",
    "load_attributes",
    "map_events",
    "new_event_users",
    "read_attributes",
    "read_events",
    "read_events_with_links",
    "read_links",
    "read_user_events",
    "scan_source",
    "validate_events",
    "validate_with_links",
]
