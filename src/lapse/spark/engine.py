"""The Spark engine: lapse's own features and scores, sharded by user.

Orchestration only, one implementation of every feature: events are
hash-partitioned by ``user_id`` (``repartition(n, "user_id")``), and each
partition runs :func:`lapse.features.build` (or the bundle's
:meth:`~lapse.modeling.bundle.ChurnBundle.prepare` and
:func:`lapse.score.records.risk_columns`) through ``mapInArrow``: Arrow in, Polars on
the partition, Arrow out. Features and scores are per user, so every user's
rows are whole in one partition and the result equals the local engine's.

Works on classic Spark and on Spark Connect (Databricks): no ``sparkContext``,
no broadcast; the config and the pickled bundle travel in the task closure,
and the bundle is unpickled once per partition. Workers must run the same
Python environment with lapse installed (``PYSPARK_PYTHON``).

The session time zone is set to UTC and timestamps are normalised to
``Datetime("us", "UTC")`` on the way in (naive values are taken as UTC, as
everywhere in lapse); Spark has no unsigned integers, so Polars ``UInt``
columns come out as the next wider signed type (``UInt64`` as ``bigint``).

Requires the ``spark`` extra (``pip install "lapse[spark]"``) and Java 17+.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

from lapse.config import LapseConfig
from lapse.events import identity
from lapse.events.identity import canonical_ids
from lapse.events.mapping import (
    ANONYMOUS_ID,
    CALL,
    MESSAGE_ID,
    PREVIOUS_ID,
    map_events,
    timestamp_format,
)
from lapse.events.validate import (
    GUEST,
    IDENTITY_CALLS,
    REASON,
    REJECT_REASONS,
    ValidationReport,
    canonical_columns,
    links_of,
    output_columns,
    reject_reason,
    rejects_path_for,
)
from lapse.exceptions import LapseError, MissingColumnsError
from lapse.features import FeatureSet, build
from lapse.modeling.bundle import ChurnBundle
from lapse.schema import (
    EVENT_COLUMNS,
    ORDER_ID,
    REQUIRED_EVENT_COLUMNS,
    ROLES,
    USER_ID,
    utc_cutoff,
)
from lapse.score.records import (
    RECORDS_SCHEMA,
    ScoreResult,
    risk_columns,
    score_shard,
    with_reasons,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "SCORE_COLUMNS",
    "SparkValidation",
    "build_features_spark",
    "read_source",
    "require_spark",
    "score_records_spark",
    "score_spark",
    "spark_session",
    "validated_events_spark",
    "write_single_parquet",
    "write_sorted_parts",
]

MISSING_SPARK = (
    "the Spark engine needs pyspark: pip install 'lapse[spark]' (pyspark>=3.5), "
    "and Java 17+ on the driver and workers (Debian/Ubuntu: apt-get install "
    "openjdk-17-jre-headless); or use the default engine, --engine local"
)

#: The columns :func:`score_spark` returns, one row per eligible user.
SCORE_COLUMNS: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "churn_risk": pl.Float64(),
    "churn_risk_percentile": pl.Float64(),
    "risk_segment": pl.String(),
}


def require_spark() -> None:
    """Raise :class:`LapseError` naming the extra and Java when pyspark is missing."""
    try:
        import pyspark.sql  # noqa: F401
    except ImportError:
        raise LapseError(MISSING_SPARK) from None


def spark_session(spark: SparkSession | None = None) -> SparkSession:
    """``spark`` (else the active session, else a new local one) with UTC time.

    Sets ``spark.sql.session.timeZone`` to UTC, so timestamps cross Arrow as
    UTC instants, and Parquet timestamps to microseconds (not INT96). A new
    local session runs its Python workers on this interpreter unless
    ``PYSPARK_PYTHON`` says otherwise.
    """
    require_spark()
    from pyspark.sql import SparkSession

    if spark is None:
        spark = SparkSession.getActiveSession()
    if spark is None:
        # workers must import the same lapse: this interpreter, unless told otherwise
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = SparkSession.builder.appName("lapse").getOrCreate()
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    return spark


# -- types ---------------------------------------------------------------------------


def _spark_type(dtype: pl.DataType, name: str) -> tuple[str, pa.DataType]:
    """Spark DDL type and the Arrow type Spark expects for a Polars dtype."""
    simple: dict[type[pl.DataType], tuple[str, pa.DataType]] = {
        pl.Boolean: ("BOOLEAN", pa.bool_()),
        pl.Int8: ("TINYINT", pa.int8()),
        pl.Int16: ("SMALLINT", pa.int16()),
        pl.Int32: ("INT", pa.int32()),
        pl.Int64: ("BIGINT", pa.int64()),
        # no unsigned types in Spark: the next wider signed one (UInt64 may overflow)
        pl.UInt8: ("SMALLINT", pa.int16()),
        pl.UInt16: ("INT", pa.int32()),
        pl.UInt32: ("BIGINT", pa.int64()),
        pl.UInt64: ("BIGINT", pa.int64()),
        pl.Float32: ("FLOAT", pa.float32()),
        pl.Float64: ("DOUBLE", pa.float64()),
        pl.String: ("STRING", pa.string()),
        pl.Categorical: ("STRING", pa.string()),
        pl.Enum: ("STRING", pa.string()),
        pl.Date: ("DATE", pa.date32()),
        pl.Datetime: ("TIMESTAMP", pa.timestamp("us", tz="UTC")),
    }
    base = dtype.base_type()
    if base in simple:
        return simple[base]
    if isinstance(dtype, pl.List):
        inner = dtype.inner
        ddl, arrow = _spark_type(inner() if isinstance(inner, type) else inner, name)
        return f"ARRAY<{ddl}>", pa.list_(arrow)
    raise LapseError(f"column {name!r} has dtype {dtype}, which the Spark engine cannot carry")


def _schemas(schema: pl.Schema) -> tuple[str, pa.Schema]:
    """The Spark DDL schema and the Arrow schema of the batches handed back to Spark."""
    ddl, fields = [], []
    for name, dtype in schema.items():
        spark_ddl, arrow = _spark_type(dtype, name)
        ddl.append(f"`{name.replace('`', '``')}` {spark_ddl}")
        fields.append(pa.field(name, arrow))
    return ", ".join(ddl), pa.schema(fields)


def _to_arrow(frame: pl.DataFrame, target: pa.Schema) -> Iterator[pa.RecordBatch]:
    """``frame`` as Arrow batches of exactly ``target`` (signed ints, UTC timestamps)."""
    casts = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Datetime):
            casts.append(pl.col(name).dt.convert_time_zone("UTC").dt.cast_time_unit("us"))
        elif dtype.is_unsigned_integer() or isinstance(dtype, pl.Categorical | pl.Enum):
            casts.append(pl.col(name).cast(_POLARS_OF[target.field(name).type]))
    table = frame.with_columns(casts).to_arrow().cast(target)
    yield from table.to_batches()


_POLARS_OF: dict[pa.DataType, pl.DataType] = {
    pa.int16(): pl.Int16(),
    pa.int32(): pl.Int32(),
    pa.int64(): pl.Int64(),
    pa.string(): pl.String(),
}


def _events(batches: Iterable[pa.RecordBatch]) -> pl.DataFrame | None:
    """A partition's events in the canonical dtypes; None when the partition is empty."""
    got = list(batches)
    if not got or not any(b.num_rows for b in got):
        return None
    frame = pl.from_arrow(pa.Table.from_batches(got))
    assert isinstance(frame, pl.DataFrame)
    ts = frame.schema["ts"]
    stamp = pl.col("ts")
    if isinstance(ts, pl.Datetime):
        # naive (TIMESTAMP_NTZ) means UTC in lapse; aware ones are converted
        stamp = stamp.dt.replace_time_zone("UTC") if ts.time_zone is None else stamp
        stamp = stamp.dt.convert_time_zone("UTC")
    present = [
        (stamp if name == "ts" else pl.col(name)).cast(dtype)
        for name, dtype in EVENT_COLUMNS.items()
        if name in frame.columns
    ]
    absent = [pl.lit(None, dtype).alias(n) for n, dtype in EVENT_COLUMNS.items() if n not in frame]
    return frame.with_columns(*present, *absent)


