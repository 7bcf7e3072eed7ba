"""The one exception tree of lapse.

Every error a user can cause derives from :class:`LapseError`; the CLI turns
it into a one-line message and a non-zero exit instead of a traceback::

    LapseError
    ├── ConfigError            a config file or value is invalid
    └── EventsError            event or attribute data cannot be used
        ├── ReadError          a file cannot be read at all
        └── MissingColumnsError required columns are absent
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EventsError",
    "LapseError",
    "MissingColumnsError",
    "ReadError",
]


class LapseError(Exception):
    """Base class of every error lapse raises on purpose."""


class ConfigError(LapseError):
    """A config file is missing, unparsable, or holds an invalid value."""


class EventsError(LapseError):
    """Event (or user attribute) data cannot be used as given."""


class ReadError(EventsError):
    """A file cannot be read: missing, empty, truncated or in another format."""


class MissingColumnsError(EventsError):
    """Required columns are absent from a source after mapping."""
