"""`lapse score --engine spark`: records computed on Spark, delivered in bounded chunks.

The executors compute every user's whole record (:func:`lapse.spark.engine.score_records_spark`:
the local :func:`lapse.score.records.user_records` per user shard, reasons included for
every user who is not ``low`` or fired a trigger) and Spark writes them sorted by
``user_id`` as Parquet parts under ``<audit.path>/spark/<run>/``. The driver then
reads them :data:`CHUNK_ROWS` at a time and applies, per chunk, what needs the
run ledger (SQLite on the driver, read for the chunk's users only): trigger
cooldowns, suppression, the frequency cap, the delta key against what the sink
last acknowledged, and which reasons are kept (those of the users sent). Each
chunk is appended to the audit snapshot and the outbox; the ledger's batches are
planned per chunk (no batch crosses a chunk), and delivery goes chunk by chunk
through the same :func:`lapse.delivery.batches.deliver`. The driver holds one chunk,
the batch plan and the per-run counts, never all users. Drift is summed from
per-partition bin counts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from lapse.config import LapseConfig
from lapse.delivery.batches import (
    RetryBudget,
    deliver,
    delta_changes,
    encode,
    plan_batches,
    settle,
)
from lapse.events import load_attributes
from lapse.schema import EVENT_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lapse.delivery.audit import AuditTrail
    from lapse.delivery.ledger import Ledger
    from lapse.modeling.bundle import ChurnBundle
    from lapse.score.run import ScoreProgress, ScoreRunResult
    from lapse.sinks.base import Sink
    from lapse.triggers import Trigger

__all__ = ["CHUNK_ROWS", "run_score_spark"]

#: Records the driver handles at a time (reading, ledger look-ups, snapshot, delivery).
CHUNK_ROWS = 50_000

_DRIFT = "_lapse_drift"
_POPULATION = "_lapse_population"


def run_score_spark(
    events: str | Path,
    config: LapseConfig,
    *,
    as_of: datetime,
    model: str | None,
    target: Sink,
    trail: AuditTrail,
    ledger: Ledger,
    dry_run: bool,
    full: bool,
    report: ScoreProgress,
    started: float,
    spark: SparkSession | None = None,
    partitions: int | None = None,
) -> ScoreRunResult:
    """The Spark engine's score run; :func:`lapse.score.run.run_score` holds the lock and ledger."""
    from lapse.registry import load_bundle
    from lapse.score.records import (
        check_event_names,
        drift_from_counts,
        drift_warnings,
        model_age_warnings,
        nobody_eligible,
        who_was_scored,
    )
    from lapse.score.run import (
        ScoreRunResult,
        _dry_run,
        _model_label,
        _run_id,
        anonymous_warning,
        score_header,
    )
    from lapse.spark.engine import (
        resolve_spark,
        score_records_spark,
        spark_session,
        validated_events_spark,
        write_sorted_parts,
    )

    session = spark_session(spark)
    report.stage("loading the model")
    loaded = load_bundle(model or f"models:/{config.models.name}@champion", config)
    bundle = loaded.bundle
    version = str(loaded.version) if loaded.version is not None else "local"
    run_id = _run_id(as_of)
    report.begin(score_header(loaded, run_id))
    report.stage("validating events on Spark")
    checked = validated_events_spark(events, config, spark=session, partitions=partitions)
    validation = checked.report(config, as_of=as_of)
    check_event_names(bundle, validation.events_per_name, _model_label(loaded))
    attributes = load_attributes(config)
    links = checked.links
    report.stage("scoring users on Spark")
    scored = score_records_spark(
        resolve_spark(checked.kept, links, as_of),
        as_of,
        bundle,
        config,
        score_run_id=run_id,
        model_version=version,
        attributes=attributes,
    )
    work = trail.root / "spark" / run_id
    parts = write_sorted_parts(scored, work)
    try:
        report.stage("applying the ledger, chunk by chunk")
        pruned = [] if dry_run else trail.prune(config.audit.retention_days, as_of.date())
        if pruned:
            ledger.drop_runs(pruned)
        staging = work.with_name(f"{run_id}.out")
        staging.mkdir(parents=True, exist_ok=True)
        snap_tmp, outbox_tmp = staging / "snapshot.parquet", staging / "outbox.parquet"
        tally = _Tally()
        definitions = _definitions(bundle, config, attributes, as_of)
        with _Writer(snap_tmp) as snap, _Writer(outbox_tmp) as box:
            for chunk in _records(parts, tally):
                rows, outbox = _post(
                    chunk,
                    config,
                    ledger,
                    target,
                    attributes,
                    definitions,
                    as_of,
                    run_id,
                    full,
                    links=links,
                )
                snap.write(rows)
                box.write(outbox)
                items = encode(target, outbox)
                plan = plan_batches(items, target, config.delivery.batch_size)
                tally.batches += [(tally.sent_rows + a, tally.sent_rows + b) for a, b in plan]
                tally.chunks.append(outbox.height)
                tally.sent_rows += outbox.height
                tally.add(rows)
        if tally.counts["scored"] == 0:
            raise nobody_eligible(
                tally.population, bundle.config, as_of, validation.ts_min, validation.ts_max
            )
        drift = drift_from_counts(bundle, tally.drift)
        warnings = model_age_warnings(bundle, as_of, config) + drift_warnings(drift, config)
        counts = dict(tally.counts)
        if counts.get("anonymous_held"):
            warnings.append(anonymous_warning(counts["anonymous_held"], target))
        else:
            counts.pop("anonymous_held", None)
        summary: dict[str, Any] = {
            "score_run_id": run_id,
            "as_of": as_of.isoformat(),
            "sink": target.describe(),
            "model": loaded.source,
            "model_version": version,
            "drift": drift,
            "warnings": warnings,
            "counts": counts,
            "segments": dict(sorted(tally.segments.items())),
            "triggers": dict(sorted(tally.triggers.items())),
            "population": dict(tally.population),
            "who_was_scored": who_was_scored(
                tally.population, bundle.config, as_of, validation.rows_rejected
            ),
            "engine": "spark",
        }
        result = ScoreRunResult(
            score_run_id=run_id,
            as_of=as_of,
            sink=target.describe(),
            model=f"{loaded.source} (version {version})",
            counts=counts,
            segments=summary["segments"],
            triggers=summary["triggers"],
            drift=drift,
            warnings=warnings,
            seconds=0.0,
            dry_run=dry_run,
            validation=validation,
            out=getattr(target, "path", None),
            population=summary["population"],
            who_was_scored=summary["who_was_scored"],
        )
        if dry_run:
            # the in-memory twin holds what it is sent anyway
            return _dry_run(result, pl.read_parquet(outbox_tmp), target, config, report, started)
        report.stage("writing the audit snapshot")
        snapshot = trail.snapshot(as_of.date(), run_id)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snap_tmp.replace(snapshot)
        trail.write_summary(as_of.date(), run_id, summary)
        result.snapshot = snapshot
        outbox_path = trail.outbox(run_id, target.name)
        outbox_path.parent.mkdir(parents=True, exist_ok=True)
        outbox_tmp.replace(outbox_path)
        ledger.start_run(
            run_id,
            target.name,
            as_of=as_of,
            model=loaded.source,
            target=str(result.out or ""),
            batches=tally.batches,
        )
        return _deliver_chunks(
            trail,
            ledger,
            target,
            outbox_path,
            tally.chunks,
            config,
            report,
            result,
            summary,
            started,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work.with_name(f"{run_id}.out"), ignore_errors=True)
        if (trail.root / "spark").exists() and not any((trail.root / "spark").iterdir()):
            (trail.root / "spark").rmdir()