# -- inputs --------------------------------------------------------------------------


TABLE_PREFIX = "table:"
DELTA_PREFIX = "delta:"

MISSING_DELTA = (
    "{path}: a Delta table needs the delta-spark package and a session configured for it "
    "(pip install delta-spark; delta.configure_spark_with_delta_pip(builder), or a "
    "Databricks runtime); or give the table's Parquet files, or a Spark table as table:NAME"
)


def read_source(spark: SparkSession, events: DataFrame | str | Path) -> DataFrame:
    """The raw source as a Spark DataFrame: a DataFrame, ``table:NAME``, Delta or Parquet.

    ``table:db.name`` reads a table of the session's catalog; ``delta:PATH``, or a
    folder holding ``_delta_log``, a Delta table (needs delta-spark); any other
    path is Parquet (a file, a folder or a glob).
    """
    if not isinstance(events, str | Path):
        return events
    from pyspark.errors import AnalysisException

    text = str(events)
    if text.startswith(TABLE_PREFIX):
        name = text.removeprefix(TABLE_PREFIX)
        try:
            return spark.table(name)
        except AnalysisException as exc:
            raise LapseError(f"{text}: Spark has no such table: {_first_line(exc)}") from None
    delta = text.startswith(DELTA_PREFIX) or (Path(text) / "_delta_log").is_dir()
    path = text.removeprefix(DELTA_PREFIX)
    try:
        if delta:
            return spark.read.format("delta").load(path)
        return spark.read.parquet(path)
    except AnalysisException as exc:
        if delta and "delta" in str(exc).lower():
            raise LapseError(MISSING_DELTA.format(path=path)) from None
        kind = "Delta" if delta else "Parquet"
        raise LapseError(f"{path}: Spark cannot read it as {kind}: {_first_line(exc)}") from None
    except Exception as exc:
        # a missing Delta data source surfaces as a Java ClassNotFoundException
        if delta and "delta" in str(exc).lower():
            raise LapseError(MISSING_DELTA.format(path=path)) from None
        raise


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _as_spark(spark: SparkSession, events: DataFrame | str | Path) -> DataFrame:
    """A Spark DataFrame of canonical events from a DataFrame, a table or a path."""
    events = read_source(spark, events)
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise MissingColumnsError(
            f"the Spark engine reads canonical events here; missing {missing}, found "
            f"{events.columns}; map the source to {list(EVENT_COLUMNS)} first "
            "(validated_events_spark applies the config's source mapping)"
        )
    return events


