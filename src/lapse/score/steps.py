"""The steps of the nightly score run (:func:`lapse.score.run.run_score`) once the
records are computed: mark, deliver and record what is sent (resume, dry run,
cooldowns, counts); no parsing, no printing.

They are public functions over one :class:`RunContext`, shared by the local engine
(:mod:`lapse.score.run`, and :func:`lapse.score.trigger_run.run_triggers` through
:func:`lapse.score.run.send_scored`) and the Spark engine (:mod:`lapse.spark.score`,
which takes the users a chunk at a time):

0. :func:`recorded` records the run in the ledger (``preparing``) before anything
   else is written, announces it (:class:`ScoreHeader`: id, model, the exact resume
   command) and first finishes or cleans up the runs of its sink that were cut off
   (:func:`recover_cut_off`); a run that stops before its batches are planned sent
   nothing, and is ``abandoned`` with its files removed;
1. :func:`prune_expired` drops the runs past ``audit.retention_days``;
2. :func:`mark_sendable` applies suppression, the control group, the frequency
   cap, the delta key against the sink's last delivery and the anonymous hold
   (with identity links, the ledger's ids resolved as of the run, like the
   cooldowns of :func:`last_fired`);
3. :func:`snapshot_rows` and :func:`make_outbox` give the audit rows and what the
   sink gets; :class:`Totals` adds up the counts;
4. :func:`run_result` builds the summary and the :class:`ScoreRunResult`;
5. :func:`dry_run_delivery` rehearses on an in-memory twin of the sink, or
   :func:`start_delivery` writes the audit snapshot and the outbox and plans the
   batches in the ledger, and :func:`deliver_run` sends them, recording cooldowns
   and messages (:func:`record_fired`) and the counts (:func:`delivery_counts`);
   :func:`resume_delivery` finishes a run from its outbox.

A write the disk refuses is one :class:`~lapse.exceptions.WriteFailed` (exit code 5):
before the batches are planned the run is abandoned (run it again), during
delivery it stops ``interrupted`` and resumable. Crash tests reach every step
through :func:`lapse.faults.fault_point`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from lapse.config import Engine, FrequencyCap, LapseConfig
from lapse.delivery.audit import AuditTrail
from lapse.delivery.batches import (
    RetryBudget,
    apply_frequency_cap,
    cap_window,
    deliver,
    delta_changes,
    encode,
    is_message,
    plan_batches,
    settle,
)
from lapse.delivery.ledger import Ledger, RunInfo, sink_lock
from lapse.events import ValidationReport
from lapse.events.identity import Persons
from lapse.events.readers import EventSource
from lapse.exceptions import LapseError, WriteFailed
from lapse.faults import fault_point
from lapse.registry import LoadedBundle, load_bundle
from lapse.schema import run_day, utc_cutoff
from lapse.score.records import (
    RECORDS_SCHEMA,
    delta_key,
    load_suppression,
    who_was_scored,
)
from lapse.sinks import make_sink
from lapse.sinks.base import RECORD_COLUMNS, DeliveryStopped, Item, Sink
from lapse.sinks.memory import MemorySink

__all__ = [
    "Chunks",
    "Marked",
    "RunContext",
    "ScoreHeader",
    "ScoreProgress",
    "ScoreRunResult",
    "Silent",
    "Totals",
    "abandon",
    "anonymous_warning",
    "deliver_run",
    "delivery_counts",
    "dry_run_delivery",
    "events_argument",
    "hold_anonymous",
    "last_delivered",
    "last_fired",
    "load_model",
    "make_outbox",
    "mark_sendable",
    "messages_sent",
    "model_label",
    "model_version",
    "new_run_id",
    "note",
    "prune_expired",
    "record_fired",
    "recorded",
    "recover_cut_off",
    "resume_command",
    "resume_delivery",
    "resumed_line",
    "run_result",
    "score_header",
    "snapshot_rows",
    "start_delivery",
]


# -- what a run announces, reports and returns -----------------------------------------------


@dataclass(frozen=True)
class ScoreHeader:
    """What a score run announces before its work starts (the CLI prints it as one line).

    ``model`` is the registered name (or the bundle's), ``version`` the registry's
    version or ``local``, ``source`` what ``--model`` pointed at, ``trained_on``
    the training events' source, span and event names (or that the bundle does
    not record them; empty when ``resumed``). ``resume`` is the exact command that
    finishes the run if it is cut off.
    """

    score_run_id: str
    model: str
    version: str
    source: str
    trained_on: str
    resume: str = ""
    resumed: bool = False


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

    def note(self, text: str) -> None:
        """The run did something besides its own work (it finished a cut-off run): say it now."""


class Silent:
    """A :class:`ScoreProgress` that reports nothing (the default of the Python API)."""

    def begin(self, header: ScoreHeader) -> None:
        pass

    def stage(self, name: str) -> None:
        pass

    def delivering(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
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


# -- the run and its model --------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What every step of one score run shares.

    ``as_of`` is the run's cutoff as a UTC instant (normalised once, at the job's
    edge, by :func:`lapse.schema.utc_cutoff`) and :attr:`day` its UTC day: the
    snapshot, the records' ``as_of``, cooldowns, the frequency cap and retention
    all count in that day. ``started`` is the monotonic clock at the start (the
    result's ``seconds``); a ``dry_run`` sends nothing and changes no state.
    ``resume`` is the exact command that finishes the run (:func:`resume_command`);
    ``notes`` collects what the run did besides its own work (cut-off runs it
    finished, :func:`note`), for its audit summary.
    """

    run_id: str
    as_of: datetime
    config: LapseConfig
    trail: AuditTrail
    ledger: Ledger
    sink: Sink
    progress: ScoreProgress
    dry_run: bool = False
    started: float = field(default_factory=time.monotonic)
    resume: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def day(self) -> date:
        """The run's day: the UTC day of :attr:`as_of`."""
        return run_day(self.as_of)


