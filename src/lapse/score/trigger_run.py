"""`lapse triggers run`: score the users touched since the last run and deliver what fired
(state and planning in :mod:`lapse.score.incremental`); no parsing, no printing."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import DELIVERED, WatermarkUpdate
from lapse.events import (
    ValidationReport,
    event_files,
    load_attributes,
    validate_with_links,
)
from lapse.events import store as event_store
from lapse.events.identity import Persons, union_links
from lapse.events.mapping import MESSAGE_ID
from lapse.events.readers import EventSource, as_polars, frame_name
from lapse.exceptions import LapseError
from lapse.faults import fault_point
from lapse.registry import LoadedBundle
from lapse.schema import utc_cutoff
from lapse.score import incremental as inc
from lapse.score.records import score_users
from lapse.score.run import send_scored
from lapse.score.steps import (
    RunContext,
    ScoreProgress,
    ScoreRunResult,
    Silent,
    last_fired,
    load_model,
    model_version,
    note,
    open_run,
    recorded,
)

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
    touched (then nothing was sent); ``warnings`` are the delivery's.
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

    @property
    def warnings(self) -> list[str]:
        """The delivery's warnings (none without a delivery)."""
        return list(self.delivery.warnings) if self.delivery else []


def run_triggers(
    events: EventSource,
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

    ``events`` may be a source-shaped frame for a full run (no watermark is kept:
    there are no files to watch); an incremental run needs a folder of files.

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
    events = as_polars(events)
    source = os.path.abspath(events) if isinstance(events, str | Path) else frame_name(events)
    with open_run(
        events,
        config,
        trail,
        as_of=as_of,
        sink=sink,
        out=out,
        dry_run=dry_run,
        progress=report,
        started=started,
        job="lapse triggers run",
    ) as ctx:
        loaded = load_model(model, config, report)
        with recorded(ctx, loaded):
            result = _evaluate(ctx, loaded, events, source, incremental=incremental)
    result.seconds = time.monotonic() - started
    return result


def _catch_up(ctx: RunContext, source: str) -> None:
    """Advance the watermark a trigger run of this folder and sink staged but did not advance
    (cut off after its delivery, which :func:`lapse.score.steps.recover_cut_off` has finished
    by now), so its users are not evaluated and sent again; drop what a run that did not
    deliver, or an older one, staged."""
    sink, ledger = ctx.sink.name, ctx.ledger
    mark = ledger.watermark(sink, source)
    for run_id in ledger.staged_watermarks(sink, source):
        try:
            info = ledger.run(run_id, sink)
        except LapseError:  # pruned or dropped: nothing of it to advance
            ledger.drop_staged(run_id)
            continue
        if info.status in DELIVERED and (mark is None or info.as_of >= mark.as_of):
            ledger.advance_staged(run_id, sink, source)
            note(
                ctx,
                f"trigger run {run_id} was cut off after it delivered; its watermark is "
                "advanced now, so its users are not sent again",
            )
        else:
            ledger.drop_staged(run_id)


def _evaluate(
    ctx: RunContext,
    loaded: LoadedBundle,
    events: EventSource,
    source: str,
    *,
    incremental: bool,
) -> TriggerRunResult:
    """A trigger run once recorded: plan, read, score and deliver, then advance the watermark
    (after delivery: a run cut off before that is simply done again, and the next run
    finishes what it had not delivered first; see :func:`lapse.score.steps.recover_cut_off`)."""
    config, as_of, report, ledger, target = (
        ctx.config,
        ctx.as_of,
        ctx.progress,
        ctx.ledger,
        ctx.sink,
    )
    version = model_version(loaded)
    if not ctx.dry_run:
        _catch_up(ctx, source)  # a frame's name never staged a watermark: a no-op
    report.stage("looking for new event files")
    # a frame has no files: a full run reads it all, an incremental one is refused
    in_memory = not isinstance(events, str | Path)
    files = [] if in_memory and not incremental else event_files(events)
    mark = inc.fingerprint(loaded.source, version, config)
    store = event_store.folder(ctx.trail.root, target.name, source)
    todo = inc.plan(
        ledger, target.name, source, files, as_of, mark, config, incremental=incremental
    )
    if not todo.full and not event_store.present(store, todo.parts):
        todo = inc.Plan(True, "the folder's event store is missing", files)
    report.stage("reading the touched users' events")
    read = _read(ctx, events, store, todo, keep=not (ctx.dry_run or in_memory))
    history, validation, persons, users, parts = (
        read.history,
        read.validation,
        read.persons,
        read.users,
        read.parts,
    )
    attributes = load_attributes(config)
    processed = [(str(f), size, mtime) for f, size, mtime in files]
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
    keep = not ctx.dry_run and not in_memory
    update: WatermarkUpdate | None = None
    if history is not None and users:
        report.stage("scoring the touched users")
        fired = last_fired(ctx, None if todo.full else todo.users, persons=persons)
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
                    refilled=scored.refills,
                ),
                inc.cooldown_due(scored.fired, scored.records, fired, scored.definitions),
            ]
        )
        states = inc.states(scored.fired, due, users, as_of)
        result.fired = int((scored.fired["triggers"].list.len() > 0).sum())
        update = WatermarkUpdate(as_of, mark, processed, states, todo.full, parts)
        if keep:
            ledger.stage_watermark(ctx.run_id, target.name, source, update)
        result.delivery = send_scored(
            ctx,
            loaded,
            scored,
            attributes=attributes,
            validation=validation,
            anonymous=persons.anonymous_only(),
            persons=persons,
            only_scored=not todo.full,
        )
    if keep:
        fault_point("before_watermark")
        if update is None:  # nobody touched: the files and the instant move on, no state
            update = WatermarkUpdate(as_of, mark, processed, [], todo.full, parts)
        ledger.advance_watermark(target.name, source, update, staged_by=ctx.run_id)
        event_store.clean(store, parts)  # a killed run's parts, parts merged away
    return result