def _sharded(events: DataFrame, partitions: int | None) -> DataFrame:
    if partitions is not None and partitions < 1:
        raise LapseError(f"partitions must be at least 1, got {partitions}")
    if partitions is None:
        return events.repartition(USER_ID)
    return events.repartition(partitions, USER_ID)


# -- features ------------------------------------------------------------------------


def build_features_spark(
    events: DataFrame | str | Path,
    as_of: datetime,
    config: LapseConfig,
    *,
    spark: SparkSession | None = None,
    attributes: pl.DataFrame | None = None,
    feature_set: FeatureSet = "all",
    partitions: int | None = None,
    links: pl.DataFrame | None = None,
) -> DataFrame:
    """Feature rows as of ``as_of`` on Spark: :func:`lapse.features.build` per user shard.

    Parameters
    ----------
    events
        Canonical events: a Spark DataFrame, or a Parquet file or folder path.
    as_of
        The cutoff, timezone-aware.
    config
        Roles, milestones and ``features`` settings (shipped to the workers).
    spark
        The session; default the active one (see :func:`spark_session`).
    attributes
        Optional per-user table for ``attributes.static_features``; it travels
        in the task closure, so keep it to the columns needed.
    feature_set
        ``"all"`` or ``"core"``, as in :func:`lapse.features.build`.
    partitions
        Hash partitions by ``user_id``; default ``spark.sql.shuffle.partitions``.
    links
        Identity links (:mod:`lapse.events.identity`): ids resolve with those
        before ``as_of`` before the shuffle by user, as in the local engine.

    Returns
    -------
    pyspark.sql.DataFrame
        The same columns and values as :func:`lapse.features.build` (unsorted;
        Polars ``UInt`` columns as signed), lazily: nothing runs until an action.
    """
    session = spark_session(spark)
    t = utc_cutoff(as_of)
    frame = _as_spark(session, events)
    if dict(frame.dtypes).get("ts") == "timestamp":
        # features read `ts < as_of` only: drop the rest before the shuffle
        from pyspark.sql import functions as F

        frame = frame.filter(F.col("ts") < F.lit(t))
    frame = resolve_spark(frame, links, t)
    # the output schema: the builder on no events (also checks config and attributes)
    empty = build(
        pl.LazyFrame(schema=EVENT_COLUMNS),
        t,
        config,
        attributes=attributes,
        feature_set=feature_set,
    )
    ddl, target = _schemas(empty.schema)

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        part = _events(batches)
        if part is None:
            return
        rows = build(part.lazy(), t, config, attributes=attributes, feature_set=feature_set)
        yield from _to_arrow(rows, target)

    return _sharded(frame, partitions).mapInArrow(per_partition, ddl)


