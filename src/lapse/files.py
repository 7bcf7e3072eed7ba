"""Writing files so that a failure is one line and leaves nothing half-written.

Every file lapse writes for a run (audit snapshots, outboxes, dead letters, the
file sink's parts and output, features, training reports) goes through
:func:`atomic_path`: the data goes to a hidden temporary name beside the target,
which appears (an atomic rename) only once the write succeeded. On a failure the
temporary file is removed and an error of the operating system, of Polars' or
pyarrow's writers, or of SQLite (a full disk, permissions, a missing folder)
becomes one :class:`~lapse.exceptions.WriteFailed` naming the path and the cause
(:func:`write_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from lapse.exceptions import WriteFailed

__all__ = ["atomic_path", "save_figure", "temporary", "write_failure"]

# Polars words an I/O failure as "... underlying IO error: No space left on device (os error 28)"
_OS_ERROR = re.compile(r"(?:IO error: )?([^:()]+?) \(os error (\d+)\)")
# how Polars says a write failed when it does not name the OS error
_POLARS_IO = ("transport error", "io error")
# what SQLite says when it cannot write its file
_SQLITE_WRITE = ("disk is full", "disk i/o error", "readonly database", "unable to open database")


def temporary(path: Path) -> Path:
    """The hidden temporary name :func:`atomic_path` writes ``path`` to first."""
    return path.with_name(f".{path.name}.tmp")


def write_failure(path: str | Path, exc: BaseException) -> WriteFailed | None:
    """``exc`` as a :class:`WriteFailed` naming ``path``, or ``None`` when it is no write
    failure (an OS error, Polars' I/O error, SQLite's full disk or unwritable file)."""
    if isinstance(exc, WriteFailed):
        return exc
    if isinstance(exc, OSError):
        return WriteFailed.from_os_error(path, exc)
    if isinstance(exc, pl.exceptions.PolarsError):
        text = str(exc)
        found = _OS_ERROR.search(text)
        if found is not None:
            code = int(found[2])
            return WriteFailed.from_os_error(path, OSError(code, os.strerror(code) or found[1]))
        # Polars' Parquet writer may say only "Invalid thrift: transport error"
        if _no_space(Path(path).parent):
            return WriteFailed.from_os_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        if any(s in text.lower() for s in _POLARS_IO):
            return WriteFailed.from_os_error(path, OSError(errno.EIO, text))
        return None
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if not any(s in text.lower() for s in _SQLITE_WRITE):
            return None
        # SQLite says "disk I/O error" when a full disk refuses its WAL index
        code = errno.ENOSPC if "full" in text or _no_space(Path(path).parent) else errno.EIO
        return WriteFailed.from_os_error(path, OSError(code, f"{os.strerror(code)} ({text})"))
    return None


def _no_space(folder: Path) -> bool:
    """Whether the file system of ``folder`` is full."""
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write ``path``'s content to; rename it into place when
    the block succeeds, remove it and raise :class:`WriteFailed` when the write fails.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     target = Path(folder) / "a.txt"
    ...     with atomic_path(target) as tmp:
    ...         _ = tmp.write_text("done")
    ...     target.read_text(), sorted(p.name for p in Path(folder).iterdir())
    ('done', ['a.txt'])
    """
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        failed = write_failure(path, exc)
        if failed is None or failed is exc:
            raise
        raise failed from None


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure to ``path`` (PNG at 110 dpi) through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    return path
