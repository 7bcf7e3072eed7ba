"""`lapse score --engine spark`: records computed on Spark, delivered in bounded chunks.

The executors compute every user's whole record (:func:`lapse.spark.engine.score_records_spark`:
the local :func:`lapse.score.records.user_records` per user shard, reasons included for
every user who is not ``low`` or fired a trigger) and Spark writes them sorted by
``user_id`` as Parquet parts under ``<audit.path>/spark/<run>/``. The driver then
reads them :data:`CHUNK_ROWS` at a time and takes each chunk through the score run's
steps (:mod:`lapse.score.steps`), reading the run ledger (SQLite on the driver) for the
chunk's users only (and their persons' other ids, with identity links): trigger
cooldowns, then :func:`~lapse.score.steps.mark_sendable` (suppression, the frequency
cap, the delta key against what the sink last acknowledged), the reasons of the users sent, the snapshot rows and the outbox. Each
chunk is appended to the audit snapshot and the outbox; the ledger's batches are
planned per chunk (no batch crosses a chunk), and delivery goes chunk by chunk
through the same :func:`~lapse.score.steps.deliver_run`. The driver holds one chunk,
the batch plan and the per-run counts, never all users. Drift is summed from
per-partition bin counts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from lapse.config import LapseConfig
from lapse.delivery.batches import encode, plan_batches
from lapse.events import load_attributes
from lapse.events.identity import Persons
from lapse.exceptions import WriteFailed
from lapse.modeling.bundle import ChurnBundle
from lapse.registry import LoadedBundle
from lapse.schema import EVENT_COLUMNS
from lapse.score.records import (
    check_event_names,
    drift_from_counts,
    drift_warnings,
    keep_reasons,
    model_age_warnings,
    nobody_eligible,
    summed_bins,
    trigger_definitions,
)
from lapse.score.steps import (
    Marked,
    RunContext,
    ScoreRunResult,
    Totals,
    deliver_run,
    dry_run_delivery,
    last_fired,
    load_model,
    make_outbox,
    mark_sendable,
    model_label,
    model_version,
    prune_expired,
    recorded,
    run_result,
    snapshot_rows,
    start_delivery,
)
from lapse.spark.engine import (
    resolve_spark,
    score_records_spark,
    spark_session,
    validated_events_spark,
    write_sorted_parts,
)
from lapse.triggers import Trigger, apply_cooldowns

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["CHUNK_ROWS", "run_score_spark"]

#: Records the driver handles at a time (reading, ledger look-ups, snapshot, delivery).
CHUNK_ROWS = 50_000

_DRIFT = "_lapse_drift"
_POPULATION = "_lapse_population"


def run_score_spark(
    events: str | Path,
    ctx: RunContext,
    *,
    model: str | None,
    full: bool,
    spark: SparkSession | None = None,
    partitions: int | None = None,
) -> ScoreRunResult:
    """The Spark engine's score run; :func:`lapse.score.run.run_score` holds the lock and
    ledger and makes the run's :class:`~lapse.score.steps.RunContext`."""
    session = spark_session(spark)
    loaded = load_model(model, ctx.config, ctx.progress)
    with recorded(ctx, loaded):
        return _score_spark(events, ctx, loaded, session, full=full, partitions=partitions)