# -- scores --------------------------------------------------------------------------


def score_spark(
    events: DataFrame | str | Path,
    as_of: datetime,
    bundle: ChurnBundle | bytes,
    *,
    spark: SparkSession | None = None,
    attributes: pl.DataFrame | None = None,
    partitions: int | None = None,
) -> DataFrame:
    """``churn_risk``, its percentile and ``risk_segment`` per eligible user, on Spark.

    Each partition unpickles the bundle once, builds its users' rows with
    :meth:`ChurnBundle.prepare` and scores them with
    :func:`lapse.score.records.risk_columns`: the same values as the local score.

    Parameters
    ----------
    bundle
        A :class:`ChurnBundle` or its pickled bytes (only bytes you trust: it
        is a pickle), shipped in the closure, no broadcast, so it works over
        Spark Connect. Its feature schema is checked on the driver first.

    Returns
    -------
    pyspark.sql.DataFrame
        :data:`SCORE_COLUMNS`, one row per eligible user, unsorted.
    """
    session = spark_session(spark)
    t = utc_cutoff(as_of)
    if isinstance(bundle, bytes):
        payload, model = bundle, pickle.loads(bundle)
        if not isinstance(model, ChurnBundle):
            raise LapseError(f"the bundle bytes hold a {type(model).__name__}, not a ChurnBundle")
    else:
        payload, model = pickle.dumps(bundle, pickle.HIGHEST_PROTOCOL), bundle
    # a schema mismatch fails here on the driver, as a LapseError, not in every task
    model.check_schema(model.prepare(pl.LazyFrame(schema=EVENT_COLUMNS), t, attributes=attributes))
    ddl, target = _schemas(pl.Schema(SCORE_COLUMNS))
    frame = _as_spark(session, events)

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        part = _events(batches)
        if part is None:
            return
        loaded: ChurnBundle = pickle.loads(payload)  # once per partition
        rows = loaded.prepare(part.lazy(), t, attributes=attributes)
        if rows.height == 0:
            return
        loaded.check_schema(rows)
        rows = rows.with_columns(pl.col(USER_ID).cast(pl.String)).sort(USER_ID)
        yield from _to_arrow(risk_columns(loaded, rows), target)

    return _sharded(frame, partitions).mapInArrow(per_partition, ddl)


# -- mapping and validation ------------------------------------------------------------

