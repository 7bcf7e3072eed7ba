"""The Spark engine (`lapse.spark.engine`) gives the local engine's features and scores, row for row.

Tests that start Spark are marked ``spark`` (one ``local[2]`` session for the
module); skip them with ``pytest -m "not spark"``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import LapseConfig, dump_config, load_config
from lapse.delivery.ledger import Ledger
from lapse.exceptions import LapseError
from lapse.features import build
from lapse.modeling.bundle import ChurnBundle
from lapse.score.records import risk_columns
from lapse.score.run import run_score
from lapse.score.steps import ScoreRunResult
from lapse.sinks import RECORD_COLUMNS
from lapse.sinks.file import read_records
from worlds import World, identity_folder, trained_world, write_login

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession  # noqa: TID251  # the engine's own tests

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
    from lapse.spark.engine import build_features_spark

    config = load_config()
    local = build(pl.scan_parquet(world.events), world.as_of, config)
    got = collect(build_features_spark(str(world.events), world.as_of, config, spark=spark))
    assert got.height == local.height > 200
    assert_frame_equal(got, local, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.spark
def test_features_with_an_order_key_equal_the_local_engine(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    from lapse.spark.engine import build_features_spark

    # a user's purchases in one ISO week share an order id; other events carry none
    week = pl.col("user_id") + pl.col("ts").dt.strftime("/%G-%V")
    keyed = pl.read_parquet(world.events).with_columns(
        pl.when(pl.col("event") == "order_completed").then(week).alias("order_id")
    )
    path = tmp_path / "keyed.parquet"
    keyed.write_parquet(path)
    config = load_config()
    local = build(pl.scan_parquet(path), world.as_of, config)
    per_row = build(pl.scan_parquet(world.events), world.as_of, config)
    assert (local["order_count"] < per_row["order_count"]).any()
    got = collect(build_features_spark(str(path), world.as_of, config, spark=spark))
    assert_frame_equal(got, local, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.spark
def test_core_features_with_static_attributes_equal_the_local_engine(
    world: World, spark: SparkSession
) -> None:
    from lapse.spark.engine import build_features_spark

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
    from lapse.spark.engine import SCORE_COLUMNS, score_spark

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
    from lapse.spark.engine import score_spark

    bundle = ChurnBundle.load(world.bundle)
    bundle.feature_schema = {**bundle.feature_schema, "no_such_feature": "Float64"}
    with pytest.raises(LapseError, match="no_such_feature is missing"):
        score_spark(str(world.events), world.as_of, bundle, spark=spark)
    with pytest.raises(LapseError, match="not a ChurnBundle"):
        score_spark(str(world.events), world.as_of, pickle.dumps(1), spark=spark)


@pytest.mark.spark
def test_naive_timestamps_and_empty_partitions(world: World, spark: SparkSession) -> None:
    """Three users over eight partitions (most empty), `ts` as TIMESTAMP_NTZ: the same rows."""
    from pyspark.sql import functions as F  # noqa: TID251  # builds Spark input by hand

    from lapse.spark.engine import build_features_spark

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
    from lapse.spark.engine import require_spark

    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    with pytest.raises(LapseError, match=r"lapse\[spark\].*Java 17\+.*openjdk-17-jre-headless"):
        require_spark()


def test_unsigned_and_categorical_columns_become_spark_types() -> None:
    """Spark has no unsigned integers: the batches carry the next wider signed type."""
    from lapse.spark.engine import _schemas, _to_arrow

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

from lapse.config import LapseConfig, dump_config, load_config
from lapse.spark.engine import build_features_spark

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


# -- the score run -----------------------------------------------------------------------


def score_config(root: Path, world: World, **source: object) -> LapseConfig:
    """The default config with its own audit folder (ledger) under ``root``, small batches."""
    base = load_config()
    return base.model_copy(
        update={
            "audit": base.audit.model_copy(update={"path": str(root / "audit")}),
            "attributes": base.attributes.model_copy(
                update={"path": str(world.users), "static_features": []}
            ),
            "delivery": base.delivery.model_copy(update={"batch_size": 40}),
            "source": base.source.model_copy(update=source),
        }
    )


def run_both(
    world: World, spark: SparkSession, root: Path, days: int, events: str | None = None
) -> dict[str, tuple[ScoreRunResult, LapseConfig]]:
    """The same score runs (``days`` nights in a row) with each engine, each with its own ledger."""
    out: dict[str, tuple[ScoreRunResult, LapseConfig]] = {}
    for engine in ("local", "spark"):
        config = score_config(root / engine, world)
        for day in range(days):
            result = run_score(
                world.events if events is None or engine == "local" else Path(events),
                config,
                as_of=world.as_of + timedelta(days=day),
                model=str(world.bundle),
                sink="file",
                out=root / engine / f"scores-{day}.parquet",
                engine=engine,  # type: ignore[arg-type]
                spark=spark,
            )
            out[engine] = (result, config)
    return out


def snapshot(result: ScoreRunResult) -> pl.DataFrame:
    assert result.snapshot is not None
    return pl.read_parquet(result.snapshot).drop("score_run_id")


def ledger_state(config: LapseConfig) -> tuple[object, ...]:
    with Ledger(Path(config.audit.path) / "ledger.sqlite") as ledger:
        return (
            sorted(ledger.fired("file")),
            sorted(ledger.delivered("file").items()),
            ledger.messages("file", since=date(2000, 1, 1), until=date(2100, 1, 1)),
        )


@pytest.mark.spark
def test_score_engine_spark_gives_the_local_records_ledger_and_file(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    """Two nights in a row: cooldowns from the first night's ledger apply on the second."""
    both = run_both(world, spark, tmp_path, days=2)
    (local, local_cfg), (got, spark_cfg) = both["local"], both["spark"]
    assert got.counts == local.counts
    assert got.segments == local.segments and got.triggers == local.triggers
    assert got.drift == pytest.approx(local.drift, abs=1e-9)
    assert got.warnings == local.warnings
    assert got.validation == local.validation
    # who was scored and why not, summed over the partitions
    assert got.population == local.population
    assert local.population["customers"] > local.population["eligible"] == local.counts["scored"]
    assert got.who_was_scored == local.who_was_scored
    assert_frame_equal(snapshot(got), snapshot(local), check_exact=False, abs_tol=1e-12)
    for day in range(2):
        files = [
            read_records(tmp_path / e / f"scores-{day}.parquet").drop("score_run_id")
            for e in ("spark", "local")
        ]
        assert_frame_equal(*files, check_exact=False, abs_tol=1e-12)
        assert set(RECORD_COLUMNS) - {"score_run_id"} <= set(files[0].columns)
    fired, delivered, messages = ledger_state(spark_cfg)
    assert (fired, delivered, messages) == ledger_state(local_cfg)
    assert fired, "some trigger fired and started its cooldown"
    assert snapshot(got)["reasons"].list.len().sum() > 0, "reasons filled for the users sent"
    # nothing of the run's Spark output is left behind in the audit folder
    assert not (Path(spark_cfg.audit.path) / "spark").exists()