def new_run_id(as_of: datetime) -> str:
    """``YYYYMMDD-HHMMSS-ffffff``: as_of's day, then the start time to the microsecond, so
    runs of one as_of sort in start order (sinks keep the latest run's rows by this order)."""
    now = datetime.now(UTC)
    return f"{run_day(as_of):%Y%m%d}-{now:%H%M%S-%f}"


def load_model(model: str | None, config: LapseConfig, progress: ScoreProgress) -> LoadedBundle:
    """The bundle ``model`` names (default: the registered champion, ``models.name``)."""
    progress.stage("loading the model")
    return load_bundle(model or f"models:/{config.models.name}@champion", config)


def model_version(loaded: LoadedBundle) -> str:
    """The registry's version of the bundle, or ``local`` for a bundle file."""
    return str(loaded.version) if loaded.version is not None else "local"


def model_label(loaded: LoadedBundle) -> str:
    """``model 'lapse' version 3`` or ``model 'lapse' (bundle file models/lapse.pkl)``."""
    if loaded.version is None:
        return f"model {loaded.name!r} (bundle file {loaded.source})"
    return f"model {loaded.name!r} version {loaded.version}"


def resume_command(events: EventSource, run_id: str, config: LapseConfig) -> str:
    """The exact command that finishes run ``run_id`` (``--config`` when one was given;
    ``EVENTS`` for events in memory: a resume reads none).

    >>> from lapse.config import load_config
    >>> resume_command("data/my events.parquet", "20260301-020000-123456", load_config())
    "lapse score 'data/my events.parquet' --resume 20260301-020000-123456"
    """
    argv = ["lapse", "score", events_argument(events), "--resume", run_id]
    if not config.origin.startswith("<"):  # a file, not the embedded default
        argv += ["--config", config.origin]
    return shlex.join(argv)


def events_argument(events: EventSource) -> str:
    """``events`` as the command line names it (``EVENTS`` for a frame in memory)."""
    return str(events) if isinstance(events, str | Path) else "EVENTS"


@contextlib.contextmanager
def open_run(
    events: EventSource,
    config: LapseConfig,
    trail: AuditTrail,
    *,
    as_of: datetime,
    sink: str | None,
    out: Path | None,
    dry_run: bool,
    progress: ScoreProgress,
    started: float,
    job: str,
) -> Iterator[RunContext]:
    """A new run's context, holding the sink's lock (none for a dry run) and its ledger.

    The lock comes first: a second run for the same sink stops before doing any work.
    ``as_of`` is already a UTC instant (:func:`lapse.schema.utc_cutoff`).
    """
    target = make_sink(sink or config.sinks.default, config, out=out)
    lock = contextlib.nullcontext() if dry_run else sink_lock(trail.locks, target.name, job)
    run_id = new_run_id(as_of)
    with lock, Ledger(trail.ledger) as ledger:
        yield RunContext(
            run_id,
            as_of,
            config,
            trail,
            ledger,
            target,
            progress,
            dry_run,
            started,
            resume="" if dry_run else resume_command(events, run_id, config),
        )