_ROW = "_lapse_row"
_DUP = "_lapse_duplicate"
_IS_CALL = "_lapse_identity_call"
_DRIFT = "_lapse_drift"
_POPULATION = "_lapse_population"


@dataclass(frozen=True)
class SparkValidation:
    """Validated events on Spark: the kept rows (sharded by user) and how to count them.

    ``kept`` holds :data:`~lapse.schema.EVENT_COLUMNS` (and ``order_id`` when
    ``source.order_id`` is set) plus ``source.properties``,
    hash-partitioned by ``user_id`` (duplicates and rejected rows removed), lazily;
    :meth:`report` runs the counting job and writes the rejects file.
    """

    flagged: DataFrame
    kept: DataFrame
    source_name: str
    columns: list[str]

    def report(
        self, config: LapseConfig, *, as_of: datetime | None = None, rejects: Path | None = None
    ) -> ValidationReport:
        """The :class:`~lapse.events.ValidationReport` of the local engine, counted by Spark.

        Rejected rows (the mapped row plus ``reason``) go to ``rejects``, default
        :func:`~lapse.events.validate.rejects_path_for` the source, as one Parquet file.
        """
        from pyspark.sql import functions as F

        reference = as_of or datetime.now(UTC)
        if reference.tzinfo is None:
            reference = reference.replace(tzinfo=UTC)
        horizon = reference + timedelta(hours=config.source.future_tolerance_hours)
        groups = (
            self.flagged.groupBy(REASON, _DUP, "event", _IS_CALL, CALL)
            .agg(
                F.count(F.lit(1)).alias("n"),
                F.min("ts").alias("ts_min"),
                F.max("ts").alias("ts_max"),
                F.sum((F.col("ts") > F.lit(horizon)).cast("long")).alias("future"),
            )
            .collect()
        )
        users = self.kept.select(F.count_distinct(USER_ID)).collect()[0][0]
        orders: int | None = None
        if config.source.order_id is not None:
            bought = self.kept.filter(F.col("event").isin(config.roles.of("purchase")))
            # a row without an order key is an order alone; count_distinct skips it
            keyed, alone = bought.select(
                F.count_distinct(USER_ID, ORDER_ID),
                F.count(F.when(F.col(ORDER_ID).isNull(), 1)),
            ).collect()[0]
            orders = int(keyed) + int(alone)
        kept = [g for g in groups if g[REASON] is None and not g[_DUP] and not g[_IS_CALL]]
        calls: dict[str, int] = {}
        for g in groups:
            if g[_IS_CALL]:
                calls[g[CALL]] = calls.get(g[CALL], 0) + int(g["n"])
        links = self.links
        rejected: dict[str, int] = {}
        for g in groups:
            if g[REASON] is not None:
                rejected[g[REASON]] = rejected.get(g[REASON], 0) + int(g["n"])
        guests = rejected.pop(GUEST, 0)
        per_event: dict[str, int] = {}
        for g in kept:
            per_event[g["event"]] = per_event.get(g["event"], 0) + int(g["n"])
        role_names = {role: set(config.roles.of(role)) for role in ROLES}
        assigned = set().union(*role_names.values())
        stamps_min = [g["ts_min"] for g in kept if g["ts_min"] is not None]
        stamps_max = [g["ts_max"] for g in kept if g["ts_max"] is not None]
        written: Path | None = None
        if sum(rejected.values()):
            written = rejects or rejects_path_for(self.source_name, config)
            bad = self.flagged.filter(F.col(REASON).isNotNull() & (F.col(REASON) != GUEST))
            write_single_parquet(
                bad.select(*self.columns, REASON, _ROW), written, sort_by=_ROW, drop=(_ROW,)
            )
        return ValidationReport(
            path=self.source_name,
            rows_read=sum(int(g["n"]) for g in groups),
            rows_kept=sum(int(g["n"]) for g in kept),
            users=int(users),
            ts_min=_aware(min(stamps_min)) if stamps_min else None,
            ts_max=_aware(max(stamps_max)) if stamps_max else None,
            events_per_role={
                role: sum(n for e, n in per_event.items() if e in names)
                for role, names in role_names.items()
            },
            events_unassigned=sum(n for e, n in per_event.items() if e not in assigned),
            rejected_by_reason={r: int(rejected.get(r, 0)) for r in REJECT_REASONS},
            duplicates=sum(int(g["n"]) for g in groups if g[REASON] is None and g[_DUP]),
            future_events=sum(int(g["future"] or 0) for g in kept),
            rejects_path=written,
            purchase_orders=orders,
            events_per_name=dict(sorted(per_event.items())),
            calls={c: calls[c] for c in IDENTITY_CALLS if calls.get(c)},
            links=links.filter(pl.col(USER_ID).is_not_null()).height,
            merged_ids=identity.merged_ids(links),
            anonymous_only=identity.anonymous_only(links).len(),
            guest_rows=guests,
        )

    @cached_property
    def links(self) -> pl.DataFrame:
        """The identity links of the source, as :func:`lapse.events.validate.read_links`
        finds them: pairs pre-aggregated by Spark (first ``ts``), finished on the driver
        (one Spark job, run once)."""
        from pyspark.sql import functions as F

        alias = F.col(CALL) == F.lit("alias")
        pairs = (
            self.flagged.filter(F.col(ANONYMOUS_ID).isNotNull() | F.col(PREVIOUS_ID).isNotNull())
            .groupBy(
                USER_ID,
                ANONYMOUS_ID,
                F.when(alias, F.col(PREVIOUS_ID)).alias(PREVIOUS_ID),
                F.when(alias, F.lit("alias")).alias(CALL),
            )
            .agg(F.min("ts").alias("ts"))
        )
        frame = pl.from_arrow(pairs.toArrow())
        assert isinstance(frame, pl.DataFrame)
        ts = frame.schema["ts"]
        if isinstance(ts, pl.Datetime) and ts.time_zone is None:
            frame = frame.with_columns(pl.col("ts").dt.replace_time_zone("UTC"))
        return links_of(frame.with_columns(pl.col("ts").dt.convert_time_zone("UTC")))


