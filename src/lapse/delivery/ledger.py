"""Durable run state: the score-run ledger (SQLite) and one lock per sink.

The ledger lives beside the audit snapshots (``<audit.path>/ledger.sqlite``) and
holds, per score run and sink: the run (its status and summary), each batch's
row range in the run's outbox and its state, the records a destination rejected,
per sink and user, the delta key last delivered (delta sync), and per sink,
trigger and user the day a trigger was last delivered (cooldowns), and per sink,
user and run the day a message (a record carrying triggers) was delivered (the
frequency cap of :mod:`lapse.delivery.batches`). For incremental trigger runs
(:mod:`lapse.score.incremental`) it also holds, per sink and event source, the watermark (the
files processed with their size and mtime, the last ``as_of`` and a fingerprint
of the model and trigger definitions), the parts of its event store
(:mod:`lapse.events.store`) and the trigger state (per user: the
triggers that fired at the last evaluation, when, and when the user is next
due), and the watermark a trigger run stages before it delivers (advanced after
its delivery, or by the next run if it was cut off in between). Every change
is one SQLite transaction, so a process killed at any instant (SIGKILL
included) leaves a consistent ledger: a batch is ``done`` only after its
destination acknowledged it.

A run's ``status`` goes ``preparing`` (recorded as it starts, before its audit
snapshot says anything was sent) -> ``running`` (its batches planned, its outbox
written) -> ``complete``, ``partial`` (records failed) or ``interrupted`` (stopped,
resumable); ``abandoned`` is a run cut off while ``preparing``, whose files were
removed. A batch goes ``pending`` -> ``sending`` (marked before each request:
a batch still ``sending`` when a run is resumed may have reached its destination,
its delivery is *in doubt*; the records whose undeduped objects were in doubt
are kept, so a run's summary counts them over all its attempts) -> ``done``,
``failed`` or ``split``. A ``preparing``
or ``running`` run whose sink lock is free was cut off (its process died).
A write the disk refuses is one :class:`~lapse.exceptions.WriteFailed` naming the
ledger file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from lapse.exceptions import LapseError, LockHeldError
from lapse.files import write_failure

__all__ = [
    "CUT_OFF",
    "DELIVERED",
    "Batch",
    "Ledger",
    "RunInfo",
    "TriggerState",
    "Watermark",
    "WatermarkUpdate",
    "sink_lock",
]

BatchState = Literal["pending", "sending", "done", "failed", "split"]
#: Statuses of a run whose process may have died before it finished (see the module docstring).
CUT_OFF = ("preparing", "running")
#: Statuses of a run that delivered (``lapse impact`` reads only these runs' snapshots).
DELIVERED = ("complete", "partial")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    score_run_id TEXT NOT NULL, sink TEXT NOT NULL, as_of TEXT NOT NULL,
    model TEXT NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
    started TEXT NOT NULL, finished TEXT, summary TEXT,
    PRIMARY KEY (score_run_id, sink));
CREATE TABLE IF NOT EXISTS batches (
    score_run_id TEXT NOT NULL, sink TEXT NOT NULL, batch_id TEXT NOT NULL,
    start INTEGER NOT NULL, stop INTEGER NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, updated TEXT NOT NULL,
    PRIMARY KEY (score_run_id, sink, batch_id));
CREATE TABLE IF NOT EXISTS failures (
    score_run_id TEXT NOT NULL, sink TEXT NOT NULL, batch_id TEXT NOT NULL,
    row INTEGER NOT NULL, user_id TEXT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (score_run_id, sink, row));
CREATE TABLE IF NOT EXISTS delivered (
    sink TEXT NOT NULL, user_id TEXT NOT NULL, delta_key TEXT NOT NULL,
    risk_segment TEXT, score_run_id TEXT NOT NULL, as_of TEXT NOT NULL,
    PRIMARY KEY (sink, user_id));
CREATE TABLE IF NOT EXISTS trigger_fired (
    sink TEXT NOT NULL, trigger TEXT NOT NULL, user_id TEXT NOT NULL,
    last_fired TEXT NOT NULL, score_run_id TEXT NOT NULL,
    PRIMARY KEY (sink, trigger, user_id));
CREATE INDEX IF NOT EXISTS trigger_fired_by_user ON trigger_fired (sink, user_id);
CREATE TABLE IF NOT EXISTS messages (
    sink TEXT NOT NULL, user_id TEXT NOT NULL, score_run_id TEXT NOT NULL,
    day TEXT NOT NULL, PRIMARY KEY (sink, user_id, score_run_id));
CREATE INDEX IF NOT EXISTS messages_by_day ON messages (sink, day);
CREATE TABLE IF NOT EXISTS watermarks (
    sink TEXT NOT NULL, source TEXT NOT NULL, as_of TEXT NOT NULL, fingerprint TEXT NOT NULL,
    updated TEXT NOT NULL, PRIMARY KEY (sink, source));
CREATE TABLE IF NOT EXISTS watermark_files (
    sink TEXT NOT NULL, source TEXT NOT NULL, file TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, PRIMARY KEY (sink, source, file));
CREATE TABLE IF NOT EXISTS trigger_state (
    sink TEXT NOT NULL, source TEXT NOT NULL, user_id TEXT NOT NULL, fired TEXT NOT NULL,
    evaluated_at TEXT NOT NULL, next_due TEXT NOT NULL, PRIMARY KEY (sink, source, user_id));
CREATE INDEX IF NOT EXISTS trigger_state_due ON trigger_state (sink, source, next_due);
CREATE TABLE IF NOT EXISTS event_parts (
    sink TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL, part TEXT NOT NULL,
    PRIMARY KEY (sink, source, seq));
CREATE TABLE IF NOT EXISTS in_doubt (
    score_run_id TEXT NOT NULL, sink TEXT NOT NULL, row INTEGER NOT NULL, user_id TEXT NOT NULL,
    PRIMARY KEY (score_run_id, sink, row));
CREATE TABLE IF NOT EXISTS staged_watermarks (
    score_run_id TEXT NOT NULL, sink TEXT NOT NULL, source TEXT NOT NULL, as_of TEXT NOT NULL,
    fingerprint TEXT NOT NULL, full INTEGER NOT NULL, files TEXT NOT NULL, states TEXT NOT NULL,
    parts TEXT, PRIMARY KEY (score_run_id, sink, source));
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Batch:
    """Rows ``[start, stop)`` of a run's outbox, sent as one request."""

    batch_id: str
    start: int
    stop: int
    state: BatchState
    attempts: int = 0
    reason: str | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RunInfo:
    """A score run for one sink, as the ledger knows it."""

    score_run_id: str
    sink: str
    as_of: datetime
    model: str
    target: str
    status: str
    started: str
    finished: str | None
    summary: dict[str, Any]