def score_header(loaded: LoadedBundle, ctx: RunContext) -> ScoreHeader:
    """The run's :class:`ScoreHeader`: id, model, version and what the model was trained
    on, and the command that resumes it."""
    data = loaded.bundle.training_data
    trained_on = (
        data.describe(loaded.bundle.event_names())
        if data is not None
        else f"data up to {loaded.bundle.training_end:%Y-%m-%d} (this bundle predates the "
        "record of its training events; retrain to have it)"
    )
    return ScoreHeader(
        score_run_id=ctx.run_id,
        model=loaded.name,
        version=model_version(loaded),
        source=loaded.source,
        trained_on=trained_on,
        resume=ctx.resume,
    )


@contextlib.contextmanager
def recorded(ctx: RunContext, loaded: LoadedBundle) -> Iterator[None]:
    """The run's life in the ledger around its work (step 0 of the module docstring).

    Records the run (``preparing``: it exists before any file says it was sent),
    announces it through ``ctx.progress.begin`` (the header comes first), then
    :func:`recover_cut_off`. A run that leaves the block still ``preparing`` sent
    nothing: on an error it is abandoned (its files removed), otherwise it had
    nothing to deliver and is dropped. A dry run records nothing.
    """
    if not ctx.dry_run:
        ctx.ledger.begin_run(
            ctx.run_id,
            ctx.sink.name,
            as_of=ctx.as_of,
            model=loaded.source,
            target=str(getattr(ctx.sink, "path", "") or ""),
        )
    ctx.progress.begin(score_header(loaded, ctx))
    fault_point("run_recorded")
    if ctx.dry_run:
        yield
        return
    try:
        recover_cut_off(ctx)
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the run goes first
            if _status(ctx) == "preparing":
                abandon(ctx.trail, ctx.ledger, ctx.ledger.run(ctx.run_id, ctx.sink.name))
        raise
    if _status(ctx) == "preparing":
        ctx.ledger.drop_runs([ctx.run_id])


def note(ctx: RunContext, text: str) -> None:
    """Say ``text`` now (``ctx.progress.note``) and keep it for the run's summary."""
    ctx.notes.append(text)
    ctx.progress.note(text)


def _status(ctx: RunContext) -> str:
    return ctx.ledger.run(ctx.run_id, ctx.sink.name).status


def abandon(trail: AuditTrail, ledger: Ledger, info: RunInfo) -> str:
    """Remove the files of a run that never planned its batches (it sent nothing) and mark
    it ``abandoned``; what happened, in words."""
    trail.remove_run(run_day(info.as_of), info.score_run_id)
    ledger.finish_run(info.score_run_id, info.sink, "abandoned")
    return (
        f"score run {info.score_run_id} was cut off before it sent anything; "
        "its audit files were removed"
    )


def recover_cut_off(ctx: RunContext) -> None:
    """Take care of the runs of ``ctx``'s sink that were cut off (their process died:
    the caller holds the sink's lock), each said with :func:`note`.

    A run cut off before its batches were planned sent nothing: :func:`abandon`. A run
    cut off during delivery is finished first (:func:`resume_delivery`, batches in doubt
    per the sink's policy), so this run's delta sync, cooldowns and frequency cap count
    everything it delivered: nothing is lost, nothing acknowledged is sent twice.
    """
    for info in ctx.ledger.cut_off(ctx.sink.name, besides=ctx.run_id):
        if info.status == "preparing":
            note(ctx, abandon(ctx.trail, ctx.ledger, info))
            continue
        target = make_sink(info.sink, ctx.config, out=Path(info.target) if info.target else None)
        earlier = RunContext(
            info.score_run_id,
            utc_cutoff(info.as_of),
            ctx.config,
            ctx.trail,
            ctx.ledger,
            target,
            ctx.progress,
            resume=ctx.resume.replace(ctx.run_id, info.score_run_id),
        )
        try:
            finished = resume_delivery(earlier)
        except (DeliveryStopped, WriteFailed):
            raise  # the destination or the disk stops this run as well
        except LapseError as exc:  # its outbox or summary is gone (pruned, deleted)
            ctx.ledger.finish_run(info.score_run_id, info.sink, "interrupted")
            note(ctx, f"score run {info.score_run_id} was cut off and cannot be finished: {exc}")
            continue
        note(
            ctx,
            f"score run {info.score_run_id} was cut off during delivery; this run finished "
            f"it first: {resumed_line(finished)}",
        )
        for warning in finished.warnings:
            note(ctx, f"(score run {info.score_run_id}) {warning}")