@pytest.mark.spark
def test_nothing_to_score_and_another_sources_events_say_the_same_on_spark(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    late = world.as_of + timedelta(days=400)
    other = tmp_path / "web.parquet"
    pl.read_parquet(world.events).with_columns(
        ("web_" + pl.col("event")).alias("event")
    ).write_parquet(other)
    for events, as_of, words in ((world.events, late, "0 of "), (other, world.as_of, "share no")):
        said = {}
        for engine in ("local", "spark"):
            config = score_config(tmp_path / engine, world)
            with pytest.raises(LapseError) as info:
                run_score(
                    events,
                    config,
                    as_of=as_of,
                    model=str(world.bundle),
                    dry_run=True,
                    engine=engine,  # type: ignore[arg-type]
                    spark=spark,
                )
            said[engine] = str(info.value)
        assert said["spark"] == said["local"] and words in said["local"]


@pytest.mark.spark
def test_a_visitor_messaged_anonymously_counts_toward_the_cap_on_spark_too(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    """Messaged under its device id on night one, identified on night two: on both engines
    the merged customer has had its message of the window, so its trigger is withheld
    (the Spark engine reads the ledger chunk by chunk, for every id of a chunk's people)."""
    snaps = {}
    for engine in ("local", "spark"):
        folder, who = identity_folder(world, tmp_path / engine, login=False)
        raw = yaml.safe_load(dump_config(score_config(tmp_path / engine, world, identity="device")))
        raw["triggers"] = {"veteran": {"when": "tenure_days >= 30", "cooldown_days": 0}}
        raw["control"]["share"] = 0.0
        raw["delivery"]["frequency_cap"] = {"messages": 1, "days": 2}
        path = tmp_path / engine / "lapse.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        config = load_config(path)
        for night in range(2):
            if night:
                write_login(world, folder)
            result = run_score(
                folder,
                config,
                as_of=world.as_of + timedelta(days=night),
                model=str(world.bundle),
                sink="file",
                out=tmp_path / engine / f"scores-{night}.parquet",
                engine=engine,  # type: ignore[arg-type]
                spark=spark,
            )
        snaps[engine] = snapshot(result)
        row = snaps[engine].filter(pl.col("user_id") == who).row(0, named=True)
        assert row["capped"] and row["withheld_triggers"] == ["veteran"], engine
    assert_frame_equal(snaps["spark"], snaps["local"], check_exact=False, abs_tol=1e-12)


@pytest.mark.spark
def test_score_cli_engine_spark(world: World, spark: SparkSession, tmp_path: Path) -> None:
    day = f"{world.as_of:%Y-%m-%d}"
    outs = {}
    for engine in ("local", "spark"):
        cfg_path = tmp_path / f"{engine}.yaml"
        config = score_config(tmp_path / engine, world)
        cfg_path.write_text(dump_config(config), encoding="utf-8")
        outs[engine] = tmp_path / f"{engine}.parquet"
        args = ["score", str(world.events), "--as-of", day, "--model", str(world.bundle)]
        args += ["--config", str(cfg_path), "--out", str(outs[engine]), "--engine", engine]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    spark_rows, local_rows = (
        read_records(outs[e]).drop("score_run_id") for e in ("spark", "local")
    )
    assert_frame_equal(spark_rows, local_rows, check_exact=False, abs_tol=1e-12)


@pytest.mark.spark
def test_mapped_source_from_a_table_rejects_the_same_rows(
    world: World, spark: SparkSession, tmp_path: Path
) -> None:
    """A raw source with its own column names, bad rows and duplicates, read as table:NAME."""
    from lapse.events import validate_events
    from lapse.spark.engine import validated_events_spark

    events = pl.read_parquet(world.events)
    raw = events.rename({"user_id": "customer", "ts": "when", "event": "action"})
    bad = raw.head(12).with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(None)
        .otherwise(pl.col("customer"))
        .alias("customer"),
        pl.when(pl.int_range(pl.len()).is_between(3, 5))
        .then(-1.0)
        .otherwise(pl.col("quantity"))
        .alias("quantity"),
    )
    raw = pl.concat([raw, bad, raw.slice(100, 7)])  # 7 exact duplicates
    path = tmp_path / "raw.parquet"
    raw.write_parquet(path)
    config = score_config(
        tmp_path, world, columns={"user_id": "customer", "ts": "when", "event": "action"}
    )
    kept_local, local = validate_events(
        path, config, as_of=world.as_of, rejects_path=tmp_path / "l.parquet"
    )
    spark.read.parquet(str(path)).createOrReplaceTempView("raw_events")
    checked = validated_events_spark("table:raw_events", config, spark=spark, partitions=3)
    got = checked.report(config, as_of=world.as_of, rejects=tmp_path / "s.parquet")
    assert got.rows_rejected == local.rows_rejected > 0
    assert got.rejected_by_reason == local.rejected_by_reason
    assert got.duplicates == local.duplicates >= 7
    for field in (
        "rows_read",
        "rows_kept",
        "users",
        "ts_min",
        "ts_max",
        "events_per_role",
        "events_per_name",
        "future_events",
    ):
        assert getattr(got, field) == getattr(local, field), field
    assert (
        pl.read_parquet(tmp_path / "s.parquet").height
        == pl.read_parquet(tmp_path / "l.parquet").height
    )
    kept = collect(checked.kept).sort("user_id", "ts", "event")
    assert_frame_equal(kept, kept_local.sort("user_id", "ts", "event"), check_exact=False)

    # guest rows: the three rows without a customer are counted, not rejected, on both engines
    config.source.allow_guest_rows = True
    _, local = validate_events(path, config, as_of=world.as_of, rejects_path=tmp_path / "g.parquet")
    checked = validated_events_spark("table:raw_events", config, spark=spark, partitions=3)
    got = checked.report(config, as_of=world.as_of, rejects=tmp_path / "gs.parquet")
    assert got.guest_rows == local.guest_rows == 3
    assert got.rejected_by_reason == local.rejected_by_reason
    assert got.rejected_by_reason["null_user_id"] == 0
    assert (got.rows_kept, got.duplicates) == (local.rows_kept, local.duplicates)
    assert pl.read_parquet(tmp_path / "gs.parquet").height == local.rows_rejected


@pytest.mark.spark
def test_a_missing_table_or_delta_says_what_to_do(spark: SparkSession, tmp_path: Path) -> None:
    from lapse.spark.engine import read_source

    with pytest.raises(LapseError, match="no such table"):
        read_source(spark, "table:nowhere.none")
    (tmp_path / "t" / "_delta_log").mkdir(parents=True)
    with pytest.raises(LapseError, match="delta-spark"):
        read_source(spark, tmp_path / "t")


@pytest.mark.spark
def test_orders_on_the_online_retail_reference_equal_the_local_engine(
    spark: SparkSession, tmp_path: Path
) -> None:
    """``order_id: InvoiceNo`` on the reference file (skipped without it), both engines."""
    from lapse.events import validate_events
    from lapse.spark.engine import validated_events_spark
    from retail import AS_OF, check_orders, reference_file, write_config

    source = reference_file()
    config = write_config(tmp_path)
    for engine in ("local", "spark"):
        args = ["features", str(source), "--as-of", f"{AS_OF:%Y-%m-%d}", "-c", str(config)]
        result = runner.invoke(app, [*args, "--out", str(tmp_path / engine), "--engine", engine])
        assert result.exit_code == 0, result.output
    local = pl.read_parquet(tmp_path / "local")
    got = pl.read_parquet(tmp_path / "spark")
    check_orders(got, source)
    assert_frame_equal(got.sort("user_id"), local.sort("user_id"), check_exact=False)
    loaded = load_config(config)
    _, report = validate_events(source, loaded, as_of=AS_OF, rejects_path=tmp_path / "l.parquet")
    checked = validated_events_spark(str(source), loaded, spark=spark)
    spark_report = checked.report(loaded, as_of=AS_OF, rejects=tmp_path / "s.parquet")
    assert spark_report.purchase_orders == report.purchase_orders > 18_000


@pytest.mark.spark
def test_identity_links_give_the_same_ids_on_spark(spark: SparkSession, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from lapse.datasets import generate, segment_export
    from lapse.events import read_links, validate_events
    from lapse.spark.engine import build_features_spark, validated_events_spark

    calls, identities = segment_export(generate(n_users=80, n_days=60, seed=7).events, seed=7)
    # a Segment export as a warehouse table holds it (properties as plain columns)
    path = tmp_path / "segment.parquet"
    calls.unnest("properties").write_parquet(path)
    config = load_config()
    as_of = datetime(2026, 2, 1, tzinfo=UTC)
    events, report = validate_events(path, config, as_of=as_of)
    links = read_links(path, config)
    local = build(events.lazy(), as_of, config, links=links)

    checked = validated_events_spark(str(path), config, spark=spark)
    on_spark = checked.report(config, as_of=as_of)
    assert checked.links.equals(links)
    assert on_spark.calls == report.calls == {"identify": identities.height}
    for name in ("rows_read", "rows_kept", "links", "merged_ids", "anonymous_only", "users"):
        assert getattr(on_spark, name) == getattr(report, name), name
    assert on_spark.rows_rejected == report.rows_rejected == 0
    got = collect(
        build_features_spark(checked.kept, as_of, config, spark=spark, links=checked.links)
    )
    anonymous = got.filter(pl.col("user_id").str.starts_with("anon-")).height
    assert 0 < anonymous < got.height  # some visitors still anonymous on Feb 1, some stitched
    assert_frame_equal(got, local, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)