@dataclass(frozen=True)
class Watermark:
    """What the incremental trigger runs of one event source have processed.

    ``files`` maps each processed file (its resolved path) to ``(size, mtime_ns)``;
    ``parts`` names the parts of the event store holding their events
    (:mod:`lapse.events.store`), oldest first.
    """

    sink: str
    source: str
    as_of: datetime
    fingerprint: str
    files: dict[str, tuple[int, int]]
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WatermarkUpdate:
    """What a trigger run records once it has delivered (:meth:`Ledger.advance_watermark`):
    the ``files`` processed (``(path, size, mtime_ns)``) as of ``as_of``, the model and
    trigger ``fingerprint``, the users' new ``states`` (``full``: they replace every
    state) and, when given, the event store's ``parts``."""

    as_of: datetime
    fingerprint: str
    files: Sequence[tuple[str, int, int]]
    states: Sequence[TriggerState]
    full: bool = False
    parts: Sequence[str] | None = None


@dataclass(frozen=True)
class TriggerState:
    """One user's trigger state: what fired at ``evaluated_at``, and when to look again."""

    user_id: str
    fired: tuple[str, ...]
    evaluated_at: datetime
    next_due: datetime


class Ledger:
    """The SQLite run ledger (one file for every sink; see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._writing():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write the disk refuses (full, read-only, I/O error) as one WriteFailed."""
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            failed = write_failure(self.path, exc)
            if failed is None:
                raise
            raise failed from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- runs -------------------------------------------------------------------------------
    def begin_run(
        self, score_run_id: str, sink: str, *, as_of: datetime, model: str, target: str
    ) -> None:
        """Record a new run, ``preparing``: it exists before anything says it was sent."""
        with self._tx() as db:
            self._insert_run(db, score_run_id, sink, as_of, model, target)

    def plan(self, score_run_id: str, sink: str, batches: Sequence[tuple[int, int]]) -> None:
        """Record a ``preparing`` run's planned batches (row ranges of its outbox, written
        by now): the run is ``running``, and ``lapse score --resume`` can finish it."""
        with self._tx() as db:
            self._insert_batches(db, score_run_id, sink, batches)

    def start_run(
        self,
        score_run_id: str,
        sink: str,
        *,
        as_of: datetime,
        model: str,
        target: str,
        batches: Sequence[tuple[int, int]],
    ) -> None:
        """Record a new run and its planned batches at once (:meth:`begin_run` and :meth:`plan`)."""
        with self._tx() as db:
            self._insert_run(db, score_run_id, sink, as_of, model, target)
            self._insert_batches(db, score_run_id, sink, batches)

    @staticmethod
    def _insert_run(
        db: sqlite3.Connection,
        score_run_id: str,
        sink: str,
        as_of: datetime,
        model: str,
        target: str,
    ) -> None:
        db.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'preparing', ?, NULL, NULL)",
            (score_run_id, sink, as_of.isoformat(), model, target, _now()),
        )

    @staticmethod
    def _insert_batches(
        db: sqlite3.Connection, score_run_id: str, sink: str, batches: Sequence[tuple[int, int]]
    ) -> None:
        now = _now()
        db.executemany(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, 'pending', 0, NULL, ?)",
            [
                (score_run_id, sink, f"b{i:06d}", start, stop, now)
                for i, (start, stop) in enumerate(batches)
            ],
        )
        db.execute(
            "UPDATE runs SET status = 'running' WHERE score_run_id = ? AND sink = ?",
            (score_run_id, sink),
        )

    def run(self, score_run_id: str, sink: str | None = None) -> RunInfo:
        """The run ``score_run_id`` (for ``sink``, or its only sink)."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE score_run_id = ?"
            + (" AND sink = ?" if sink else "")
            + " ORDER BY started, rowid",
            (score_run_id, sink) if sink else (score_run_id,),
        ).fetchall()
        if not rows:
            known = [
                r[0]
                for r in self._db.execute(
                    "SELECT score_run_id FROM runs ORDER BY started DESC, rowid DESC LIMIT 5"
                )
            ]
            raise LapseError(
                f"score run {score_run_id!r}"
                + (f" for sink {sink!r}" if sink else "")
                + f" is not in the ledger {self.path}; recent runs: {', '.join(known) or 'none'}"
            )
        if len(rows) > 1:
            sinks = ", ".join(r[1] for r in rows)
            raise LapseError(
                f"score run {score_run_id!r} went to several sinks ({sinks}); name one"
            )
        r = rows[0]
        return RunInfo(
            score_run_id=r[0],
            sink=r[1],
            as_of=datetime.fromisoformat(r[2]),
            model=r[3],
            target=r[4],
            status=r[5],
            started=r[6],
            finished=r[7],
            summary=json.loads(r[8]) if r[8] else {},
        )

    def finish_run(
        self, score_run_id: str, sink: str, status: str, summary: dict[str, Any] | None = None
    ) -> None:
        """Set a run's status (``summary``: its audit summary, kept when ``None``)."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, summary = COALESCE(?, summary) "
                "WHERE score_run_id = ? AND sink = ?",
                (
                    status,
                    _now(),
                    None if summary is None else json.dumps(summary, default=str),
                    score_run_id,
                    sink,
                ),
            )

    def cut_off(self, sink: str, *, besides: str) -> list[RunInfo]:
        """The runs of ``sink`` other than ``besides`` still ``preparing`` or ``running``:
        called with the sink's lock held, their process died (oldest first)."""
        rows = self._db.execute(
            "SELECT score_run_id FROM runs WHERE sink = ? AND score_run_id != ? "
            f"AND status IN ({','.join('?' * len(CUT_OFF))}) ORDER BY started, rowid",
            (sink, besides, *CUT_OFF),
        ).fetchall()
        return [self.run(r[0], sink) for r in rows]

    def delivered_runs(self) -> set[str]:
        """The ``score_run_id`` of every run whose delivery finished (complete or partial)."""
        marks = ",".join("?" * len(DELIVERED))
        return {
            r[0]
            for r in self._db.execute(
                f"SELECT score_run_id FROM runs WHERE status IN ({marks})", DELIVERED
            )
        }

    def runs(self) -> list[tuple[str, str, str]]:
        """``(score_run_id, sink, started)`` of every run, oldest first (ties: in start order)."""
        return [
            (r[0], r[1], r[2])
            for r in self._db.execute(
                "SELECT score_run_id, sink, started FROM runs ORDER BY started, rowid"
            )
        ]

    # -- batches -----------------------------------------------------------------------------
    def batches(self, score_run_id: str, sink: str) -> list[Batch]:
        """Every batch of a run, in outbox order."""
        rows = self._db.execute(
            "SELECT batch_id, start, stop, state, attempts, reason FROM batches "
            "WHERE score_run_id = ? AND sink = ? ORDER BY start, batch_id",
            (score_run_id, sink),
        ).fetchall()
        return [Batch(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def split(
        self, score_run_id: str, sink: str, batch: Batch, *, in_doubt: bool = False
    ) -> tuple[Batch, Batch]:
        """Replace ``batch`` by its two halves (after a 413); halves of a batch whose
        delivery is ``in_doubt`` stay in doubt (``sending``)."""
        mid = batch.start + batch.size // 2
        state: BatchState = "sending" if in_doubt else "pending"
        halves = (
            Batch(f"{batch.batch_id}.0", batch.start, mid, state),
            Batch(f"{batch.batch_id}.1", mid, batch.stop, state),
        )
        now = _now()
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET state = 'split', updated = ? "
                "WHERE score_run_id = ? AND sink = ? AND batch_id = ?",
                (now, score_run_id, sink, batch.batch_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?)",
                [(score_run_id, sink, h.batch_id, h.start, h.stop, state, now) for h in halves],
            )
        return halves

    def mark(self, score_run_id: str, sink: str, batch_id: str, state: BatchState) -> None:
        """Set a batch's state: ``sending`` before its request goes out, back to ``pending``
        when nothing of it was sent (see the module docstring)."""
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET state = ?, updated = ? "
                "WHERE score_run_id = ? AND sink = ? AND batch_id = ?",
                (state, _now(), score_run_id, sink, batch_id),
            )

    def attempt(self, score_run_id: str, sink: str, batch_id: str) -> None:
        """Count one more try of a batch (retries show in the summary)."""
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET attempts = attempts + 1, updated = ? "
                "WHERE score_run_id = ? AND sink = ? AND batch_id = ?",
                (_now(), score_run_id, sink, batch_id),
            )

    def done(
        self,
        score_run_id: str,
        sink: str,
        batch: Batch,
        *,
        failures: Iterable[tuple[int, str, str]] = (),
        delivered: Iterable[tuple[str, str, str | None]] = (),
        as_of: datetime | None = None,
    ) -> None:
        """Mark a batch acknowledged, with the rows it rejected and the delta keys it took.

        ``failures`` are ``(row, user_id, reason)``; ``delivered`` are
        ``(user_id, delta_key, risk_segment)`` of the accepted records (delta-sync sinks).
        """
        now = _now()
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET state = 'done', reason = NULL, updated = ? "
                "WHERE score_run_id = ? AND sink = ? AND batch_id = ?",
                (now, score_run_id, sink, batch.batch_id),
            )
            self._replace_failures(db, score_run_id, sink, batch, failures)
            db.executemany(
                "INSERT OR REPLACE INTO delivered VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (sink, user, key, seg, score_run_id, (as_of or datetime.now(UTC)).isoformat())
                    for user, key, seg in delivered
                ],
            )

    def failed(
        self,
        score_run_id: str,
        sink: str,
        batch: Batch,
        reason: str,
        rows: Sequence[tuple[int, str]],
    ) -> None:
        """Mark a batch failed for this attempt of the run; ``rows`` are ``(row, user_id)``."""
        with self._tx() as db:
            db.execute(
                "UPDATE batches SET state = 'failed', reason = ?, updated = ? "
                "WHERE score_run_id = ? AND sink = ? AND batch_id = ?",
                (reason, _now(), score_run_id, sink, batch.batch_id),
            )
            failures = [(r, u, reason) for r, u in rows]
            self._replace_failures(db, score_run_id, sink, batch, failures)

    @staticmethod
    def _replace_failures(
        db: sqlite3.Connection,
        score_run_id: str,
        sink: str,
        batch: Batch,
        rows: Iterable[tuple[int, str, str]],
    ) -> None:
        db.execute(
            "DELETE FROM failures WHERE score_run_id = ? AND sink = ? AND row >= ? AND row < ?",
            (score_run_id, sink, batch.start, batch.stop),
        )
        db.executemany(
            "INSERT INTO failures VALUES (?, ?, ?, ?, ?, ?)",
            [(score_run_id, sink, batch.batch_id, r, u, why) for r, u, why in rows],
        )

    def record_in_doubt(
        self, score_run_id: str, sink: str, rows: Sequence[tuple[int, str]]
    ) -> None:
        """Keep the ``(row, user_id)`` of records whose undeduped objects are in doubt."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO in_doubt VALUES (?, ?, ?, ?)",
                [(score_run_id, sink, r, u) for r, u in rows],
            )

    def in_doubt(self, score_run_id: str, sink: str) -> int:
        """How many records of the run had undeduped objects in doubt, over all its attempts."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM in_doubt WHERE score_run_id = ? AND sink = ?",
            (score_run_id, sink),
        ).fetchone()
        return int(row[0])

    def failures(self, score_run_id: str, sink: str) -> list[tuple[int, str, str, str]]:
        """``(row, user_id, batch_id, reason)`` of every record that did not get through."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in self._db.execute(
                "SELECT row, user_id, batch_id, reason FROM failures "
                "WHERE score_run_id = ? AND sink = ? ORDER BY row",
                (score_run_id, sink),
            )
        ]

    # -- delta sync -------------------------------------------------------------------------
    def delivered(
        self, sink: str, *, users: Sequence[str] | None = None
    ) -> dict[str, tuple[str, str | None]]:
        """``user_id -> (delta_key, risk_segment)`` last acknowledged by ``sink``.

        ``users`` limits the answer to those users (a chunked caller's bounded read).
        """
        sql = "SELECT user_id, delta_key, risk_segment FROM delivered WHERE sink = ?"
        return {r[0]: (r[1], r[2]) for r in self._for_users(sql, (sink,), users)}

    def deliveries(
        self, sink: str, *, users: Sequence[str] | None = None
    ) -> list[tuple[str, str, str | None, datetime, str]]:
        """``(user_id, delta_key, risk_segment, as_of, score_run_id)`` last acknowledged by
        ``sink`` per user, with the run that delivered it (``users`` only, if given)."""
        sql = (
            "SELECT user_id, delta_key, risk_segment, as_of, score_run_id FROM delivered "
            "WHERE sink = ?"
        )
        return [
            (r[0], r[1], r[2], datetime.fromisoformat(r[3]), r[4])
            for r in self._for_users(sql, (sink,), users)
        ]

    def _for_users(
        self, sql: str, params: tuple[str, ...], users: Sequence[str] | None, tail: str = ""
    ) -> Iterator[Any]:
        """Rows of ``sql + tail``, with ``AND user_id IN (...)`` per chunk of ``users`` when given."""
        if users is None:
            yield from self._db.execute(sql + tail, params)
            return
        for chunk in _chunks(list(users), 500):
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(f"{sql} AND user_id IN ({marks}){tail}", (*params, *chunk))

    # -- trigger cooldowns -------------------------------------------------------------------
    def fired(
        self, sink: str, *, users: Sequence[str] | None = None
    ) -> list[tuple[str, str, date]]:
        """``(trigger, user_id, last_fired)`` of every trigger delivered to ``sink``.

        ``users`` limits the answer to those users.
        """
        sql = "SELECT trigger, user_id, last_fired FROM trigger_fired WHERE sink = ?"
        return [
            (r[0], r[1], date.fromisoformat(r[2])) for r in self._for_users(sql, (sink,), users)
        ]

    def record_fired(
        self, sink: str, rows: Iterable[tuple[str, str]], *, on: date, score_run_id: str
    ) -> None:
        """Remember that ``(trigger, user_id)`` pairs reached ``sink`` on day ``on``.

        A date never moves back (resuming or re-running an older day keeps the later one).
        """
        with self._tx() as db:
            db.executemany(
                "INSERT INTO trigger_fired VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sink, trigger, user_id) DO UPDATE SET "
                "last_fired = excluded.last_fired, score_run_id = excluded.score_run_id "
                "WHERE excluded.last_fired > trigger_fired.last_fired",
                [(sink, t, u, on.isoformat(), score_run_id) for t, u in rows],
            )

    # -- frequency cap -----------------------------------------------------------------------
    def messages(
        self,
        sink: str,
        *,
        since: date,
        until: date,
        exclude_run: str | None = None,
        users: Sequence[str] | None = None,
    ) -> dict[str, int]:
        """``user_id -> messages`` delivered to ``sink`` on days ``since..until`` (inclusive).

        ``exclude_run`` leaves out one run's own messages (a resumed run counts what came
        before); ``users`` limits the answer to those users.
        """
        sql = (
            "SELECT user_id, COUNT(*) FROM messages WHERE sink = ? AND day >= ? AND day <= ? "
            "AND score_run_id != ?"
        )
        params = (sink, since.isoformat(), until.isoformat(), exclude_run or "")
        return {r[0]: r[1] for r in self._for_users(sql, params, users, " GROUP BY user_id")}

    def record_messages(
        self, sink: str, user_ids: Iterable[str], *, on: date, score_run_id: str
    ) -> None:
        """Remember that each user got one message from ``sink`` in run ``score_run_id``.

        One row per user and run: recording a run again (a resume) changes nothing.
        """
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)",
                [(sink, u, score_run_id, on.isoformat()) for u in user_ids],
            )

    # -- incremental trigger runs ------------------------------------------------------------
    def watermark(self, sink: str, source: str) -> Watermark | None:
        """The watermark of event source ``source`` for ``sink``, ``None`` before a first run."""
        row = self._db.execute(
            "SELECT as_of, fingerprint FROM watermarks WHERE sink = ? AND source = ?",
            (sink, source),
        ).fetchone()
        if row is None:
            return None
        files = {
            r[0]: (r[1], r[2])
            for r in self._db.execute(
                "SELECT file, size, mtime_ns FROM watermark_files WHERE sink = ? AND source = ?",
                (sink, source),
            )
        }
        parts = tuple(
            r[0]
            for r in self._db.execute(
                "SELECT part FROM event_parts WHERE sink = ? AND source = ? ORDER BY seq",
                (sink, source),
            )
        )
        return Watermark(sink, source, datetime.fromisoformat(row[0]), row[1], files, parts)

    def due(self, sink: str, source: str, as_of: datetime) -> list[str]:
        """Users of ``source`` (for ``sink``) whose ``next_due`` is at or before ``as_of``."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT user_id FROM trigger_state WHERE sink = ? AND source = ? "
                "AND next_due <= ? ORDER BY user_id",
                (sink, source, _instant(as_of)),
            )
        ]

    def trigger_states(self, sink: str, source: str) -> list[TriggerState]:
        """Every user's trigger state for ``source`` and ``sink``, by user."""
        return [
            TriggerState(r[0], tuple(json.loads(r[1])), _parse(r[2]), _parse(r[3]))
            for r in self._db.execute(
                "SELECT user_id, fired, evaluated_at, next_due FROM trigger_state "
                "WHERE sink = ? AND source = ? ORDER BY user_id",
                (sink, source),
            )
        ]

    def stage_watermark(
        self, score_run_id: str, sink: str, source: str, update: WatermarkUpdate
    ) -> None:
        """Keep the ``update`` :meth:`advance_watermark` will record once run
        ``score_run_id`` has delivered, so that a run cut off in between is advanced by
        the next one (the event store's parts with it: they hold the events of the files it
        processed)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO staged_watermarks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    score_run_id,
                    sink,
                    source,
                    update.as_of.isoformat(),
                    update.fingerprint,
                    int(update.full),
                    json.dumps([list(f) for f in update.files]),
                    json.dumps([_state_row(s) for s in update.states]),
                    None if update.parts is None else json.dumps(list(update.parts)),
                ),
            )

    def staged_watermarks(self, sink: str, source: str) -> list[str]:
        """The runs (oldest first) whose staged watermark for ``source`` is not advanced yet."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT score_run_id FROM staged_watermarks WHERE sink = ? AND source = ? "
                "ORDER BY as_of, score_run_id",
                (sink, source),
            )
        ]

    def advance_staged(self, score_run_id: str, sink: str, source: str) -> None:
        """:meth:`advance_watermark` with what run ``score_run_id`` staged."""
        row = self._db.execute(
            "SELECT as_of, fingerprint, full, files, states, parts FROM staged_watermarks "
            "WHERE score_run_id = ? AND sink = ? AND source = ?",
            (score_run_id, sink, source),
        ).fetchone()
        if row is None:
            return
        update = WatermarkUpdate(
            as_of=datetime.fromisoformat(row[0]),
            fingerprint=row[1],
            files=[(f, size, mtime) for f, size, mtime in json.loads(row[3])],
            states=[
                TriggerState(u, tuple(fired), _parse(at), _parse(due))
                for u, fired, at, due in json.loads(row[4])
            ],
            full=bool(row[2]),
            parts=None if row[5] is None else json.loads(row[5]),
        )
        self.advance_watermark(sink, source, update, staged_by=score_run_id)

    def drop_staged(self, score_run_id: str) -> None:
        """Forget a run's staged watermark (it delivered nothing: the next run redoes it)."""
        with self._tx() as db:
            db.execute("DELETE FROM staged_watermarks WHERE score_run_id = ?", (score_run_id,))

    def advance_watermark(
        self, sink: str, source: str, update: WatermarkUpdate, *, staged_by: str | None = None
    ) -> None:
        """In one transaction: the ``update``'s files, ``as_of``, states and event store
        parts (when given, they replace the list); and, ``staged_by`` a run, that run's
        staged watermark is gone.

        A ``full`` update replaces every state of ``source`` (a full evaluation) instead
        of updating the given users only; the file list is always replaced.
        """
        with self._tx() as db:
            if staged_by is not None:
                db.execute(
                    "DELETE FROM staged_watermarks WHERE score_run_id = ? AND sink = ? "
                    "AND source = ?",
                    (staged_by, sink, source),
                )
            db.execute(
                "INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?, ?)",
                (sink, source, update.as_of.isoformat(), update.fingerprint, _now()),
            )
            where = "WHERE sink = ? AND source = ?"
            db.execute(f"DELETE FROM watermark_files {where}", (sink, source))
            db.executemany(
                "INSERT INTO watermark_files VALUES (?, ?, ?, ?, ?)",
                [(sink, source, f, size, mtime) for f, size, mtime in update.files],
            )
            if update.parts is not None:
                db.execute(f"DELETE FROM event_parts {where}", (sink, source))
                db.executemany(
                    "INSERT INTO event_parts VALUES (?, ?, ?, ?)",
                    [(sink, source, seq, part) for seq, part in enumerate(update.parts)],
                )
            if update.full:
                db.execute(f"DELETE FROM trigger_state {where}", (sink, source))
            rows = [_state_row(s) for s in update.states]
            db.executemany(
                "INSERT OR REPLACE INTO trigger_state VALUES (?, ?, ?, ?, ?, ?)",
                [(sink, source, u, json.dumps(fired), at, due) for u, fired, at, due in rows],
            )

    # -- erasure -----------------------------------------------------------------------------
    def forget(self, user_ids: Sequence[str]) -> int:
        """Delete every row about these users (their staged trigger states too); returns how
        many rows went."""
        n = 0
        gone = set(user_ids)
        with self._tx() as db:
            for table in (
                "failures",
                "delivered",
                "trigger_fired",
                "messages",
                "trigger_state",
                "in_doubt",
            ):
                for chunk in _chunks(list(user_ids), 500):
                    marks = ",".join("?" * len(chunk))
                    cur = db.execute(f"DELETE FROM {table} WHERE user_id IN ({marks})", chunk)
                    n += cur.rowcount
            for key, states in db.execute("SELECT rowid, states FROM staged_watermarks").fetchall():
                rows = json.loads(states)
                kept = [r for r in rows if r[0] not in gone]
                if len(kept) < len(rows):
                    n += len(rows) - len(kept)
                    db.execute(
                        "UPDATE staged_watermarks SET states = ? WHERE rowid = ?",
                        (json.dumps(kept), key),
                    )
        return n

    def drop_runs(self, score_run_ids: Sequence[str]) -> None:
        """Forget runs entirely (retention): their batches, failures and staged watermarks go too."""
        with self._tx() as db:
            for table in ("runs", "batches", "failures", "in_doubt", "staged_watermarks"):
                db.executemany(
                    f"DELETE FROM {table} WHERE score_run_id = ?", [(r,) for r in score_run_ids]
                )