def _aware(ts: datetime) -> datetime:
    """Spark's collected timestamps are naive in the session time zone (UTC)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def validated_events_spark(
    events: DataFrame | str | Path,
    config: LapseConfig,
    *,
    spark: SparkSession | None = None,
    partitions: int | None = None,
) -> SparkValidation:
    """Map and validate a raw source on Spark as :func:`lapse.events.validate_events` does.

    Each input partition runs :func:`lapse.events.map_events` and the local reject
    rules (the same Polars code; the timestamp format is inferred once on the
    driver from a sample and pinned); duplicates, which span partitions, are
    Spark windows mirroring the local rule: among unrejected rows, the first
    occurrence in source order (``monotonically_increasing_id``) of identical
    canonical rows, and of each ``source.message_id``, is kept. Nothing is
    dropped silently: :meth:`SparkValidation.report` counts every row.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    session = spark_session(spark)
    name = str(events) if isinstance(events, str | Path) else "the Spark DataFrame"
    raw = read_source(session, events)
    sample = pl.from_arrow(raw.limit(_TS_SAMPLE).toArrow())
    assert isinstance(sample, pl.DataFrame)
    # the mapping's errors (missing columns, bad derive) surface here, on the driver
    fmt = timestamp_format(sample.lazy(), config, source_name=name)
    if fmt is not None and fmt != config.source.timestamp.format:
        timestamp = config.source.timestamp.model_copy(update={"format": fmt})
        source = config.source.model_copy(update={"timestamp": timestamp})
        config = config.model_copy(update={"source": source})
    pinned = config
    mapped_empty = map_events(sample.clear().lazy(), pinned, source_name=name)
    out_schema = mapped_empty.with_columns(reject_reason(pinned)).collect_schema()
    out_schema[_ROW] = pl.Int64()
    ddl, target = _schemas(out_schema)

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        got = [b for b in batches if b.num_rows]
        if not got:
            return
        frame = pl.from_arrow(pa.Table.from_batches(got))
        assert isinstance(frame, pl.DataFrame)
        rows = frame[_ROW]
        mapped = map_events(frame.drop(_ROW).lazy(), pinned, source_name=name)
        # identify, alias and group calls are not events: never rejected, counted apart
        reason = pl.when(~_is_call).then(reject_reason(pinned)).alias(REASON)
        out = mapped.with_columns(reason).collect().with_columns(rows)
        yield from _to_arrow(out, target)

    flagged = (
        raw.withColumn(_ROW, F.monotonically_increasing_id())
        .mapInArrow(per_partition, ddl)
        .withColumn(_IS_CALL, F.coalesce(F.col(CALL).isin(*IDENTITY_CALLS), F.lit(False)))
    )
    ok = F.col(REASON).isNull() & ~F.col(_IS_CALL)
    duplicate = F.lit(False)
    if config.source.message_id is not None:
        # message ids span users: one window over them, before the shard by user
        by_id = Window.partitionBy(ok, F.col(MESSAGE_ID)).orderBy(_ROW)
        duplicate = F.col(MESSAGE_ID).isNotNull() & (F.row_number().over(by_id) > 1)
        flagged = flagged.withColumn(_DUP, duplicate)
        duplicate = F.col(_DUP)
    flagged = _sharded(flagged, partitions)
    # identical rows share user_id, so this window reuses the shard (no second shuffle)
    same = Window.partitionBy(ok, *(F.col(c) for c in canonical_columns(config))).orderBy(_ROW)
    flagged = flagged.withColumn(_DUP, ok & (duplicate | (F.row_number().over(same) > 1)))
    kept = flagged.filter(ok & ~F.col(_DUP)).select(*output_columns(config))
    names = list(mapped_empty.collect_schema().names())
    return SparkValidation(flagged=flagged, kept=kept, source_name=name, columns=names)


