"""The nightly score run: score every user as of a day, then mark, deliver and record
what is sent (resume, dry run, cooldowns, counts); no parsing, no printing."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.batches import (
    apply_frequency_cap,
    deliver,
    delta_changes,
    encode,
    is_message,
    plan_batches,
)
from lapse.events import ValidationReport, load_attributes, read_links, validate_events
from lapse.events.identity import anonymous_only, person_ids, resolve
from lapse.events.readers import EventSource, as_polars
from lapse.exceptions import LapseError
from lapse.spark import ENGINES, Engine

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lapse.delivery.audit import AuditTrail
    from lapse.delivery.ledger import Ledger, RunInfo
    from lapse.modeling.bundle import ChurnBundle
    from lapse.registry import LoadedBundle
    from lapse.score.records import ScoreResult
    from lapse.sinks.base import Sink

__all__ = [
    "ScoreHeader",
    "ScoreProgress",
    "ScoreRunResult",
    "anonymous_warning",
    "hold_anonymous",
    "run_score",
    "score_header",
]
# -- the nightly score ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreHeader:
    """What a score run announces before its work starts (the CLI prints it as one line).

    ``model`` is the registered name (or the bundle's), ``version`` the registry's
    version or ``local``, ``source`` what ``--model`` pointed at, ``trained_on``
    the training events' source, span and event names (or that the bundle does
    not record them).
    """

    score_run_id: str
    model: str
    version: str
    source: str
    trained_on: str


class ScoreProgress(Protocol):
    """What ``run_score`` reports while it works (the CLI draws progress bars from it)."""

    def begin(self, header: ScoreHeader) -> None:
        """The run has its id and model; nothing else has been read yet."""

    def stage(self, name: str) -> None:
        """A new step starts (reading, scoring, reasons, ...)."""

    def delivering(self, total: int) -> None:
        """Delivery starts with ``total`` records to go."""

    def advance(self, n: int) -> None:
        """``n`` more records were handled (sent, failed or skipped)."""


class _Silent:
    def begin(self, header: ScoreHeader) -> None:
        pass

    def stage(self, name: str) -> None:
        pass

    def delivering(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class ScoreRunResult:
    """What one `lapse score` run (or resume, or dry run) did.

    ``counts`` holds ``scored``, ``sent``, ``unchanged`` (delta sync),
    ``suppressed``, ``control``, ``capped`` (triggers withheld by the
    frequency cap), ``skipped`` (no identifier), ``failed``, ``retried``;
    ``segments`` and ``triggers`` count the scored users (``triggers`` after the
    cap: what goes out); ``population`` counts who was scored and who was not,
    and why (:func:`lapse.score.records.population_counts`), ``who_was_scored`` says it
    in words, with the rows validation rejected.
    """

    score_run_id: str
    as_of: datetime
    sink: str
    model: str
    counts: dict[str, int]
    segments: dict[str, int]
    triggers: dict[str, int]
    drift: dict[str, float]
    warnings: list[str]
    seconds: float
    snapshot: Path | None = None
    dead_letters: Path | None = None
    out: Path | None = None
    examples: list[Any] = field(default_factory=list)
    dry_run: bool = False
    resumed: bool = False
    validation: ValidationReport | None = None
    population: dict[str, int] = field(default_factory=dict)
    who_was_scored: str = ""

    @property
    def complete(self) -> bool:
        """Every record meant for the sink reached it."""
        return self.counts.get("failed", 0) == 0


def _run_id(as_of: datetime) -> str:
    """``YYYYMMDD-HHMMSS-ffffff``: as_of, then the start time to the microsecond, so runs
    of one as_of sort in start order (sinks keep the latest run's rows by this order)."""
    now = datetime.now(UTC)
    return f"{as_of:%Y%m%d}-{now:%H%M%S-%f}"


def _counts(frame: pl.DataFrame, column: str) -> dict[str, int]:
    if frame.height == 0:
        return {}
    if frame.schema[column] == pl.List(pl.String):
        frame = frame.select(pl.col(column).explode()).drop_nulls()
    rows = frame.group_by(column).len().sort(column).iter_rows()
    return {str(k): int(n) for k, n in rows}


def _model_label(loaded: LoadedBundle) -> str:
    """``model 'lapse' version 3`` or ``model 'lapse' (bundle file models/lapse.pkl)``."""
    if loaded.version is None:
        return f"model {loaded.name!r} (bundle file {loaded.source})"
    return f"model {loaded.name!r} version {loaded.version}"


def score_header(loaded: LoadedBundle, run_id: str) -> ScoreHeader:
    """The run's :class:`ScoreHeader`: id, model, version and what the model was trained on."""
    data = loaded.bundle.training_data
    trained_on = (
        data.describe(loaded.bundle.event_names())
        if data is not None
        else f"data up to {loaded.bundle.training_end:%Y-%m-%d} (this bundle predates the "
        "record of its training events; retrain to have it)"
    )
    return ScoreHeader(
        score_run_id=run_id,
        model=loaded.name,
        version=str(loaded.version) if loaded.version is not None else "local",
        source=loaded.source,
        trained_on=trained_on,
    )


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
    like the file (the local engine only).

    ``engine="spark"`` reads and validates the events, and computes the records,
    on Spark (:mod:`lapse.spark.score`); the driver then applies the ledger and
    delivers in bounded chunks. The records, snapshot and deliveries are the same.

    See the README's "Nightly score" section: the audit snapshot is written
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
    from lapse.delivery.audit import AuditTrail
    from lapse.delivery.ledger import Ledger, sink_lock
    from lapse.sinks import make_sink

    started = time.monotonic()
    report = progress or _Silent()
    if engine not in ENGINES:
        raise LapseError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    trail = AuditTrail(config.resolve(config.audit.path))
    if resume is not None:
        with Ledger(trail.ledger) as ledger:
            info = ledger.run(resume, sink)
        target = make_sink(
            info.sink, config, out=out or (Path(info.target) if info.target else None)
        )
        with sink_lock(trail.locks, target.name), Ledger(trail.ledger) as ledger:
            return _resume(trail, ledger, target, info, config, report, started)

    from lapse.registry import load_bundle
    from lapse.score.records import check_event_names, score_users

    target = make_sink(sink or config.sinks.default, config, out=out)
    # the lock first: a second run for this sink stops before doing any work
    lock = contextlib.nullcontext() if dry_run else sink_lock(trail.locks, target.name)
    with lock, Ledger(trail.ledger) as ledger:
        if engine == "spark":
            from lapse.spark.score import run_score_spark

            if not isinstance(events, str | Path):
                raise LapseError(
                    "the spark engine reads event files or tables, not a frame in memory; "
                    "pass a path, or score the frame with engine='local'"
                )

            return run_score_spark(
                events,
                config,
                as_of=as_of,
                model=model,
                target=target,
                trail=trail,
                ledger=ledger,
                dry_run=dry_run,
                full=full,
                report=report,
                started=started,
                spark=spark,
            )
        report.stage("loading the model")
        loaded = load_bundle(model or f"models:/{config.models.name}@champion", config)
        bundle = loaded.bundle
        version = str(loaded.version) if loaded.version is not None else "local"
        run_id = _run_id(as_of)
        report.begin(score_header(loaded, run_id))
        report.stage("reading and validating events")
        events = as_polars(events)  # pandas: converted once, read twice (events, links)
        kept, validation = validate_events(events, config, as_of=as_of)
        check_event_names(bundle, validation.events_per_name, _model_label(loaded))
        attributes = load_attributes(config)
        report.stage("scoring users")
        links = read_links(events, config)
        fired = _last_fired(ledger, target.name, links=links, as_of=as_of)
        scored = score_users(
            bundle,
            resolve(kept.lazy(), links, as_of),
            as_of,
            config,
            score_run_id=run_id,
            model_version=version,
            attributes=attributes,
            last_fired=fired,
        )
        return _send_scored(
            scored,
            trail=trail,
            ledger=ledger,
            target=target,
            bundle=bundle,
            model=loaded.source,
            version=version,
            attributes=attributes,
            config=config,
            as_of=as_of,
            run_id=run_id,
            dry_run=dry_run,
            full=full,
            report=report,
            started=started,
            validation=validation,
            anonymous=anonymous_only(links, as_of),
        )


def _send_scored(
    scored: ScoreResult,
    *,
    trail: AuditTrail,
    ledger: Ledger,
    target: Sink,
    bundle: ChurnBundle,
    model: str,
    version: str,
    attributes: pl.DataFrame | None,
    config: LapseConfig,
    as_of: datetime,
    run_id: str,
    dry_run: bool,
    full: bool,
    report: ScoreProgress,
    started: float,
    validation: ValidationReport | None,
    anonymous: pl.Series | None = None,
) -> ScoreRunResult:
    """Everything after scoring, shared by `lapse score` and `lapse triggers run`.

    Suppression, the control group, the frequency cap, the delta key against the
    sink's last delivery, reasons for the users sent, the audit snapshot and
    outbox, the ledger's batches and the delivery itself (or a dry run).
    ``anonymous`` ids (linked to no known user) are sent only to a sink with an
    ``anonymous_identifier``; for the others they are held back and counted.
    """
    from lapse.score.records import who_was_scored, with_reasons

    records, sendable = _mark_sendable(
        scored.records,
        config=config,
        attributes=attributes,
        ledger=ledger,
        sink=target.name,
        day=as_of.astimezone(UTC).date(),
        run_id=run_id,
    )
    pruned = [] if dry_run else trail.prune(config.audit.retention_days, as_of.date())
    if pruned:
        ledger.drop_runs(pruned)
    last = ledger.delivered(target.name)
    previous, changed = delta_changes(records, last, everyone=target.full_snapshot or full)
    send, held, is_anonymous = hold_anonymous(records, sendable & changed, target, anonymous)
    if held.any():
        scored.warnings.append(anonymous_warning(int(held.sum()), target))
    report.stage("explaining the users sent")
    scored.records = records.select(scored.records.columns)
    records = with_reasons(bundle, scored, send, top=config.score.reasons).with_columns(
        records["delta_key"],
        records["suppressed"],
        records["capped"],
        records["withheld_triggers"],
        send.alias("sent"),
    )
    outbox = _outbox(records.filter(send), previous.filter(send), attributes, target)
    outbox = outbox.with_columns(is_anonymous.filter(send).alias("anonymous"))
    counts = {
        "scored": records.height,
        "suppressed": int(records["suppressed"].sum()),
        "control": int(records["control"].sum()),
        "unchanged": int((sendable & ~changed).sum()),
        "capped": int(records["capped"].sum()),
    }
    if held.any():
        counts["anonymous_held"] = int(held.sum())
    summary: dict[str, Any] = {
        "score_run_id": run_id,
        "as_of": as_of.isoformat(),
        "sink": target.describe(),
        "model": model,
        "model_version": version,
        "drift": scored.drift,
        "warnings": scored.warnings,
        "counts": counts,
        "segments": _counts(records, "risk_segment"),
        "triggers": _counts(records, "triggers"),
        "population": scored.population,
        "who_was_scored": who_was_scored(
            scored.population,
            bundle.config,
            as_of,
            validation.rows_rejected if validation is not None else 0,
        ),
    }
    result = ScoreRunResult(
        score_run_id=run_id,
        as_of=as_of,
        sink=target.describe(),
        model=f"{model} (version {version})",
        counts=counts,
        segments=summary["segments"],
        triggers=summary["triggers"],
        drift=scored.drift,
        warnings=scored.warnings,
        seconds=0.0,
        dry_run=dry_run,
        validation=validation,
        out=getattr(target, "path", None),
        population=summary["population"],
        who_was_scored=summary["who_was_scored"],
    )
    if dry_run:
        return _dry_run(result, outbox, target, config, report, started)
    report.stage("writing the audit snapshot")
    result.snapshot = trail.write_snapshot(as_of.date(), run_id, records, summary)
    trail.write_outbox(run_id, target.name, outbox)
    items = encode(target, outbox)
    ledger.start_run(
        run_id,
        target.name,
        as_of=as_of,
        model=model,
        target=str(result.out or ""),
        batches=plan_batches(items, target, config.delivery.batch_size),
    )
    return _deliver(
        trail,
        ledger,
        target,
        run_id,
        as_of,
        outbox,
        items,
        config,
        report,
        result,
        summary,
        started,
    )


def hold_anonymous(
    records: pl.DataFrame, send: pl.Series, target: Sink, anonymous: pl.Series | None
) -> tuple[pl.Series, pl.Series, pl.Series]:
    """``(send, held, is_anonymous)``: the records still to send, those held back (an
    ``anonymous`` id for a sink without an ``anonymous_identifier``), and which are
    anonymous (the outbox's ``anonymous`` column)."""
    unknown = pl.Series([], dtype=pl.String) if anonymous is None else anonymous
    is_anonymous = records["user_id"].is_in(unknown.implode()).alias("anonymous")
    held = send & is_anonymous if target.anonymous_identifier is None else send & False
    return send & ~held, held, is_anonymous


def anonymous_warning(held: int, target: Sink) -> str:
    """The summary's line for ``held`` anonymous visitors not sent to ``target``."""
    return (
        f"{held:,} anonymous visitors not sent: no identifier {target.name} accepts "
        "for anonymous profiles"
    )


def _mark_sendable(
    records: pl.DataFrame,
    *,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
    ledger: Ledger,
    sink: str,
    day: date,
    run_id: str,
    only_these_users: bool = False,
) -> tuple[pl.DataFrame, pl.Series]:
    """``records`` with ``suppressed``, the frequency cap's columns and ``delta_key``,
    and the mask of records that may be sent (not suppressed, not held-out control).

    The cap withholds triggers before the delta key is taken, so a withheld
    trigger changes the key again on the run that finally delivers it.
    """
    from lapse.score.records import delta_key, load_suppression

    suppressed = records["user_id"].is_in(
        pl.Series(sorted(load_suppression(config, attributes)), dtype=pl.String).implode()
    )
    records = records.with_columns(suppressed.alias("suppressed"))
    sendable = ~records["suppressed"] & (~records["control"] | config.control.send)
    records = apply_frequency_cap(
        records,
        sendable,
        ledger,
        sink,
        config.delivery.frequency_cap,
        on=day,
        score_run_id=run_id,
        only_these_users=only_these_users,
    ).with_columns(delta_key())
    return records, sendable


def _last_fired(
    ledger: Ledger,
    sink: str,
    users: list[str] | None = None,
    *,
    links: pl.DataFrame | None = None,
    as_of: datetime | None = None,
) -> pl.DataFrame:
    """The ledger's cooldown table for ``sink`` (``users`` only, if given):
    ``trigger, user_id, last_fired``.

    With identity ``links`` the cooldowns move with the person: a visitor
    messaged under an anonymous id and identified since is the same user, so
    its ids' entries merge into the canonical id as of ``as_of`` (latest wins).
    """
    if links is not None and users is not None:
        users = person_ids(links, users, as_of)
    frame = pl.DataFrame(
        ledger.fired(sink, users=users),
        schema={"trigger": pl.String, "user_id": pl.String, "last_fired": pl.Date},
        orient="row",
    )
    if links is None or links.is_empty():
        return frame
    return (
        resolve(frame.lazy(), links, as_of)
        .group_by("trigger", "user_id")
        .agg(pl.col("last_fired").max())
        .sort("trigger", "user_id")
        .collect()
    )


def _outbox(
    records: pl.DataFrame, previous: pl.Series, attributes: pl.DataFrame | None, sink: Sink
) -> pl.DataFrame:
    """What a sink gets: the pinned columns, the delta key, the previous segment, attributes."""
    from lapse.sinks.base import RECORD_COLUMNS

    out = records.select(*RECORD_COLUMNS, "control", "delta_key", "cooldown_keys").with_columns(
        previous.alias("previous_risk_segment")
    )
    wanted = [c for c in sink.attribute_columns if c not in out.columns]
    if wanted:
        have = [] if attributes is None else [c for c in wanted if c in attributes.columns]
        if attributes is not None and have:
            extra = attributes.select(pl.col("user_id").cast(pl.String), *have)
            out = out.join(extra, on="user_id", how="left", maintain_order="left")
        out = out.with_columns(pl.lit(None, pl.String).alias(c) for c in wanted if c not in have)
    return out


def _dry_run(
    result: ScoreRunResult,
    outbox: pl.DataFrame,
    target: Sink,
    config: LapseConfig,
    report: ScoreProgress,
    started: float,
) -> ScoreRunResult:
    """Deliver to an in-memory twin of the sink: same batches and payloads, nothing sent."""
    import tempfile

    from lapse.delivery.ledger import Ledger
    from lapse.sinks.memory import MemorySink

    twin = MemorySink(like=target)
    with (
        tempfile.TemporaryDirectory(prefix="lapse-dry-run-") as tmp,
        Ledger(Path(tmp) / "l.db") as ledger,
    ):
        ledger.start_run(
            result.score_run_id,
            twin.name,
            as_of=result.as_of,
            model=result.model,
            target="",
            batches=plan_batches(encode(twin, outbox), twin, config.delivery.batch_size),
        )
        report.delivering(outbox.height)
        sent = deliver(
            outbox,
            twin,
            ledger,
            result.score_run_id,
            config.delivery,
            as_of=result.as_of,
            dead_letters=Path(tmp) / "dead.ndjson",
            on_progress=report.advance,
        )
    result.counts.update(sent=0, would_send=sent.sent, skipped=sent.skipped, failed=0, retried=0)
    # a request of the first few records, in exactly the shape the sink sends
    first = [i for i in encode(target, outbox.head(50)) if i is not None][:3]
    result.examples = [target.payload(first)] if first else []
    result.seconds = time.monotonic() - started
    return result


def _deliver(
    trail: AuditTrail,
    ledger: Ledger,
    target: Sink,
    run_id: str,
    as_of: datetime,
    outbox: pl.DataFrame,
    items: list[Any],
    config: LapseConfig,
    report: ScoreProgress,
    result: ScoreRunResult,
    summary: dict[str, Any],
    started: float,
) -> ScoreRunResult:
    """Send the run's pending batches, then record the outcome in the ledger and the summary."""
    from lapse.sinks.base import SinkAuthError

    report.delivering(outbox.height)
    try:
        sent = deliver(
            outbox,
            target,
            ledger,
            run_id,
            config.delivery,
            as_of=as_of,
            dead_letters=trail.dead_letters(run_id, target.name),
            on_progress=report.advance,
            items=items,
        )
    except SinkAuthError:
        ledger.finish_run(run_id, target.name, "interrupted", summary)
        raise
    finally:
        target.close()
        _record_fired(ledger, run_id, target.name, outbox, items, as_of)
    result.counts.update(_delivery_counts(ledger, run_id, target.name, items), retried=sent.retried)
    result.dead_letters = sent.dead_letters
    result.seconds = time.monotonic() - started
    summary["counts"] = result.counts
    summary["seconds"] = round(result.seconds, 2)
    ledger.finish_run(run_id, target.name, "complete" if result.complete else "partial", summary)
    trail.write_summary(as_of.date(), run_id, summary)
    return result


def _record_fired(
    ledger: Ledger,
    run_id: str,
    sink: str,
    outbox: pl.DataFrame,
    items: list[Any],
    as_of: datetime,
    offset: int = 0,
) -> None:
    """Start the cooldown of each trigger in a message the sink acknowledged, and count the message.

    Read back from the ledger, so a resumed run records what its earlier attempt delivered.
    ``outbox`` and ``items`` may be a chunk: rows ``offset..`` of the run's outbox.
    """
    failed = {row for row, *_ in ledger.failures(run_id, sink)}
    rows = [
        i - offset
        for b in ledger.batches(run_id, sink)
        if b.state == "done" and offset <= b.start < offset + len(items)
        for i in range(b.start, b.stop)
        if items[i - offset] is not None and i not in failed
    ]
    if not rows:
        return
    took = outbox[rows].filter(is_message())
    # the cooldown keys (an outbox written before they existed: the trigger ids)
    keys = "cooldown_keys" if "cooldown_keys" in took.columns else "triggers"
    pairs = took.select("user_id", keys).explode(keys).drop_nulls(keys)
    day = as_of.astimezone(UTC).date()
    ledger.record_fired(
        sink,
        zip(pairs[keys].to_list(), pairs["user_id"].cast(pl.String).to_list(), strict=True),
        on=day,
        score_run_id=run_id,
    )
    ledger.record_messages(
        sink, took["user_id"].cast(pl.String).to_list(), on=day, score_run_id=run_id
    )


def _delivery_counts(
    ledger: Ledger, run_id: str, sink: str, items: list[Any], offset: int = 0
) -> dict[str, int]:
    """``sent``, ``skipped`` and ``failed`` of a run so far, from its ledger.

    With ``offset``, of the chunk of rows ``offset..offset + len(items)`` only.
    """
    stop = offset + len(items)
    failed = {row for row, *_ in ledger.failures(run_id, sink) if offset <= row < stop}
    done = [
        b for b in ledger.batches(run_id, sink) if b.state == "done" and offset <= b.start < stop
    ]
    sent = sum(
        1
        for b in done
        for i in range(b.start, b.stop)
        if items[i - offset] is not None and i not in failed
    )
    return {"sent": sent, "skipped": sum(i is None for i in items), "failed": len(failed)}


def _resume(
    trail: AuditTrail,
    ledger: Ledger,
    target: Sink,
    info: RunInfo,
    config: LapseConfig,
    report: ScoreProgress,
    started: float,
) -> ScoreRunResult:
    """Finish a run from its outbox and ledger: only batches not yet acknowledged are sent."""
    import json

    run_date = info.as_of.date()
    path = trail.snapshot(run_date, info.score_run_id).with_suffix(".json")
    try:
        summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LapseError(
            f"score run {info.score_run_id!r}: its audit summary {path} is missing or unreadable; "
            "it cannot be resumed, run `lapse score` again"
        ) from None
    outbox = trail.read_outbox(info.score_run_id, target.name)
    result = ScoreRunResult(
        score_run_id=info.score_run_id,
        as_of=info.as_of,
        sink=target.describe(),
        model=info.model,
        counts=dict(summary.get("counts", {})),
        segments=summary.get("segments", {}),
        triggers=summary.get("triggers", {}),
        drift=summary.get("drift", {}),
        warnings=summary.get("warnings", []),
        seconds=0.0,
        snapshot=trail.snapshot(run_date, info.score_run_id),
        resumed=True,
        out=getattr(target, "path", None),
        population=summary.get("population", {}),
        who_was_scored=summary.get("who_was_scored", ""),
    )
    return _deliver(
        trail,
        ledger,
        target,
        info.score_run_id,
        info.as_of,
        outbox,
        encode(target, outbox),
        config,
        report,
        result,
        summary,
        started,
    )
