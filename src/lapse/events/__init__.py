"""The events layer: the only code that opens event and attribute files.

``scan_source`` reads a raw source lazily, ``map_events`` turns it into the
canonical columns of :data:`lapse.schema.EVENT_COLUMNS`, ``read_events`` and
``validate_events`` add rejects, duplicates and future-event checks,
``read_attributes`` reads the per-user table and ``init_config`` drafts a
config for a new file.
"""

from __future__ import annotations

from lapse.events.attributes import AttributesReport, load_attributes, read_attributes
from lapse.events.inspect import init_config
from lapse.events.mapping import map_events
from lapse.events.readers import scan_source
from lapse.events.validate import REJECT_REASONS, ValidationReport, read_events, validate_events

__all__ = [
    "REJECT_REASONS",
    "AttributesReport",
    "ValidationReport",
    "init_config",
    "load_attributes",
    "map_events",
    "read_attributes",
    "read_events",
    "scan_source",
    "validate_events",
]
