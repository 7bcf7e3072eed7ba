"""The one exception tree of lapse.

Every error a user can cause derives from :class:`LapseError`; the CLI turns
it into a one-line message and exits with the class's ``exit_code`` instead of
a traceback (the table of every command's codes: ``docs/exit-codes.md``)::

    LapseError                 exit 2: usage, configuration or input error
    ├── ConfigError            a config file or value is invalid
    ├── EventsError            event or attribute data cannot be used
    │   ├── ReadError          a file cannot be read at all
    │   └── MissingColumnsError required columns are absent
    ├── PromotionRefused       exit 4: the review refused the challenger or was inconclusive
    └── WriteFailed            exit 5: a file or store could not be written

``lapse.delivery.ledger.LockHeldError`` (exit 3: another run holds the lock)
derives from :class:`LapseError` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

__all__ = [
    "ConfigError",
    "EventsError",
    "LapseError",
    "MissingColumnsError",
    "PromotionRefused",
    "ReadError",
    "WriteFailed",
]


class LapseError(Exception):
    """Base class of every error lapse raises on purpose."""

    #: The command line's exit code for this error (2: usage, configuration or input).
    exit_code: ClassVar[int] = 2


class ConfigError(LapseError):
    """A config file is missing, unparsable, or holds an invalid value."""


class EventsError(LapseError):
    """Event (or user attribute) data cannot be used as given."""


class ReadError(EventsError):
    """A file cannot be read: missing, empty, truncated or in another format."""


class MissingColumnsError(EventsError):
    """Required columns are absent from a source after mapping."""


class PromotionRefused(LapseError):
    """``lapse promote`` kept the champion: the review refused the challenger or was
    inconclusive (``--force`` overrides it)."""

    exit_code: ClassVar[int] = 4


class WriteFailed(LapseError):
    """A file or store could not be written (full disk, permissions, a missing folder).

    Build it with :meth:`from_os_error` so the message names the path and the cause.
    """

    exit_code: ClassVar[int] = 5

    @classmethod
    def from_os_error(cls, path: str | Path, exc: OSError) -> WriteFailed:
        """One line: the path, the operating system's reason, what to do.

        Examples
        --------
        >>> import errno
        >>> str(WriteFailed.from_os_error("/dev/full", OSError(errno.ENOSPC, "No space left")))
        'cannot write /dev/full: No space left; free space or fix the path, then run again'
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        return cls(f"cannot write {path}: {reason}; free space or fix the path, then run again")