_TS_SAMPLE = 10_000
_is_call = pl.col(CALL).is_in(IDENTITY_CALLS).fill_null(False)


def resolve_spark(frame: DataFrame, links: pl.DataFrame | None, as_of: datetime) -> DataFrame:
    """``frame`` with each ``user_id`` replaced by its canonical id as of ``as_of``, as
    :func:`lapse.events.identity.resolve` does (the id map is broadcast)."""
    from pyspark.sql import functions as F

    if links is None or links.is_empty():
        return frame
    mapping = canonical_ids(links, as_of).filter(pl.col("id") != pl.col("canonical"))
    if mapping.is_empty():
        return frame
    ids = frame.sparkSession.createDataFrame(
        mapping.rows(), schema="_lapse_id string, _lapse_canonical string"
    )
    joined = frame.join(F.broadcast(ids), frame[USER_ID] == ids["_lapse_id"], "left")
    return joined.withColumn(USER_ID, F.coalesce(F.col("_lapse_canonical"), F.col(USER_ID))).drop(
        "_lapse_id", "_lapse_canonical"
    )


# -- whole records -----------------------------------------------------------------------


def score_records_spark(
    events: DataFrame,
    as_of: datetime,
    bundle: ChurnBundle,
    config: LapseConfig,
    *,
    score_run_id: str,
    model_version: str,
    attributes: pl.DataFrame | None = None,
) -> DataFrame:
    """Every eligible user's record on Spark, by :func:`lapse.score.records.score_shard` per shard.

    ``events`` are canonical events already hash-partitioned by ``user_id``
    (:attr:`SparkValidation.kept`). Each partition unpickles the bundle once and
    computes the whole record: risk, percentile, segment, triggers (before
    cooldowns, which need the ledger: the driver applies them per chunk),
    replenishment dates, control flag, and ``reasons`` for every user who is not
    ``low`` or fired a trigger (the driver keeps them for the users it sends).
    Besides the records, each partition adds one row with a null ``user_id``, its
    drift bin counts as JSON in ``_lapse_drift`` (:func:`lapse.score.records.drift_counts`)
    and who it scored and why not as JSON in ``_lapse_population``
    (:func:`lapse.score.records.population_counts`; partitions hold whole users, so
    the counts add up).

    Returns
    -------
    pyspark.sql.DataFrame
        The record columns, ``control``, ``cooldown_keys``, ``_lapse_drift`` and ``_lapse_population``,
        unsorted, lazily.
    """
    from pyspark.sql import functions as F

    t = utc_cutoff(as_of)
    payload = pickle.dumps(bundle, pickle.HIGHEST_PROTOCOL)
    bundle.check_schema(
        bundle.prepare(pl.LazyFrame(schema=EVENT_COLUMNS), t, attributes=attributes)
    )
    schema = pl.Schema({**RECORDS_SCHEMA, _DRIFT: pl.String(), _POPULATION: pl.String()})
    ddl, target = _schemas(schema)
    top = config.score.reasons

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        part = _events(batches)
        if part is None:
            return
        loaded: ChurnBundle = pickle.loads(payload)  # once per partition
        shard = score_shard(
            loaded,
            part.lazy(),
            t,
            config,
            score_run_id=score_run_id,
            model_version=model_version,
            attributes=attributes,
        )
        who = json.dumps(shard.population)
        if shard.features.height == 0:  # nobody to score here: still say who was not
            marker = pl.DataFrame({USER_ID: [None], _POPULATION: [who]})
            empty = pl.DataFrame(schema=schema)
            out = pl.concat([empty, marker], how="diagonal_relaxed").select(schema.names())
            yield from _to_arrow(out, target)
            return
        records = shard.records
        # the local with_reasons, for every user not low or fired (a superset of those sent)
        everyone = pl.Series([True] * records.height)
        records = with_reasons(loaded, ScoreResult(records, shard.features), everyone, top=top)
        drift = json.dumps(shard.drift)
        marker = pl.DataFrame({USER_ID: [None], _DRIFT: [drift], _POPULATION: [who]})
        unmarked = records.with_columns(
            pl.lit(None, pl.String).alias(c) for c in (_DRIFT, _POPULATION)
        )
        out = pl.concat([unmarked, marker], how="diagonal_relaxed").select(schema.names())
        yield from _to_arrow(out, target)

    # scores see events before as_of only; the filter keeps the shard (no shuffle)
    return events.filter(F.col("ts") < F.lit(t)).mapInArrow(per_partition, ddl)