def resumed_line(result: ScoreRunResult) -> str:
    """What a resume did: the records delivered before it, those it sent, the model."""
    earlier = result.counts.get("sent_earlier", 0)
    later = result.counts.get("sent", 0) - earlier
    failed = result.counts.get("failed", 0)
    return (
        f"the earlier attempt had delivered {earlier:,} records, the resume sent {later:,}"
        + (f" ({failed:,} failed)" if failed else "")
        + f"; scored with {result.model}"
    )


# -- marking what is sent ---------------------------------------------------------------------


def prune_expired(ctx: RunContext) -> None:
    """Delete the snapshots, outboxes and ledger runs past ``audit.retention_days``
    (counted back from the run's day); a dry run keeps everything."""
    if ctx.dry_run:
        return
    pruned = ctx.trail.prune(ctx.config.audit.retention_days, ctx.day)
    if pruned:
        ctx.ledger.drop_runs(pruned)


def last_fired(
    ctx: RunContext, users: list[str] | None = None, *, persons: Persons | None = None
) -> pl.DataFrame:
    """The ledger's cooldown table for the run's sink (``users`` only, if given):
    ``trigger, user_id, last_fired``.

    With identity links (``persons``: resolved as of the run) the cooldowns move with
    the person: a visitor messaged under an anonymous id and identified since is the
    same user, so its ids' entries merge into the canonical id (latest wins).
    """
    frame = pl.DataFrame(
        ctx.ledger.fired(ctx.sink.name, users=_every_id(users, persons)),
        schema={"trigger": pl.String, "user_id": pl.String, "last_fired": pl.Date},
        orient="row",
    )
    if persons is None or persons.empty:
        return frame
    return (
        persons.resolve(frame.lazy())
        .group_by("trigger", "user_id")
        .agg(pl.col("last_fired").max())
        .sort("trigger", "user_id")
        .collect()
    )


def messages_sent(
    ctx: RunContext,
    cap: FrequencyCap,
    users: list[str] | None = None,
    *,
    persons: Persons | None = None,
) -> dict[str, int]:
    """``user_id -> messages`` the run's sink delivered within ``cap``'s window
    (:func:`~lapse.delivery.batches.cap_window`), this run's own left out (a resumed
    run counts what came before); ``users`` only, if given.

    With identity links (``persons``) a person's messages under every one of its ids
    count for its canonical id as of the run, like the cooldowns of :func:`last_fired`.
    """
    since, until = cap_window(cap, ctx.day)
    counts = ctx.ledger.messages(
        ctx.sink.name,
        since=since,
        until=until,
        exclude_run=ctx.run_id,
        users=_every_id(users, persons),
    )
    if persons is None or persons.empty or not counts:
        return counts
    frame = pl.DataFrame(
        {"user_id": list(counts), "n": list(counts.values())},
        schema={"user_id": pl.String, "n": pl.Int64},
    )
    summed = persons.resolve(frame.lazy()).group_by("user_id").agg(pl.sum("n")).collect()
    return dict(zip(summed["user_id"].to_list(), summed["n"].to_list(), strict=True))


def last_delivered(
    ctx: RunContext, users: list[str] | None = None, *, persons: Persons | None = None
) -> dict[str, tuple[str, str | None]]:
    """``user_id -> (delta_key, risk_segment)`` the run's sink last acknowledged (the
    delta sync's reference; ``users`` only, if given).

    With identity links (``persons``) a person's latest delivery under any of its ids
    counts for its canonical id as of the run: a visitor sent a record under an
    anonymous id and identified since is not sent the same record again.
    """
    if persons is None or persons.empty:
        return ctx.ledger.delivered(ctx.sink.name, users=users)
    frame = pl.DataFrame(
        ctx.ledger.deliveries(ctx.sink.name, users=_every_id(users, persons)),
        schema={
            "user_id": pl.String,
            "delta_key": pl.String,
            "risk_segment": pl.String,
            "as_of": pl.Datetime("us", "UTC"),
            "score_run_id": pl.String,
        },
        orient="row",
    )
    order = ("as_of", "score_run_id")
    latest = (
        persons.resolve(frame.lazy())
        .group_by("user_id")
        .agg(pl.col("delta_key", "risk_segment").sort_by(*order).last())
        .collect()
    )
    return {user: (key, segment) for user, key, segment in latest.iter_rows()}


