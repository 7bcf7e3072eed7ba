"""The one exception tree of lapse: every exception class lapse defines lives here.

Every error a user can cause derives from :class:`LapseError`; the CLI turns
it into a one-line message and exits with the class's ``exit_code`` (2 unless
marked below) instead of a traceback; ``docs/exit-codes.md`` has every
command's codes::

    LapseError
    ├── ConfigError             a config file or value is invalid
    │   └── ExprError           a trigger or driver condition cannot be parsed or compiled
    ├── EventsError             event or attribute data cannot be used
    │   ├── ReadError           a file cannot be read at all
    │   └── MissingColumnsError required columns are absent
    ├── ConvergenceProblem      a survival fit did not converge
    ├── NotEnoughEpisodes       too little purchase history for replenishment models
    ├── LockHeldError           another run holds the sink's lock (exit code 3)
    ├── PromotionRefused        the review refused the challenger or was inconclusive (exit 4)
    ├── WriteFailed             a file or store could not be written (exit code 5)
    └── SinkError               a destination refused a whole batch for good
        ├── DeliveryStopped     the run stops, its unsent batches pending (resumable)
        │   ├── SinkAuthError   credentials missing or refused
        │   └── DestinationUnreachable  no connection could be made (exit code 1)
        ├── RetryableError      a transient failure: send the same batch again
        │   └── ConnectionFailed  no connection could be made: nothing was sent
        └── PayloadTooLarge     the batch is too large: split it and resend

    UserWarning
    └── FitWarning              a model fit failed and a fallback is used (a warning,
                                never raised: training goes on)

The modules that raise them re-export the ones their callers catch
(:mod:`lapse.sinks.base` the errors a new sink raises, :mod:`lapse.triggers`
``ExprError``, :mod:`lapse.modeling` ``FitWarning``, ...); lapse's own code
imports them from here. A ``ValueError`` or ``TypeError`` from the Python API
means a wrong argument (a programming mistake, not bad data); config
validators raise ``ValueError`` inside pydantic, which
:func:`lapse.config.load_config` reports as a :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

__all__ = [
    "ConfigError",
    "ConnectionFailed",
    "ConvergenceProblem",
    "DeliveryStopped",
    "DestinationUnreachable",
    "EventsError",
    "ExprError",
    "FitWarning",
    "LapseError",
    "LockHeldError",
    "MissingColumnsError",
    "NotEnoughEpisodes",
    "PayloadTooLarge",
    "PromotionRefused",
    "ReadError",
    "RetryableError",
    "SinkAuthError",
    "SinkError",
    "WriteFailed",
]


class LapseError(Exception):
    """Base class of every error lapse raises on purpose."""

    #: The command line's exit code (2: usage, configuration or input error).
    exit_code: ClassVar[int] = 2


class ConfigError(LapseError):
    """A config file is missing, unparsable, or holds an invalid value."""


class ExprError(ConfigError):
    """A trigger expression cannot be parsed or compiled; ``position`` is 0-based."""

    def __init__(self, message: str, text: str, position: int | None, where: str = "") -> None:
        self.position = position
        self.text = text
        head = f"{where}: " if where else ""
        if position is None:
            super().__init__(f"{head}{message}")
            return
        shown, caret = _excerpt(text, position)
        super().__init__(f"{head}{message} (at position {position + 1})\n    {shown}\n    {caret}^")


def _excerpt(text: str, position: int, width: int = 70) -> tuple[str, str]:
    """The line of ``text`` around ``position`` (cut to ``width``) and the caret's indent."""
    start = max(0, position - width // 2)
    end = min(len(text), start + width)
    piece = text[start:end]
    # show control and invisible characters as escapes so the caret stays aligned
    shown = "".join(c if c.isprintable() and ord(c) < 0x2000 else "?" for c in piece)
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    return prefix + shown + suffix, " " * (len(prefix) + position - start)


class EventsError(LapseError):
    """Event (or user attribute) data cannot be used as given."""


class ReadError(EventsError):
    """A file cannot be read: missing, empty, truncated or in another format."""


class MissingColumnsError(EventsError):
    """Required columns are absent from a source after mapping."""


class ConvergenceProblem(LapseError):
    """A survival fit did not converge; the message names the covariate to look at."""


class NotEnoughEpisodes(LapseError):
    """Too few purchases or too little history to fit and evaluate replenishment models.

    ``lapse train`` catches it to ship the churn model alone, with a note.
    """


class LockHeldError(LapseError):
    """Another run holds the sink's lock."""

    exit_code: ClassVar[int] = 3


class PromotionRefused(LapseError):
    """``lapse promote`` kept the champion: the review refused the challenger or was
    inconclusive (``--force`` overrides it)."""

    exit_code: ClassVar[int] = 4


class WriteFailed(LapseError):
    """A file or store could not be written (a full disk, permissions, a missing folder).

    Build it with :meth:`from_os_error` so the message names the path and the cause;
    ``path`` and ``reason`` keep them (a caller may say what to do instead, ``then``).
    """

    exit_code: ClassVar[int] = 5
    path: str = ""
    reason: str = ""

    @classmethod
    def from_os_error(
        cls, path: str | Path, exc: OSError, *, then: str = "run again"
    ) -> WriteFailed:
        """One line: the path, the operating system's reason, what to do.

        Examples
        --------
        >>> import errno
        >>> str(WriteFailed.from_os_error("/dev/full", OSError(errno.ENOSPC, "No space left")))
        'cannot write /dev/full: No space left; free space or fix the path, then run again'
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        failed = cls(f"cannot write {path}: {reason}; free space or fix the path, then {then}")
        failed.path, failed.reason = str(path), reason
        return failed


class SinkError(LapseError):
    """The destination refused a whole batch for good (its records are dead-lettered)."""


class DeliveryStopped(SinkError):
    """The run stops: the current and later batches stay pending, nothing of them is
    dead-lettered, and ``lapse score --resume`` finishes the run once the cause is fixed."""


class SinkAuthError(DeliveryStopped):
    """Credentials are missing or refused; the run stops and nothing is marked sent."""


class DestinationUnreachable(DeliveryStopped):
    """No connection to the destination could be made (its retries, or the run's retry
    budget, used up); the run stops, resumable, nothing dead-lettered.

    Exit code 1, as for records that failed: the command was right, the records are not
    delivered yet, and ``lapse score --resume`` sends them once the destination is back.
    """

    exit_code: ClassVar[int] = 1


class RetryableError(SinkError):
    """A transient failure (429, 5xx, dropped connection): send the same batch again.

    ``in_doubt``: the request went out and no answer came back (a timeout, a connection
    dropped after sending), so the destination may have processed it.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, in_doubt: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.in_doubt = in_doubt


class ConnectionFailed(RetryableError):
    """No connection could be made (refused, unknown host, connect timeout): nothing was sent."""


class PayloadTooLarge(SinkError):
    """The destination said the batch is too large (413): split it and resend the halves."""


class FitWarning(UserWarning):
    """A model fit failed or did not converge and a fallback is used.

    A warning category, not an error: it is never raised, so it is no
    :class:`LapseError` (the churn race keeps it as a note of the report).
    """