@dataclass
class _Read:
    """What a trigger run read: the events as of the cutoff (``None``: nobody's), the
    validation report (a full run's), the identity links resolved as of the run, the users
    touched and the event store's parts holding the folder's events once the run is
    recorded."""

    history: pl.DataFrame | None
    validation: ValidationReport | None
    persons: Persons
    users: list[str]
    parts: list[str]


def _read(
    ctx: RunContext, events: EventSource, store: Path, todo: inc.Plan, *, keep: bool
) -> _Read:
    """A full run's every validated event (stored as one part when ``keep``), or an
    incremental run's touched users' stored events and the new files' (their rows repeating
    stored ones dropped, the rest stored as a new part when ``keep``)."""
    config, as_of = ctx.config, ctx.as_of
    if todo.full:
        # everyone is read: validate as `score` does, so rejected rows are counted
        kept, validation, links = validate_with_links(events, config, as_of=as_of, message_ids=True)
        parts = [event_store.write(store, kept, links)] if keep else []
        persons = Persons.at(links, as_of)  # resolved once for every step
        everyone = persons.resolve(_events(kept)).collect()
        del kept
        users = everyone["user_id"].cast(pl.String).unique().sort().to_list()
        return _Read(everyone, validation, persons, users, parts)
    fresh, new_links = event_store.read_new(todo.new_files, config)
    links = union_links([event_store.links(store, todo.parts), new_links])
    # every id of a touched person, their events merged as of the cutoff
    persons = Persons.at(links, as_of)  # resolved once for every step
    ids = persons.every_id(todo.users)
    stored = event_store.read(store, todo.parts, ids)
    both, added = event_store.combine(stored, fresh, config)
    parts = list(todo.parts)
    if (added.height or new_links.height) and keep:  # a link may come on a rejected row
        parts = event_store.merge(store, [*parts, event_store.write(store, added, new_links)])
    history = persons.resolve(_events(both)).collect() if both.height else None
    touched = pl.LazyFrame({"user_id": todo.users}, schema={"user_id": pl.String})
    users = persons.resolve(touched).collect()["user_id"].unique().sort().to_list()
    return _Read(history, None, persons, users, parts)


def _events(stored: pl.DataFrame) -> pl.LazyFrame:
    """Events as the event store keeps them, without their message ids."""
    return stored.lazy().drop(MESSAGE_ID, strict=False)