def _every_id(users: list[str] | None, persons: Persons | None) -> list[str] | None:
    """``users`` and every other id of their persons as of the run (``None``: everyone)."""
    if persons is None or users is None:
        return users
    return persons.every_id(users)


@dataclass(frozen=True)
class Marked:
    """Records with what the run decided for each (:func:`mark_sendable`).

    ``records`` carry ``suppressed``, ``capped``, ``withheld_triggers`` and
    ``delta_key``; ``sendable`` marks those that may go to the sink at all (not
    suppressed, not held-out control), ``changed`` those whose delta key changed
    (or every one, on a full snapshot), ``previous`` the segment last delivered,
    ``send`` what goes out, ``held`` the anonymous ids held back, ``anonymous``
    which ids are anonymous.
    """

    records: pl.DataFrame
    sendable: pl.Series
    changed: pl.Series
    previous: pl.Series
    send: pl.Series
    held: pl.Series
    anonymous: pl.Series


def mark_sendable(
    ctx: RunContext,
    records: pl.DataFrame,
    attributes: pl.DataFrame | None,
    anonymous: pl.Series | None,
    *,
    full: bool = False,
    users: list[str] | None = None,
    persons: Persons | None = None,
) -> Marked:
    """Suppression, the control group, the frequency cap, the delta key against what the
    sink last acknowledged, and the anonymous hold: what of ``records`` is sent.

    The cap withholds triggers before the delta key is taken, so a withheld
    trigger changes the key again on the run that finally delivers it. ``users``
    (the records' users) reads the ledger for them only: a caller going through
    the users in chunks. With identity links (``persons``) the ledger's messages and
    deliveries under every id of a person count for its id as of the run
    (:func:`messages_sent`, :func:`last_delivered`), as its cooldowns do.
    """
    suppressed = records["user_id"].is_in(
        pl.Series(sorted(load_suppression(ctx.config, attributes)), dtype=pl.String).implode()
    )
    records = records.with_columns(suppressed.alias("suppressed"))
    sendable = ~records["suppressed"] & (~records["control"] | ctx.config.control.send)
    cap = ctx.config.delivery.frequency_cap
    prior = {} if cap is None else messages_sent(ctx, cap, users, persons=persons)
    records = apply_frequency_cap(records, sendable, prior, cap).with_columns(delta_key())
    last = last_delivered(ctx, users, persons=persons)
    previous, changed = delta_changes(records, last, everyone=ctx.sink.full_snapshot or full)
    send, held, is_anonymous = hold_anonymous(records, sendable & changed, ctx.sink, anonymous)
    return Marked(records, sendable, changed, previous, send, held, is_anonymous)


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


def snapshot_rows(marked: Marked, records: pl.DataFrame) -> pl.DataFrame:
    """The audit snapshot's rows: ``records`` (their reasons filled) with what the run
    decided: ``delta_key``, ``suppressed``, ``capped``, ``withheld_triggers``, ``sent``."""
    decided = marked.records
    return records.select(*RECORDS_SCHEMA).with_columns(
        decided["delta_key"],
        decided["suppressed"],
        decided["capped"],
        decided["withheld_triggers"],
        marked.send.alias("sent"),
    )


def make_outbox(
    ctx: RunContext, rows: pl.DataFrame, marked: Marked, attributes: pl.DataFrame | None
) -> pl.DataFrame:
    """What the sink gets of the :func:`snapshot_rows` sent: the pinned columns, the
    delta key, the previous segment, the attributes it asks for, ``anonymous``."""
    send = marked.send
    out = (
        rows.filter(send)
        .select(*RECORD_COLUMNS, "control", "delta_key", "cooldown_keys")
        .with_columns(marked.previous.filter(send).alias("previous_risk_segment"))
    )
    wanted = [c for c in ctx.sink.attribute_columns if c not in out.columns]
    if wanted:
        have = [] if attributes is None else [c for c in wanted if c in attributes.columns]
        if attributes is not None and have:
            extra = attributes.select(pl.col("user_id").cast(pl.String), *have)
            out = out.join(extra, on="user_id", how="left", maintain_order="left")
        out = out.with_columns(pl.lit(None, pl.String).alias(c) for c in wanted if c not in have)
    return out.with_columns(marked.anonymous.filter(send).alias("anonymous"))