# -- output --------------------------------------------------------------------------


def write_single_parquet(
    frame: DataFrame, out: Path, *, sort_by: str = USER_ID, drop: Sequence[str] = ()
) -> Path:
    """Write ``frame`` as one Parquet file at ``out``, sorted by ``sort_by``.

    Spark writes a folder of parts; this writes one part (``coalesce(1)``,
    sorted within it, then ``drop`` columns left out) to a temporary folder
    beside ``out`` and moves it into place, so ``--out`` means the same single
    file for both engines. ``out`` must be on a filesystem the driver and the
    writing executor share.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.spark-{uuid.uuid4().hex[:8]}"
    try:
        one = frame.coalesce(1).sortWithinPartitions(sort_by)
        (one.drop(*drop) if drop else one).write.parquet(str(tmp))
        parts = sorted(tmp.glob("part-*.parquet"))
        if len(parts) != 1:
            raise LapseError(f"Spark wrote {len(parts)} Parquet parts to {tmp}, expected one")
        parts[0].replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_sorted_parts(frame: DataFrame, folder: Path, *, sort_by: str = USER_ID) -> list[Path]:
    """Write ``frame`` globally sorted by ``sort_by`` as Parquet parts; their paths in order.

    No single task holds the output (``orderBy`` range-partitions it); reading
    the parts in name order reads the rows in order, part by part.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    frame.orderBy(sort_by).write.parquet(str(folder))
    return sorted(folder.glob("part-*.parquet"))
