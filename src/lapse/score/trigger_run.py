"""`lapse triggers run`: score the users touched since the last run and deliver what fired
(state and planning in :mod:`lapse.score.incremental`); no parsing, no printing."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import Ledger, sink_lock
from lapse.events import (
    ValidationReport,
    event_files,
    load_attributes,
    read_links,
    validate_events,
)
from lapse.events import store as event_store
from lapse.events.identity import anonymous_only, person_ids, resolve
from lapse.schema import utc_cutoff
from lapse.score import incremental as inc
from lapse.score.records import score_users
from lapse.score.run import (
    RunContext,
    ScoreProgress,
    ScoreRunResult,
    Silent,
    last_fired,
    load_model,
    model_version,
    new_run_id,
    send_scored,
)
from lapse.sinks import make_sink

__all__ = [
    "TriggerRunResult",
    "run_triggers",
]


@dataclass
class TriggerRunResult:
    """What one `lapse triggers run` did (see :mod:`lapse.score.incremental`).

    ``mode`` is ``full`` or ``incremental`` (``reason`` says why a run was full);
    ``new_files``, ``new_event_users`` and ``due_users`` are what an incremental
    run touched (``touched`` is their union, or everyone with events on a full run);
    ``delivery`` is the shared score-and-deliver result, ``None`` when nobody was
    touched (then nothing was sent).
    """

    as_of: datetime
    mode: Literal["full", "incremental"]
    reason: str
    files: int
    new_files: int
    new_event_users: int
    due_users: int
    touched: int
    fired: int
    seconds: float
    delivery: ScoreRunResult | None = None

    @property
    def complete(self) -> bool:
        """Every record meant for the sink reached it."""
        return self.delivery is None or self.delivery.complete


def run_triggers(
    events: Path,
    config: LapseConfig,
    *,
    as_of: datetime,
    incremental: bool = False,
    model: str | None = None,
    sink: str | None = None,
    out: Path | None = None,
    dry_run: bool = False,
    progress: ScoreProgress | None = None,
) -> TriggerRunResult:
    """Evaluate the triggers as of ``as_of`` and deliver, for everyone or incrementally.

    With ``incremental`` only the users with events in files new since the
    watermark, plus those whose triggers came due, are read, scored, evaluated
    and delivered (:mod:`lapse.score.incremental`); otherwise (and on a first run)
    everyone is, and the watermark and trigger state are rebuilt. Delivery is
    the nightly score's (:func:`run_score`), with its cooldowns, frequency cap,
    delta sync, ledger and ``lapse score --resume``. A dry run leaves the
    watermark where it was.

    Raises
    ------
    LapseError
        Bad input, an unknown model or sink, ``as_of`` before the watermark.
    LockHeldError
        Another run for the same sink is in progress.
    """
    started = time.monotonic()
    as_of = utc_cutoff(as_of)
    report = progress or Silent()
    trail = AuditTrail(config.resolve(config.audit.path))
    target = make_sink(sink or config.sinks.default, config, out=out)
    source = os.path.abspath(events)
    lock = contextlib.nullcontext() if dry_run else sink_lock(trail.locks, target.name)
    with lock, Ledger(trail.ledger) as ledger:
        ctx = RunContext(
            new_run_id(as_of), as_of, config, trail, ledger, target, report, dry_run, started
        )
        loaded = load_model(model, config, report)
        version = model_version(loaded)
        report.stage("looking for new event files")
        files = event_files(events)
        mark = inc.fingerprint(loaded.source, version, config)
        store = event_store.folder(trail.root, target.name, source)
        todo = inc.plan(
            ledger, target.name, source, files, as_of, mark, config, incremental=incremental
        )
        if not todo.full and not event_store.present(store, todo.parts):
            todo = inc.Plan(True, "the folder's event store is missing", files)
        report.stage("reading the touched users' events")
        history: pl.DataFrame | None
        validation: ValidationReport | None = None
        if todo.full:
            # everyone is read: validate as `score` does, so rejected rows are counted
            kept, validation = validate_events(events, config, as_of=as_of)
            links = read_links(events, config)
            parts = [] if dry_run else [event_store.write(store, kept, links)]
            history = resolve(kept.lazy(), links, as_of).collect()
            del kept
            users = history["user_id"].cast(pl.String).unique().sort().to_list()
        else:
            # the touched users' stored events and the new files' (their duplicates dropped)
            fresh, new_links = event_store.read_new(todo.new_files, config)
            links = event_store.union_links([event_store.links(store, todo.parts), new_links])
            ids = person_ids(links, todo.users, as_of)
            stored = event_store.read(store, todo.parts, ids)
            both, added = event_store.combine(stored, fresh, config)
            parts = list(todo.parts)
            if added.height and not dry_run:
                parts = event_store.merge(
                    store, [*parts, event_store.write(store, added, new_links)]
                )
            history = resolve(both.lazy(), links, as_of).collect() if both.height else None
            touched = pl.LazyFrame({"user_id": todo.users}, schema={"user_id": pl.String})
            users = resolve(touched, links, as_of).collect()["user_id"].unique().sort().to_list()
        attributes = load_attributes(config)
        result = TriggerRunResult(
            as_of=as_of,
            mode="full" if todo.full else "incremental",
            reason=todo.reason,
            files=len(files),
            new_files=len(files) if todo.full else len(todo.new_files),
            new_event_users=len(todo.new_event_users),
            due_users=len(todo.due_users),
            touched=len(users),
            fired=0,
            seconds=0.0,
        )
        states: list[Any] = []
        if history is not None and users:
            report.stage("scoring the touched users")
            fired = last_fired(ctx, None if todo.full else todo.users, links=links)
            scored = score_users(
                loaded.bundle,
                history.lazy(),
                as_of,
                config,
                score_run_id=ctx.run_id,
                model_version=version,
                attributes=attributes,
                last_fired=fired,
                subset=not todo.full,
            )
            assert scored.fired is not None
            report.stage("finding when each user is next due")
            due = pl.concat(
                [
                    inc.next_due(
                        loaded.bundle,
                        history,
                        scored.fired,
                        users,
                        as_of,
                        config,
                        attributes=attributes,
                    ),
                    inc.cooldown_due(scored.fired, scored.records, fired, scored.definitions),
                ]
            )
            states = inc.states(scored.fired, due, users, as_of)
            result.fired = int((scored.fired["triggers"].list.len() > 0).sum())
            result.delivery = send_scored(
                ctx,
                loaded,
                scored,
                attributes=attributes,
                validation=validation,
                anonymous=anonymous_only(links, as_of),
                only_scored=not todo.full,
            )
        if not dry_run:
            ledger.advance_watermark(
                target.name,
                source,
                as_of=as_of,
                fingerprint=mark,
                files=[(str(f), size, mtime) for f, size, mtime in files],
                states=states,
                full=todo.full,
                parts=parts,
            )
            event_store.clean(store, parts)
    result.seconds = time.monotonic() - started
    return result