def _state_row(s: TriggerState) -> tuple[str, list[str], str, str]:
    """A trigger state as stored: user, fired triggers, evaluated at, next due."""
    return (s.user_id, list(s.fired), _instant(s.evaluated_at), _instant(s.next_due))


def _instant(ts: datetime) -> str:
    """A UTC instant as fixed-width text, so SQLite compares them in time order
    (``isoformat``: the same text as a ``strftime`` of it, in a third of the time)."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@contextlib.contextmanager
def sink_lock(directory: str | Path, sink: str, job: str) -> Iterator[Path]:
    """Hold ``<directory>/<sink>.lock`` for the block, or raise :class:`LockHeldError`.

    ``job`` (``"lapse score"``, ``"lapse forget"``...) is written in the lock, so the
    job that finds it held can say which one holds it.

    An OS file lock (``flock``): the kernel releases it when the process dies,
    so a killed run never leaves a stale lock behind.
    """
    path = Path(directory) / f"{sink}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another job holds it"
            raise LockHeldError(
                f"sink {sink!r} is busy: {holder} (lock {path}); wait for it to finish "
                "and start again, one job at a time works on a sink's runs"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"`{job}` is running, pid {os.getpid()} since {_now()}".encode(), 0)
        yield path
    finally:
        os.close(fd)
