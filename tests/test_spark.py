"""The Spark engine (`lapse.spark`) gives the local engine's features and scores, row for row.

Tests that start Spark are marked ``spark`` (one ``local[2]`` session for the
module); skip them with ``pytest -m "not spark"``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import load_config
from lapse.exceptions import LapseError
from lapse.features import build
from lapse.modeling.bundle import ChurnBundle
from lapse.scoring import risk_columns
from worlds import World, trained_world

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return trained_world(
        tmp_path_factory.mktemp("spark"),
        n_users=300,
        n_days=240,
        seed=3,
        train_days=200,
        score_day=210,
    )


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    sql = pytest.importorskip("pyspark.sql")
    with pytest.MonkeyPatch.context() as mp:
        # the Python workers must import this lapse: the test interpreter
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        session = (
            sql.SparkSession.builder.master("local[2]")
            .appName("lapse-tests")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.default.parallelism", "2")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate()
        )
        yield session
        session.stop()


def collect(frame: DataFrame) -> pl.DataFrame:
    out = pl.from_arrow(frame.toArrow())
    assert isinstance(out, pl.DataFrame)
    return out.sort("user_id")


@pytest.mark.spark
def test_features_equal_the_local_engine(world: World, spark: SparkSession) -> None:
    from lapse.spark import build_features_spark

    config = load_config()
    local = build(pl.scan_parquet(world.events), world.as_of, config)
    got = collect(build_features_spark(str(world.events), world.as_of, config, spark=spark))
    assert got.height == local.height > 200
    assert_frame_equal(got, local, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.spark
def test_core_features_with_static_attributes_equal_the_local_engine(
    world: World, spark: SparkSession
) -> None:
    from lapse.spark import build_features_spark

    base = load_config()
    config = base.model_copy(
        update={"attributes": base.attributes.model_copy(update={"static_features": ["plan"]})}
    )
    users = pl.read_parquet(world.users)
    local = build(
        pl.scan_parquet(world.events), world.as_of, config, attributes=users, feature_set="core"
    )
    got = build_features_spark(
        str(world.events), world.as_of, config, spark=spark, attributes=users, feature_set="core"
    )
    assert "plan" in local.columns
    assert_frame_equal(collect(got), local, check_exact=False)


@pytest.mark.spark
def test_scores_equal_the_local_bundle(world: World, spark: SparkSession) -> None:
    from lapse.spark import SCORE_COLUMNS, score_spark

    bundle = ChurnBundle.load(world.bundle)
    rows = bundle.prepare(pl.scan_parquet(world.events), world.as_of)
    local = risk_columns(bundle, rows.with_columns(pl.col("user_id").cast(pl.String)))
    events = spark.read.parquet(str(world.events))
    # the pickled bytes, as a caller on Spark Connect would ship them
    payload = world.bundle.read_bytes()
    got = collect(score_spark(events, world.as_of, payload, spark=spark, partitions=3))
    assert got.schema == pl.Schema(SCORE_COLUMNS)
    assert got.height == rows.height > 100
    assert set(got["risk_segment"]) <= {"high", "medium", "low"}
    assert_frame_equal(got, local.sort("user_id"), check_exact=False, abs_tol=1e-12)


@pytest.mark.spark
def test_a_bundle_that_does_not_fit_fails_on_the_driver(world: World, spark: SparkSession) -> None:
    from lapse.spark import score_spark

    bundle = ChurnBundle.load(world.bundle)
    bundle.feature_schema = {**bundle.feature_schema, "no_such_feature": "Float64"}
    with pytest.raises(LapseError, match="no_such_feature is missing"):
        score_spark(str(world.events), world.as_of, bundle, spark=spark)
    with pytest.raises(LapseError, match="not a ChurnBundle"):
        score_spark(str(world.events), world.as_of, pickle.dumps(1), spark=spark)


@pytest.mark.spark
def test_naive_timestamps_and_empty_partitions(world: World, spark: SparkSession) -> None:
    """Three users over eight partitions (most empty), `ts` as TIMESTAMP_NTZ: the same rows."""
    from pyspark.sql import functions as F

    from lapse.spark import build_features_spark

    config = load_config()
    events = pl.read_parquet(world.events)
    three = events["user_id"].unique().sort().head(3).to_list()
    few = events.filter(pl.col("user_id").is_in(three))
    frame = (
        spark.read.parquet(str(world.events))
        .filter(F.col("user_id").isin(three))
        .withColumn("ts", F.col("ts").cast("timestamp_ntz"))  # wall clock in UTC
    )
    assert dict(frame.dtypes)["ts"] == "timestamp_ntz"
    got = collect(build_features_spark(frame, world.as_of, config, spark=spark, partitions=8))
    assert_frame_equal(got, build(few.lazy(), world.as_of, config), check_exact=False)


@pytest.mark.spark
def test_cli_spark_engine_writes_the_local_file(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    day = f"{world.as_of:%Y-%m-%d}"
    for engine in ("local", "spark"):
        args = ["features", str(world.events), "--as-of", day, "--out", str(tmp_path / engine)]
        result = runner.invoke(app, [*args, "--engine", engine])
        assert result.exit_code == 0, result.output
        assert "engine" in result.output
    # one file each, no Spark part folders or temporary files left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "spark"]
    local = pl.read_parquet(tmp_path / "local")
    assert_frame_equal(pl.read_parquet(tmp_path / "spark"), local, check_exact=False)


def test_unknown_engine_is_refused(world: World, tmp_path: Path) -> None:
    args = ["features", str(world.events), "--as-of", "2026-06-01", "--out", str(tmp_path / "f")]
    result = runner.invoke(app, [*args, "--engine", "dask"])
    assert result.exit_code == 2
    assert "--engine must be one of local, spark" in result.output


def test_missing_pyspark_names_the_extra_and_java(monkeypatch: pytest.MonkeyPatch) -> None:
    from lapse.spark import require_spark

    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    with pytest.raises(LapseError, match=r"lapse\[spark\].*Java 17\+.*openjdk-17-jre-headless"):
        require_spark()


def test_unsigned_and_categorical_columns_become_spark_types() -> None:
    """Spark has no unsigned integers: the batches carry the next wider signed type."""
    from lapse.spark import _schemas, _to_arrow

    frame = pl.DataFrame(
        {
            "user_id": pl.Series(["a", "b"], dtype=pl.Categorical),
            "n": pl.Series([1, 2], dtype=pl.UInt32),
            "small": pl.Series([1, 2], dtype=pl.UInt8),
            "tags": [["x"], []],
        }
    )
    ddl, target = _schemas(frame.schema)
    assert ddl == "`user_id` STRING, `n` BIGINT, `small` SMALLINT, `tags` ARRAY<STRING>"
    (batch,) = list(_to_arrow(frame, target))
    assert batch.schema == target
    assert batch.column("n").to_pylist() == [1, 2]


CONNECT = """
import sys
from datetime import datetime

import polars as pl
from pyspark.sql import SparkSession

from lapse.config import load_config
from lapse.spark import build_features_spark

events, as_of, out = sys.argv[1], datetime.fromisoformat(sys.argv[2]), sys.argv[3]
spark = SparkSession.builder.remote("local[2]").getOrCreate()
assert type(spark).__module__ == "pyspark.sql.connect.session"
frame = build_features_spark(events, as_of, load_config(), spark=spark, partitions=4)
pl.from_arrow(frame.toArrow()).write_parquet(out)
spark.stop()
"""


@pytest.mark.spark
def test_spark_connect_gives_the_same_features(world: World, tmp_path: Path) -> None:
    """Over Spark Connect (a local server, so no sparkContext): the same rows.

    In a fresh interpreter: one process cannot hold a classic and a Connect session.
    """
    pytest.importorskip("grpc")
    out = tmp_path / "connect.parquet"
    argv = [sys.executable, "-c", CONNECT, str(world.events), world.as_of.isoformat(), str(out)]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    local = build(pl.scan_parquet(world.events), world.as_of, load_config())
    assert_frame_equal(pl.read_parquet(out).sort("user_id"), local, check_exact=False)