# -- counts, summary and result ---------------------------------------------------------------

_COUNTED = ("scored", "suppressed", "control", "unchanged", "capped", "anonymous_held")


@dataclass
class Totals:
    """What a run's records add up to (on Spark, summed chunk by chunk): the counts, the
    segments and triggers sent or not, who was scored and why not, drift and warnings."""

    counts: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(_COUNTED, 0)))
    segments: Counter[str] = field(default_factory=Counter)
    triggers: Counter[str] = field(default_factory=Counter)
    population: Counter[str] = field(default_factory=Counter)
    drift: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, marked: Marked) -> None:
        """Count a batch of :func:`mark_sendable` records."""
        records = marked.records
        self.counts.update(
            scored=records.height,
            suppressed=int(records["suppressed"].sum()),
            control=int(records["control"].sum()),
            unchanged=int((marked.sendable & ~marked.changed).sum()),
            capped=int(records["capped"].sum()),
            anonymous_held=int(marked.held.sum()),
        )
        self.segments.update(records["risk_segment"].to_list())
        self.triggers.update(t for fired in records["triggers"].to_list() for t in fired)


def run_result(
    ctx: RunContext,
    loaded: LoadedBundle,
    totals: Totals,
    validation: ValidationReport | None,
    *,
    engine: Engine = "local",
) -> tuple[ScoreRunResult, dict[str, Any]]:
    """The run's result and its audit summary (the JSON beside the snapshot), for either engine."""
    counts = {k: n for k, n in totals.counts.items() if k != "anonymous_held"}
    warnings = list(totals.warnings)
    if totals.counts["anonymous_held"]:
        counts["anonymous_held"] = totals.counts["anonymous_held"]
        warnings.append(anonymous_warning(counts["anonymous_held"], ctx.sink))
    rejected = validation.rows_rejected if validation is not None else 0
    summary: dict[str, Any] = {
        "score_run_id": ctx.run_id,
        "as_of": ctx.as_of.isoformat(),
        "sink": ctx.sink.describe(),
        "model": loaded.source,
        "model_version": model_version(loaded),
        "drift": totals.drift,
        "warnings": warnings,
        "counts": counts,
        "segments": dict(sorted(totals.segments.items())),
        "triggers": dict(sorted(totals.triggers.items())),
        "population": dict(totals.population),
        "who_was_scored": who_was_scored(
            totals.population, loaded.bundle.config, ctx.as_of, rejected
        ),
    }
    if ctx.notes:
        summary["notes"] = list(ctx.notes)
    if engine != "local":
        summary["engine"] = engine
    return _result(ctx, summary, validation=validation), summary


def _result(
    ctx: RunContext,
    summary: dict[str, Any],
    *,
    validation: ValidationReport | None = None,
    snapshot: Path | None = None,
    resumed: bool = False,
) -> ScoreRunResult:
    """The :class:`ScoreRunResult` a run's summary describes (a fresh run's or a resumed one's)."""
    return ScoreRunResult(
        score_run_id=ctx.run_id,
        as_of=ctx.as_of,
        sink=ctx.sink.describe(),
        model=f"{summary['model']} (version {summary['model_version']})",
        counts=dict(summary["counts"]),
        segments=summary["segments"],
        triggers=summary["triggers"],
        drift=summary["drift"],
        warnings=summary["warnings"],
        seconds=0.0,
        snapshot=snapshot,
        dry_run=ctx.dry_run,
        resumed=resumed,
        validation=validation,
        out=getattr(ctx.sink, "path", None),
        population=summary.get("population", {}),
        who_was_scored=summary.get("who_was_scored", ""),
    )


# -- delivery ---------------------------------------------------------------------------------

#: The outbox as consecutive chunks in row order, each with its :func:`encode` items
#: (``None``: encode it on the way); called again to settle the dead letters.
Chunks = Callable[[], Iterable[tuple[pl.DataFrame, list[Item | None] | None]]]


