"""The nightly score run: :func:`run_score` scores every user as of a day on the
local or the Spark engine, then marks, delivers and records what is sent through the
steps of :mod:`lapse.score.steps` (resume, dry run, cooldowns, counts); the local
engine's steps after scoring are :func:`send_scored`, shared with
:func:`lapse.score.trigger_run.run_triggers`. No parsing, no printing.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from lapse.config import ENGINES, Engine, LapseConfig
from lapse.delivery.audit import AuditTrail
from lapse.delivery.batches import (
    encode,
    plan_batches,
)
from lapse.delivery.ledger import Ledger, sink_lock
from lapse.events import ValidationReport, load_attributes, validate_with_links
from lapse.events.identity import Persons
from lapse.events.readers import EventSource
from lapse.exceptions import LapseError
from lapse.registry import LoadedBundle
from lapse.schema import run_day, utc_cutoff
from lapse.score.records import (
    ScoreResult,
    check_event_names,
    compact_events,
    score_users,
    with_reasons,
)
from lapse.score.steps import (
    RunContext,
    ScoreProgress,
    ScoreRunResult,
    Silent,
    Totals,
    abandon,
    deliver_run,
    dry_run_delivery,
    events_argument,
    last_fired,
    load_model,
    make_outbox,
    mark_sendable,
    model_label,
    model_version,
    open_run,
    prune_expired,
    recorded,
    resume_command,
    resume_delivery,
    run_result,
    snapshot_rows,
    start_delivery,
)
from lapse.sinks import make_sink
from lapse.spark.score import run_score_spark

if TYPE_CHECKING:
    from lapse.spark import SparkSession

__all__ = [
    "run_score",
    "send_scored",
]


# -- the nightly score ------------------------------------------------------------------------


def run_score(
    events: EventSource,
    config: LapseConfig,
    *,
    as_of: datetime,
    model: str | None = None,
    sink: str | None = None,
    out: Path | None = None,
    dry_run: bool = False,
    full: bool = False,
    resume: str | None = None,
    progress: ScoreProgress | None = None,
    engine: Engine = "local",
    spark: SparkSession | None = None,
) -> ScoreRunResult:
    """Score every eligible user as of ``as_of`` and deliver the records to a sink.

    ``events`` is an event file, folder or glob (or a database source), or the
    events in memory: a source-shaped Polars or pandas frame, mapped and validated
    like the file (the local engine only). ``as_of`` is an aware datetime; the run
    counts in its UTC instant and UTC day (a naive one is refused).

    ``engine="spark"`` reads and validates the events, and computes the records,
    on Spark (:mod:`lapse.spark.score`); the driver then applies the ledger and
    delivers in bounded chunks. The records, snapshot and deliveries are the same.

    See docs/scoring.md: the audit snapshot is written
    before anything is sent; delivery goes through :mod:`lapse.delivery.batches` with
    the run ledger of :mod:`lapse.delivery.ledger`, so ``resume=SCORE_RUN_ID`` finishes
    a killed run without re-sending acknowledged batches.

    Raises
    ------
    LapseError
        Bad input, a feature schema mismatch, an unknown model or sink, or a
        refused credential (the run can be resumed once fixed).
    LockHeldError
        Another run for the same sink is in progress.
    """
    started = time.monotonic()
    report = progress or Silent()
    if engine not in ENGINES:
        raise LapseError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    trail = AuditTrail(config.resolve(config.audit.path))
    if resume is not None:
        return _resume(
            trail,
            config,
            resume,
            events=events,
            sink=sink,
            out=out,
            progress=report,
            started=started,
        )
    as_of = utc_cutoff(as_of)
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
        job="lapse score",
    ) as ctx:
        if engine == "spark":
            if not isinstance(events, str | Path):
                raise LapseError(
                    "the spark engine reads event files or tables, not a frame in memory; "
                    "pass a path, or score the frame with engine='local'"
                )

            return run_score_spark(events, ctx, model=model, full=full, spark=spark)
        loaded = load_model(model, config, report)
        with recorded(ctx, loaded):
            return _score_local(events, ctx, loaded, full=full)


def _score_local(
    events: EventSource, ctx: RunContext, loaded: LoadedBundle, *, full: bool
) -> ScoreRunResult:
    """The local engine's run, once recorded: read, score, then :func:`send_scored`."""
    config, as_of, report = ctx.config, ctx.as_of, ctx.progress
    report.stage("reading and validating events")
    kept, validation, links = validate_with_links(events, config, as_of=as_of)
    check_event_names(loaded.bundle, validation.events_per_name, model_label(loaded))
    attributes = load_attributes(config)
    report.stage("scoring users")
    persons = Persons.at(links, as_of)  # resolved once for every step
    compact = persons.resolve(kept.lazy()).collect()  # kept's columns, unless resolved
    del kept  # held by `compact` only, whose columns turn compact one by one
    compact_events(compact)
    scored = score_users(
        loaded.bundle,
        compact,
        as_of,
        config,
        score_run_id=ctx.run_id,
        model_version=model_version(loaded),
        attributes=attributes,
        last_fired=last_fired(ctx, persons=persons),
    )
    del compact  # the events are done with: reasons and delivery run without them
    return send_scored(
        ctx,
        loaded,
        scored,
        attributes=attributes,
        validation=validation,
        anonymous=persons.anonymous_only(),
        persons=persons,
        full=full,
    )


