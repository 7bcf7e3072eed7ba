"""Events from PostgreSQL, DuckDB files and Delta tables equal the same events from Parquet.

The PostgreSQL tests run against a real server (see ``tests/pg_server.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lapse.config import LapseConfig, load_config
from lapse.datasets import generate
from lapse.events import validate_events
from lapse.events.database import scan_database
from lapse.exceptions import ConfigError, ReadError
from lapse.features import build
from pg_server import pg_schema, pg_server  # noqa: F401  (fixtures)

AS_OF = datetime(2026, 3, 1, tzinfo=UTC)
PASSWORD = "lapse-ci-secret"


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return generate(n_users=150, n_days=90, seed=7).events


def sql_config(**sql: Any) -> LapseConfig:
    config = load_config()
    data = config.model_dump()
    data["source"]["format"] = sql.pop("format", "auto")
    data["source"]["sql"] = {"uri_env": "LAPSE_EVENTS_DB_URI", **sql}
    return LapseConfig.model_validate(data)


def load_postgres(uri: str, frame: pl.DataFrame, table: str = "events") -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(uri) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (user_id text, ts timestamptz, event text, sku text, "
                "quantity double precision, revenue double precision)"
            ).format(sql.Identifier(table))
        )
        conn.execute(sql.SQL("CREATE INDEX ON {} (ts)").format(sql.Identifier(table)))
        with conn.cursor().copy(
            sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))
        ) as copy:
            for row in frame.iter_rows():
                copy.write_row(row)


def features_of(path: str | Path, config: LapseConfig) -> pl.DataFrame:
    kept, _ = validate_events(path, config, as_of=AS_OF)
    return build(kept.lazy(), AS_OF, config).sort("user_id")


# -- PostgreSQL -------------------------------------------------------------------------


def test_postgres_features_equal_parquet(
    events: pl.DataFrame,
    tmp_path: Path,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, _ = pg_schema
    load_postgres(uri, events)
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    parquet = tmp_path / "events.parquet"
    events.write_parquet(parquet)

    from_files = features_of(parquet, load_config())
    from_sql = features_of("sql", sql_config(table="events", chunk_rows=997))
    assert from_sql.height > 100
    assert_frame_equal(from_sql, from_files)
    # a query works the same way, the window wrapped around it
    from_query = features_of("sql", sql_config(query="SELECT * FROM events WHERE true;"))
    assert_frame_equal(from_query, from_files)


def test_postgres_pushes_the_window_down(
    events: pl.DataFrame,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, _ = pg_schema
    load_postgres(uri, events)
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    start = AS_OF - timedelta(days=28)
    expected = events.filter((pl.col("ts") < AS_OF) & (pl.col("ts") >= start)).height
    assert 0 < expected < events.height

    read = scan_database("sql", sql_config(table="events", max_window_days=28).source, as_of=AS_OF)
    frame = read.collect()
    # only the window's rows crossed the wire
    assert frame.height == expected
    assert frame["ts"].min() >= start and frame["ts"].max() < AS_OF  # type: ignore[operator]
    # without a window bound: everything before the cutoff, nothing at or after it
    everything = scan_database("sql", sql_config(table="events").source, as_of=AS_OF).collect()
    assert everything.height == events.filter(pl.col("ts") < AS_OF).height


def test_postgres_window_without_rows_is_a_clear_error(
    events: pl.DataFrame,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, _ = pg_schema
    load_postgres(uri, events)
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    with pytest.raises(ReadError, match=r"no rows with ts in \[2025-12-02 00:00 UTC, 2026-01-01"):
        scan_database(
            "sql",
            sql_config(table="events", max_window_days=30).source,
            as_of=datetime(2026, 1, 1, tzinfo=UTC),
        )


def test_postgres_bad_credentials_missing_table_and_column_are_clear(
    events: pl.DataFrame,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, _ = pg_schema
    load_postgres(uri, events)

    wrong = uri.replace(PASSWORD, "not-the-password")
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", wrong)
    with pytest.raises(ReadError) as bad:
        scan_database("sql", sql_config(table="events").source, as_of=AS_OF)
    message = str(bad.value)
    assert "authentication failed" in message and "$LAPSE_EVENTS_DB_URI" in message
    assert "not-the-password" not in message and wrong not in message

    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    with pytest.raises(ReadError) as missing:
        scan_database("sql", sql_config(table="evnets").source, as_of=AS_OF)
    message = str(missing.value)
    assert "table 'evnets' does not exist; the database has [events" in message
    assert PASSWORD not in message

    config = sql_config(table="events")
    config.source.columns = {"ts": "event_time"}
    with pytest.raises(ReadError, match=r"no timestamp column 'event_time'.*\[user_id, ts, event"):
        scan_database("sql", config.source, as_of=AS_OF)


def test_postgres_unreachable_and_unset_uri_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"postgresql://lapse:{PASSWORD}@127.0.0.1:{port}/lapse"
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    with pytest.raises(ReadError) as down:
        scan_database("sql", sql_config(table="events").source, as_of=AS_OF)
    message = str(down.value)
    assert f"cannot reach the PostgreSQL server at 127.0.0.1:{port}" in message
    assert PASSWORD not in message

    monkeypatch.delenv("LAPSE_EVENTS_DB_URI")
    with pytest.raises(ReadError, match="environment variable LAPSE_EVENTS_DB_URI is not set"):
        scan_database("sql", sql_config(table="events").source, as_of=AS_OF)


def test_sql_config_needs_one_relation() -> None:
    with pytest.raises(ValueError, match="exactly one of 'table' and 'query'"):
        sql_config(table="events", query="SELECT 1")
    data = load_config().model_dump()
    data["source"]["format"] = "sql"
    with pytest.raises(ValueError, match="needs a 'sql' block"):
        LapseConfig.model_validate(data)
    assert sql_config(table="events").source.kind == "sql"
    assert isinstance(ConfigError("x"), Exception)


def test_docs_recommend_an_index_on_the_timestamp_column() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "sql.md").read_text(encoding="utf-8")
    assert "CREATE INDEX" in page and "(ts)" in page


# -- DuckDB and Delta ---------------------------------------------------------------------


def test_duckdb_file_features_equal_parquet(events: pl.DataFrame, tmp_path: Path) -> None:
    import duckdb

    parquet = tmp_path / "events.parquet"
    events.write_parquet(parquet)
    db = tmp_path / "events.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f"CREATE TABLE events AS SELECT * FROM read_parquet('{parquet}')")
    config = sql_config(format="duckdb", table="events", chunk_rows=1000)
    assert_frame_equal(features_of(db, config), features_of(parquet, load_config()))

    windowed = sql_config(format="duckdb", table="events", max_window_days=28)
    got = scan_database(db, windowed.source, as_of=AS_OF).collect()
    start = AS_OF - timedelta(days=28)
    assert got.height == events.filter((pl.col("ts") < AS_OF) & (pl.col("ts") >= start)).height
    with pytest.raises(
        ReadError, match=r"table evnets does not exist; the database has \[events\]"
    ):
        scan_database(db, sql_config(format="duckdb", table="evnets").source, as_of=AS_OF)


def test_delta_table_features_equal_parquet(events: pl.DataFrame, tmp_path: Path) -> None:
    parquet = tmp_path / "events.parquet"
    events.write_parquet(parquet)
    table = tmp_path / "events_delta"
    events.write_delta(table)
    data = load_config().model_dump()
    data["source"]["format"] = "delta"
    config = LapseConfig.model_validate(data)
    assert_frame_equal(features_of(table, config), features_of(parquet, load_config()))
    with pytest.raises(ReadError, match="no Delta table there"):
        scan_database(tmp_path / "nothing", config.source, as_of=AS_OF)


def test_ci_turns_a_missing_server_into_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import pg_server as pg

    monkeypatch.delenv("LAPSE_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server"):
        pg._unavailable("none here")
    monkeypatch.setenv("LAPSE_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is required"):
        pg._unavailable("none here")
