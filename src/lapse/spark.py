"""The Spark engine: lapse's own features and scores, sharded by user.

Orchestration only, one implementation of every feature: events are
hash-partitioned by ``user_id`` (``repartition(n, "user_id")``), and each
partition runs :func:`lapse.features.build` (or the bundle's
:meth:`~lapse.modeling.bundle.ChurnBundle.prepare` and
:func:`lapse.scoring.risk_columns`) through ``mapInArrow``: Arrow in, Polars on
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

import os
import pickle
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

from lapse.config import LapseConfig
from lapse.exceptions import LapseError, MissingColumnsError
from lapse.schema import EVENT_COLUMNS, REQUIRED_EVENT_COLUMNS, USER_ID

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from lapse.features._direct import FeatureSet
    from lapse.modeling.bundle import ChurnBundle

__all__ = [
    "SCORE_COLUMNS",
    "build_features_spark",
    "require_spark",
    "score_spark",
    "spark_session",
    "write_single_parquet",
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


def _as_spark(spark: SparkSession, events: DataFrame | str | Path) -> DataFrame:
    """A Spark DataFrame of canonical events from a DataFrame or a Parquet path."""
    if isinstance(events, str | Path):
        from pyspark.errors import AnalysisException

        try:
            events = spark.read.parquet(str(events))
        except AnalysisException as exc:
            raise LapseError(f"{events}: Spark cannot read it as Parquet: {exc}") from None
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise MissingColumnsError(
            f"the Spark engine reads canonical events; missing {missing}, found "
            f"{events.columns}; map the source to {list(EVENT_COLUMNS)} first "
            "(`lapse validate` writes them with the local engine)"
        )
    return events


def _sharded(events: DataFrame, partitions: int | None) -> DataFrame:
    if partitions is not None and partitions < 1:
        raise LapseError(f"partitions must be at least 1, got {partitions}")
    if partitions is None:
        return events.repartition(USER_ID)
    return events.repartition(partitions, USER_ID)


def _utc(as_of: datetime) -> datetime:
    if as_of.tzinfo is None:
        raise LapseError(f"as_of {as_of} is naive; give a timezone-aware datetime (UTC)")
    return as_of.astimezone(UTC)


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

    Returns
    -------
    pyspark.sql.DataFrame
        The same columns and values as :func:`lapse.features.build` (unsorted;
        Polars ``UInt`` columns as signed), lazily: nothing runs until an action.
    """
    from lapse.features import build

    session = spark_session(spark)
    t = _utc(as_of)
    frame = _as_spark(session, events)
    if dict(frame.dtypes).get("ts") == "timestamp":
        # features read `ts < as_of` only: drop the rest before the shuffle
        from pyspark.sql import functions as F

        frame = frame.filter(F.col("ts") < F.lit(t))
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
    :func:`lapse.scoring.risk_columns`: the same values as the local score.

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
    from lapse.modeling.bundle import ChurnBundle

    session = spark_session(spark)
    t = _utc(as_of)
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
        from lapse.scoring import risk_columns

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


# -- output --------------------------------------------------------------------------


def write_single_parquet(frame: DataFrame, out: Path, *, sort_by: str = USER_ID) -> Path:
    """Write ``frame`` as one Parquet file at ``out``, sorted by ``sort_by``.

    Spark writes a folder of parts; this writes one part (``coalesce(1)``,
    sorted within it) to a temporary folder beside ``out`` and moves it into
    place, so ``--out`` means the same single file for both engines. ``out``
    must be on a filesystem the driver and the writing executor share.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.spark-{uuid.uuid4().hex[:8]}"
    try:
        frame.coalesce(1).sortWithinPartitions(sort_by).write.parquet(str(tmp))
        parts = sorted(tmp.glob("part-*.parquet"))
        if len(parts) != 1:
            raise LapseError(f"Spark wrote {len(parts)} Parquet parts to {tmp}, expected one")
        parts[0].replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