def dry_run_delivery(
    ctx: RunContext, result: ScoreRunResult, outbox: pl.DataFrame
) -> ScoreRunResult:
    """Deliver to an in-memory twin of the sink: same batches and payloads, nothing sent."""
    twin = MemorySink(like=ctx.sink)
    with (
        tempfile.TemporaryDirectory(prefix="lapse-dry-run-") as tmp,
        Ledger(Path(tmp) / "l.db") as ledger,
    ):
        ledger.start_run(
            ctx.run_id,
            twin.name,
            as_of=ctx.as_of,
            model=result.model,
            target="",
            batches=plan_batches(encode(twin, outbox), twin, ctx.config.delivery.batch_size),
        )
        ctx.progress.delivering(outbox.height)
        sent = deliver(
            outbox,
            twin,
            ledger,
            ctx.run_id,
            ctx.config.delivery,
            as_of=ctx.as_of,
            dead_letters=Path(tmp) / "dead.ndjson",
            on_progress=ctx.progress.advance,
        )
    result.counts.update(sent=0, would_send=sent.sent, skipped=sent.skipped, failed=0, retried=0)
    # a request of the first few records, in exactly the shape the sink sends
    first = [i for i in encode(ctx.sink, outbox.head(50)) if i is not None][:3]
    result.examples = [ctx.sink.payload(first)] if first else []
    result.seconds = time.monotonic() - ctx.started
    return result


def start_delivery(
    ctx: RunContext,
    result: ScoreRunResult,
    batches: list[tuple[int, int]],
    *,
    snapshot: Callable[[], Path],
    outbox: Callable[[], object],
) -> None:
    """Write the audit ``snapshot`` (and its summary), then the ``outbox``, then plan the
    ``batches`` (outbox row ranges) in the ledger: from here on ``lapse score --resume``
    can finish the run. Cut off before, the run (recorded by :func:`recorded`) sent nothing."""
    ctx.progress.stage("writing the audit snapshot")
    result.snapshot = snapshot()
    fault_point("after_snapshot")
    outbox()
    fault_point("after_outbox")
    ctx.ledger.plan(ctx.run_id, ctx.sink.name, batches)
    fault_point("before_delivery")


def deliver_run(
    ctx: RunContext,
    chunks: Chunks,
    total: int,
    result: ScoreRunResult,
    summary: dict[str, Any],
) -> ScoreRunResult:
    """Send the run's pending batches, chunk by chunk (no batch crosses a chunk), then
    record the outcome in the ledger, the result and the summary.

    After each chunk the cooldowns and messages the sink acknowledged are recorded
    (:func:`record_fired`), also when the sink refuses the credentials midway.
    """
    name, ledger = ctx.sink.name, ctx.ledger
    dead = ctx.trail.dead_letters(ctx.run_id, name)
    ctx.progress.delivering(total)
    counts = {"sent": 0, "skipped": 0, "failed": 0}
    retried = 0
    budget = RetryBudget.of(ctx.config.delivery)  # one budget for the whole run
    try:
        ctx.sink.open(ctx.run_id)
        offset = 0
        for outbox, encoded in chunks():
            items = encode(ctx.sink, outbox) if encoded is None else encoded
            try:
                sent = deliver(
                    outbox,
                    ctx.sink,
                    ledger,
                    ctx.run_id,
                    ctx.config.delivery,
                    as_of=ctx.as_of,
                    dead_letters=dead,
                    on_progress=ctx.progress.advance,
                    items=items,
                    rows=(offset, offset + outbox.height),
                    budget=budget,
                )
            finally:
                record_fired(ctx, outbox, items, offset)
            retried += sent.retried
            for key, n in delivery_counts(ctx, items, offset).items():
                counts[key] += n
            offset += outbox.height
        result.dead_letters = settle(
            ledger, (outbox for outbox, _ in chunks()), ctx.sink, ctx.run_id, dead
        )
        fault_point("after_delivery")
    except DeliveryStopped:
        ledger.finish_run(ctx.run_id, name, "interrupted", summary)
        raise
    except WriteFailed as exc:
        with contextlib.suppress(WriteFailed):  # the ledger's own disk may be the full one
            ledger.finish_run(ctx.run_id, name, "interrupted", summary)
        then = f"finish score run {ctx.run_id} with `{ctx.resume or '--resume ' + ctx.run_id}`"
        raise WriteFailed.from_os_error(exc.path, OSError(exc.reason), then=then) from None
    finally:
        ctx.sink.close()
    result.counts.update(counts, retried=retried)
    in_doubt = ledger.in_doubt(ctx.run_id, name)  # over every attempt of the run
    if in_doubt:
        result.counts["in_doubt"] = in_doubt
        result.warnings.append(in_doubt_line(in_doubt, ctx.sink))
    result.warnings += [w for w in ctx.sink.warnings() if w not in result.warnings]
    summary["warnings"] = result.warnings
    result.seconds = time.monotonic() - ctx.started
    summary["counts"] = result.counts
    summary["seconds"] = round(result.seconds, 2)
    ledger.finish_run(ctx.run_id, name, "complete" if result.complete else "partial", summary)
    ctx.trail.write_summary(ctx.day, ctx.run_id, summary)
    return result