def _resume(
    trail: AuditTrail,
    config: LapseConfig,
    score_run_id: str,
    *,
    events: EventSource,
    sink: str | None,
    out: Path | None,
    progress: ScoreProgress,
    started: float,
) -> ScoreRunResult:
    """Open the ledger, the sink and its lock for :func:`resume_delivery` of a run; a run
    cut off before it planned its batches sent nothing: it is cleaned up, and says so."""
    with Ledger(trail.ledger) as ledger:
        info = ledger.run(score_run_id, sink)
    target = make_sink(info.sink, config, out=out or (Path(info.target) if info.target else None))
    with (
        sink_lock(trail.locks, target.name, "lapse score --resume"),
        Ledger(trail.ledger) as ledger,
    ):
        info = ledger.run(score_run_id, info.sink)  # as of now, with the lock held
        if info.status in ("preparing", "abandoned"):
            cleaned = info.status == "preparing"
            if cleaned:
                abandon(trail, ledger, info)
            raise LapseError(
                f"score run {score_run_id} stopped before it sent anything"
                + (" (its audit files were removed)" if cleaned else "")
                + f"; nothing to resume: run `lapse score {shlex.quote(events_argument(events))} --as-of "
                f"{run_day(info.as_of):%Y-%m-%d}` again"
            )
        ctx = RunContext(
            info.score_run_id,
            utc_cutoff(info.as_of),
            config,
            trail,
            ledger,
            target,
            progress,
            started=started,
            resume=resume_command(events, info.score_run_id, config),
        )
        return resume_delivery(ctx)


def send_scored(
    ctx: RunContext,
    loaded: LoadedBundle,
    scored: ScoreResult,
    *,
    attributes: pl.DataFrame | None,
    validation: ValidationReport | None,
    anonymous: pl.Series | None = None,
    persons: Persons | None = None,
    full: bool = False,
    only_scored: bool = False,
) -> ScoreRunResult:
    """Everything after scoring on the local engine, shared by `lapse score` and
    `lapse triggers run`: :func:`mark_sendable`, reasons for the users sent, the audit
    snapshot and outbox, the ledger's batches and the delivery itself (or a dry run).

    ``anonymous`` ids (linked to no known user) are sent only to a sink with an
    ``anonymous_identifier``; for the others they are held back and counted.
    ``persons`` (the identity links the records' ids were resolved with) carry the
    ledger's frequency cap and delta sync over to the merged ids.
    ``full`` sends every sendable record, changed or not (``lapse score --full``).
    ``only_scored`` reads the ledger for the scored users only (a few users of many).
    """
    prune_expired(ctx)
    users = scored.records["user_id"].to_list() if only_scored else None
    marked = mark_sendable(
        ctx, scored.records, attributes, anonymous, full=full, users=users, persons=persons
    )
    ctx.progress.stage("explaining the users sent")
    scored.records = marked.records.select(scored.records.columns)
    explained = with_reasons(loaded.bundle, scored, marked.send, top=ctx.config.score.reasons)
    rows = snapshot_rows(marked, explained)
    outbox = make_outbox(ctx, rows, marked, attributes)
    totals = Totals(
        population=Counter(scored.population), drift=scored.drift, warnings=scored.warnings
    )
    totals.add(marked)
    result, summary = run_result(ctx, loaded, totals, validation)
    if ctx.dry_run:
        return dry_run_delivery(ctx, result, outbox)
    items = encode(ctx.sink, outbox)
    start_delivery(
        ctx,
        result,
        plan_batches(items, ctx.sink, ctx.config.delivery.batch_size),
        snapshot=lambda: ctx.trail.write_snapshot(ctx.day, ctx.run_id, rows, summary),
        outbox=lambda: ctx.trail.write_outbox(ctx.run_id, ctx.sink.name, outbox),
    )
    return deliver_run(ctx, lambda: [(outbox, items)], outbox.height, result, summary)