def _score_spark(
    events: str | Path,
    ctx: RunContext,
    loaded: LoadedBundle,
    session: SparkSession,
    *,
    full: bool,
    partitions: int | None,
) -> ScoreRunResult:
    """The Spark engine's run, once recorded (:func:`lapse.score.steps.recorded`)."""
    config, as_of, report = ctx.config, ctx.as_of, ctx.progress
    bundle = loaded.bundle
    report.stage("validating events on Spark")
    checked = validated_events_spark(events, config, spark=session, partitions=partitions)
    validation = checked.report(config, as_of=as_of)
    check_event_names(bundle, validation.events_per_name, model_label(loaded))
    attributes = load_attributes(config)
    links = checked.links
    report.stage("scoring users on Spark")
    scored = score_records_spark(
        resolve_spark(checked.kept, links, as_of),
        as_of,
        bundle,
        config,
        score_run_id=ctx.run_id,
        model_version=model_version(loaded),
        attributes=attributes,
    )
    work = ctx.trail.root / "spark" / ctx.run_id
    staging = work.with_name(f"{ctx.run_id}.out")
    parts = write_sorted_parts(scored, work)
    try:
        report.stage("applying the ledger, chunk by chunk")
        prune_expired(ctx)
        staging.mkdir(parents=True, exist_ok=True)
        snap_tmp, outbox_tmp = staging / "snapshot.parquet", staging / "outbox.parquet"
        tally = _Tally()
        definitions = _definitions(bundle, config, attributes, as_of)
        persons = Persons.at(links, as_of)  # resolved once for every chunk
        anonymous = persons.anonymous_only()
        with _Writer(snap_tmp) as snap, _Writer(outbox_tmp) as box:
            for chunk in _records(parts, tally):
                marked = _mark(ctx, chunk, attributes, definitions, persons, anonymous, full)
                rows = snapshot_rows(marked, keep_reasons(marked.records, marked.send))
                outbox = make_outbox(ctx, rows, marked, attributes)
                snap.write(rows)
                box.write(outbox)
                tally.plan(ctx, outbox)
                tally.totals.add(marked)
        totals = tally.totals
        if totals.counts["scored"] == 0:
            raise nobody_eligible(
                totals.population, bundle.config, as_of, validation.ts_min, validation.ts_max
            )
        totals.drift = drift_from_counts(bundle, tally.drift)
        totals.warnings = model_age_warnings(bundle, as_of, config) + drift_warnings(
            totals.drift, config
        )
        result, summary = run_result(ctx, loaded, totals, validation, engine="spark")
        if ctx.dry_run:
            # the in-memory twin holds what it is sent anyway
            return dry_run_delivery(ctx, result, pl.read_parquet(outbox_tmp))
        outbox_path = ctx.trail.outbox(ctx.run_id, ctx.sink.name)

        def snapshot() -> Path:
            path = _move(snap_tmp, ctx.trail.snapshot(ctx.day, ctx.run_id))
            ctx.trail.write_summary(ctx.day, ctx.run_id, summary)
            return path

        start_delivery(
            ctx,
            result,
            tally.batches,
            snapshot=snapshot,
            outbox=lambda: _move(outbox_tmp, outbox_path),
        )

        def chunks() -> Iterator[tuple[pl.DataFrame, None]]:
            offset = 0
            for height in tally.chunks:
                yield pl.scan_parquet(outbox_path).slice(offset, height).collect(), None
                offset += height

        return deliver_run(ctx, chunks, sum(tally.chunks), result, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if (ctx.trail.root / "spark").exists() and not any((ctx.trail.root / "spark").iterdir()):
            (ctx.trail.root / "spark").rmdir()


class _Tally:
    """What the driver keeps across chunks: the run's totals, drift bins, the batch plan."""

    def __init__(self) -> None:
        self.totals = Totals()
        self.drift: dict[str, list[int]] = {}
        self.batches: list[tuple[int, int]] = []
        self.chunks: list[int] = []

    def add_drift(self, counts: dict[str, list[int]]) -> None:
        self.drift = summed_bins([self.drift, counts])

    def plan(self, ctx: RunContext, outbox: pl.DataFrame) -> None:
        """Plan the batches of one outbox chunk, as row ranges of the whole outbox."""
        plan = plan_batches(encode(ctx.sink, outbox), ctx.sink, ctx.config.delivery.batch_size)
        offset = sum(self.chunks)
        self.batches += [(offset + a, offset + b) for a, b in plan]
        self.chunks.append(outbox.height)


class _Writer:
    """Appends chunks to one Parquet file (schema from the first chunk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _Writer:
        return self

    def write(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        try:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.path, table.schema)
            self.writer.write_table(table.cast(self.writer.schema))
        except OSError as exc:  # a full disk: one line (the staging folder is removed)
            raise WriteFailed.from_os_error(self.path, exc) from None

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()


def _move(staged: Path, home: Path) -> Path:
    """Put a staged file at its audit trail ``home``."""
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(home)
    except OSError as exc:
        raise WriteFailed.from_os_error(home, exc) from None
    return home


def _records(parts: list[Path], tally: _Tally) -> Iterator[pl.DataFrame]:
    """The scored records in ``user_id`` order, :data:`CHUNK_ROWS` at a time; the
    partitions' drift and population rows tallied."""
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=CHUNK_ROWS):
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(frame, pl.DataFrame)
            markers = frame.filter(pl.col("user_id").is_null())
            for drift, who in markers.select(_DRIFT, _POPULATION).iter_rows():
                if drift is not None:
                    tally.add_drift(json.loads(drift))
                tally.totals.population.update(json.loads(who))
            records = frame.filter(pl.col("user_id").is_not_null()).drop(_DRIFT, _POPULATION)
            if records.height:
                yield records


def _definitions(
    bundle: ChurnBundle, config: LapseConfig, attributes: pl.DataFrame | None, as_of: datetime
) -> list[Trigger]:
    """The run's trigger definitions over the rows the executors evaluated them on."""
    empty = bundle.prepare(pl.LazyFrame(schema=EVENT_COLUMNS), as_of, attributes=attributes)
    schema = dict(empty.schema)
    schema.update(churn_risk=pl.Float64(), churn_risk_percentile=pl.Float64())
    schema["risk_segment"] = pl.String()
    if attributes is not None:
        schema.update({c: d for c, d in attributes.schema.items() if c not in schema})
    return trigger_definitions(bundle, config, pl.Schema(schema))


def _mark(
    ctx: RunContext,
    records: pl.DataFrame,
    attributes: pl.DataFrame | None,
    definitions: list[Trigger],
    persons: Persons,
    anonymous: pl.Series,
    full: bool,
) -> Marked:
    """One chunk's cooldowns (the executors fired triggers without the ledger), then
    :func:`~lapse.score.steps.mark_sendable` with the ledger read for its users only."""
    users = records["user_id"].to_list()
    fired = last_fired(ctx, users, persons=persons)
    records = records.with_columns(apply_cooldowns(records, fired, definitions, ctx.day))
    return mark_sendable(
        ctx, records, attributes, anonymous, full=full, users=users, persons=persons
    )