def in_doubt_line(users: int, sink: Sink) -> str:
    """The summary's line for ``users`` whose undeduped objects were in doubt."""
    done = "skipped" if sink.in_doubt == "skip" else "sent again"
    return (
        f"{users:,} users' events in doubt (a request that may have reached {sink.name} "
        f"before the run was cut off or the connection dropped): {done} "
        f"(sinks.{sink.name}.in_doubt: {sink.in_doubt})"
    )


def record_fired(
    ctx: RunContext, outbox: pl.DataFrame, items: list[Item | None], offset: int = 0
) -> None:
    """Start the cooldown of each trigger in a message the sink acknowledged, and count the message.

    Read back from the ledger, so a resumed run records what its earlier attempt delivered.
    ``outbox`` and ``items`` may be a chunk: rows ``offset..`` of the run's outbox.
    """
    sink = ctx.sink.name
    failed = {row for row, *_ in ctx.ledger.failures(ctx.run_id, sink)}
    rows = [
        i - offset
        for b in ctx.ledger.batches(ctx.run_id, sink)
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
    ctx.ledger.record_fired(
        sink,
        zip(pairs[keys].to_list(), pairs["user_id"].cast(pl.String).to_list(), strict=True),
        on=ctx.day,
        score_run_id=ctx.run_id,
    )
    ctx.ledger.record_messages(
        sink, took["user_id"].cast(pl.String).to_list(), on=ctx.day, score_run_id=ctx.run_id
    )


def delivery_counts(ctx: RunContext, items: list[Item | None], offset: int = 0) -> dict[str, int]:
    """``sent``, ``skipped`` and ``failed`` of the run so far, from its ledger.

    With ``offset``, of the chunk of rows ``offset..offset + len(items)`` only.
    """
    stop = offset + len(items)
    sink = ctx.sink.name
    failed = {row for row, *_ in ctx.ledger.failures(ctx.run_id, sink) if offset <= row < stop}
    done = [
        b
        for b in ctx.ledger.batches(ctx.run_id, sink)
        if b.state == "done" and offset <= b.start < stop
    ]
    sent = sum(
        1
        for b in done
        for i in range(b.start, b.stop)
        if items[i - offset] is not None and i not in failed
    )
    return {"sent": sent, "skipped": sum(i is None for i in items), "failed": len(failed)}


def resume_delivery(ctx: RunContext) -> ScoreRunResult:
    """Finish a run from its outbox and ledger: only batches not yet acknowledged are sent
    (those in doubt per the sink's policy). Announces the run (``ctx.progress.begin``);
    the result's ``sent_earlier`` counts what earlier attempts had delivered."""
    snapshot = ctx.trail.snapshot(ctx.day, ctx.run_id)
    path = snapshot.with_suffix(".json")
    try:
        summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        result = _result(ctx, summary, snapshot=snapshot, resumed=True)
    except (OSError, ValueError, KeyError, TypeError):
        raise LapseError(
            f"score run {ctx.run_id!r}: its audit summary {path} is missing or unreadable; "
            "it cannot be resumed, run `lapse score` again"
        ) from None
    ctx.progress.begin(
        ScoreHeader(
            score_run_id=ctx.run_id,
            model=str(summary["model"]),
            version=str(summary["model_version"]),
            source=str(summary["model"]),
            trained_on="",
            resume=ctx.resume,
            resumed=True,
        )
    )
    outbox = ctx.trail.read_outbox(ctx.run_id, ctx.sink.name)
    items = encode(ctx.sink, outbox)
    earlier = delivery_counts(ctx, items)["sent"]
    done = deliver_run(ctx, lambda: [(outbox, items)], outbox.height, result, summary)
    done.counts["sent_earlier"] = earlier
    return done