class _Tally:
    """What the driver keeps across chunks: counts, drift bins, the batch plan."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter(
            scored=0, suppressed=0, control=0, unchanged=0, capped=0
        )
        self.segments: Counter[str] = Counter()
        self.triggers: Counter[str] = Counter()
        self.drift: dict[str, list[int]] = {}
        self.population: Counter[str] = Counter()
        self.batches: list[tuple[int, int]] = []
        self.chunks: list[int] = []
        self.sent_rows = 0

    def add_drift(self, counts: dict[str, list[int]]) -> None:
        for name, bins in counts.items():
            have = self.drift.setdefault(name, [0] * len(bins))
            self.drift[name] = [a + b for a, b in zip(have, bins, strict=True)]

    def add(self, rows: pl.DataFrame) -> None:
        self.counts["scored"] += rows.height
        self.counts["suppressed"] += int(rows["suppressed"].sum())
        self.counts["control"] += int(rows["control"].sum())
        self.counts["unchanged"] += int(rows["_unchanged"].sum())
        self.counts["capped"] += int(rows["capped"].sum())
        self.counts["anonymous_held"] += int(rows["_anonymous_held"].sum())
        self.segments.update(rows["risk_segment"].to_list())
        self.triggers.update(t for ts in rows["triggers"].to_list() for t in ts)


class _Writer:
    """Appends chunks to one Parquet file (schema from the first chunk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _Writer:
        return self

    def write(self, frame: pl.DataFrame) -> None:
        table = frame.drop([c for c in frame.columns if c.startswith("_")]).to_arrow()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()


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
                tally.population.update(json.loads(who))
            records = frame.filter(pl.col("user_id").is_not_null()).drop(_DRIFT, _POPULATION)
            if records.height:
                yield records


def _definitions(
    bundle: ChurnBundle, config: LapseConfig, attributes: pl.DataFrame | None, as_of: datetime
) -> list[Trigger]:
    """The run's trigger definitions over the rows the executors evaluated them on."""
    from lapse.score.records import trigger_definitions

    empty = bundle.prepare(pl.LazyFrame(schema=EVENT_COLUMNS), as_of, attributes=attributes)
    schema = dict(empty.schema)
    schema.update(churn_risk=pl.Float64(), churn_risk_percentile=pl.Float64())
    schema["risk_segment"] = pl.String()
    if attributes is not None:
        schema.update({c: d for c, d in attributes.schema.items() if c not in schema})
    return trigger_definitions(bundle, config, pl.Schema(schema))


def _post(
    records: pl.DataFrame,
    config: LapseConfig,
    ledger: Ledger,
    target: Sink,
    attributes: pl.DataFrame | None,
    definitions: list[Trigger],
    as_of: datetime,
    run_id: str,
    full: bool,
    *,
    links: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One chunk through what :func:`lapse.score.run.run_score` does after scoring.

    Returns the snapshot rows (plus ``_unchanged`` and ``_anonymous_held`` for the
    counts) and the outbox rows.
    """
    from lapse.events.identity import anonymous_only
    from lapse.score.run import _last_fired, _mark_sendable, _outbox, hold_anonymous
    from lapse.sinks.base import RECORD_COLUMNS
    from lapse.triggers import apply_cooldowns

    day = as_of.astimezone(UTC).date()
    users = records["user_id"].to_list()
    fired = _last_fired(ledger, target.name, users, links=links, as_of=as_of)
    records = records.with_columns(apply_cooldowns(records, fired, definitions, day))
    explained = records["reasons"]
    records, sendable = _mark_sendable(
        records,
        config=config,
        attributes=attributes,
        ledger=ledger,
        sink=target.name,
        day=day,
        run_id=run_id,
        only_these_users=True,
    )
    last = ledger.delivered(target.name, users=users)
    previous, changed = delta_changes(records, last, everyone=target.full_snapshot or full)
    anonymous = anonymous_only(links, as_of) if links is not None else None
    send, held, is_anonymous = hold_anonymous(records, sendable & changed, target, anonymous)
    # as lapse.score.records.with_reasons: reasons for the users sent who are not low or fired
    keep = (
        send & ((records["risk_segment"] != "low") | (records["triggers"].list.len() > 0))
    ).fill_null(False)
    empty = pl.lit([], dtype=pl.List(pl.String))
    reasons = pl.when(keep).then(explained).otherwise(empty).alias("reasons")
    rows = records.with_columns(reasons).select(
        *RECORD_COLUMNS,
        "control",
        "cooldown_keys",
        "delta_key",
        "suppressed",
        "capped",
        "withheld_triggers",
        send.alias("sent"),
        (sendable & ~changed).alias("_unchanged"),
        held.alias("_anonymous_held"),
    )
    outbox = _outbox(rows.filter(send), previous.filter(send), attributes, target)
    return rows, outbox.with_columns(is_anonymous.filter(send))


def _deliver_chunks(
    trail: AuditTrail,
    ledger: Ledger,
    target: Sink,
    outbox_path: Path,
    chunks: list[int],
    config: LapseConfig,
    report: ScoreProgress,
    result: ScoreRunResult,
    summary: dict[str, Any],
    started: float,
) -> ScoreRunResult:
    """:func:`lapse.score.run._deliver`, one outbox chunk at a time (same batches, ledger, counts)."""
    from lapse.score.run import _delivery_counts, _record_fired
    from lapse.sinks.base import DeliveryStopped

    run_id, name, as_of = result.score_run_id, target.name, result.as_of
    dead = trail.dead_letters(run_id, name)

    def read(offset: int, height: int) -> pl.DataFrame:
        return pl.scan_parquet(outbox_path).slice(offset, height).collect()

    def all_chunks() -> Iterator[pl.DataFrame]:
        offset = 0
        for height in chunks:
            yield read(offset, height)
            offset += height

    report.delivering(sum(chunks))
    counts = {"sent": 0, "skipped": 0, "failed": 0}
    retried = 0
    budget = RetryBudget.of(config.delivery)  # one budget for the whole run
    try:
        target.open(run_id)
        offset = 0
        for height in chunks:
            outbox = read(offset, height)
            items = encode(target, outbox)
            try:
                sent = deliver(
                    outbox,
                    target,
                    ledger,
                    run_id,
                    config.delivery,
                    as_of=as_of,
                    dead_letters=dead,
                    on_progress=report.advance,
                    items=items,
                    rows=(offset, offset + height),
                    budget=budget,
                )
            finally:
                _record_fired(ledger, run_id, name, outbox, items, as_of, offset=offset)
            retried += sent.retried
            for key, n in _delivery_counts(ledger, run_id, name, items, offset=offset).items():
                counts[key] += n
            offset += height
        result.dead_letters = settle(ledger, all_chunks(), target, run_id, dead)
    except DeliveryStopped:
        ledger.finish_run(run_id, name, "interrupted", summary)
        raise
    finally:
        target.close()
    result.counts.update(counts, retried=retried)
    result.warnings += [w for w in target.warnings() if w not in result.warnings]
    summary["warnings"] = result.warnings
    result.seconds = time.monotonic() - started
    summary["counts"] = result.counts
    summary["seconds"] = round(result.seconds, 2)
    ledger.finish_run(run_id, name, "complete" if result.complete else "partial", summary)
    trail.write_summary(as_of.date(), run_id, summary)
    return result
