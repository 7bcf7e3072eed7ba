"""The SQL sink: its tables equal the file sink's output after a run, a re-run and a resume.

Runs against a real PostgreSQL server (see ``tests/pg_server.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from lapse.config import load_config
from lapse.delivery.ledger import Ledger
from lapse.score.run import run_score
from lapse.sinks import SINKS, make_sink
from lapse.sinks.base import RECORD_COLUMNS, RECORD_SCHEMA, Item, Outcome, SinkAuthError
from lapse.sinks.file import read_records
from lapse.sinks.sql import HISTORY_TABLE, LATEST_TABLE, SqlSink
from pg_server import pg_schema, pg_server  # noqa: F401  (fixtures)
from worlds import World, trained_world, world_config

PASSWORD = "lapse-ci-secret"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return trained_world(
        tmp_path_factory.mktemp("sql_sink"),
        n_users=600,
        n_days=200,
        seed=5,
        train_days=165,
        score_day=175,
    )


def config_for(home: Path, world: World) -> Any:
    return load_config(world_config(home, world, batch_size=60, backoff_seconds=0.0))


def table(uri: str, name: str, run_id: str | None = None) -> pl.DataFrame:
    import psycopg
    from psycopg import sql

    stmt = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, RECORD_COLUMNS)), sql.Identifier(name)
    )
    with psycopg.connect(uri) as conn:
        if run_id is None:
            rows = conn.execute(stmt + sql.SQL(" ORDER BY user_id")).fetchall()
        else:
            where = sql.SQL(" WHERE score_run_id = %s ORDER BY user_id")
            rows = conn.execute(stmt + where, [run_id]).fetchall()
    return pl.DataFrame(rows, schema=RECORD_SCHEMA, orient="row")


def same_records(got: pl.DataFrame, expected: pl.DataFrame, run_id: str) -> None:
    """Equal to the file sink's records but for the run id (each run has its own)."""
    assert got.height == expected.height > 0
    assert got["score_run_id"].unique().to_list() == [run_id]
    assert_frame_equal(
        got.drop("score_run_id"), expected.sort("user_id").drop("score_run_id"), check_exact=True
    )


def celebrated(records: pl.DataFrame) -> pl.DataFrame:
    """The records of a later run for the same sink: a milestone is celebrated once, so it
    is gone (and with it the reasons of a low-risk user who fired nothing else)."""
    triggers = pl.col("triggers").list.eval(pl.element().filter(pl.element() != "milestone"))
    said = (pl.col("risk_segment") != "low") | (pl.col("triggers").list.len() > 0)
    empty = pl.lit([], dtype=pl.List(pl.String))
    out = records.with_columns(triggers)
    return out.with_columns(pl.when(said).then("reasons").otherwise(empty).alias("reasons"))


class InterruptedSqlSink(SqlSink):
    """Writes batch number 3, then loses its credentials before the ledger hears of it."""

    sent = 0

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        out = super().send(batch_id, items)
        InterruptedSqlSink.sent += 1
        if InterruptedSqlSink.sent == 3:
            raise SinkAuthError("credentials revoked mid-run")
        return out


def test_sql_tables_equal_the_file_sink_after_run_rerun_and_resume(
    world: World,
    _isolated_home: Path,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, _ = pg_schema
    monkeypatch.setenv("LAPSE_SQL_SINK_URI", uri)
    config = config_for(_isolated_home, world)
    common: dict[str, Any] = {"as_of": world.as_of, "model": str(world.bundle)}
    out = _isolated_home / "scores.parquet"
    run_score(world.events, config, sink="file", out=out, **common)
    expected = read_records(out)

    first = run_score(world.events, config, sink="sql", **common)
    assert first.counts["sent"] == expected.height
    same_records(table(uri, LATEST_TABLE), expected, first.score_run_id)
    same_records(table(uri, HISTORY_TABLE, first.score_run_id), expected, first.score_run_id)

    again = run_score(world.events, config, sink="sql", **common)
    assert expected["triggers"].list.contains("milestone").any()
    expected = celebrated(expected)
    same_records(table(uri, LATEST_TABLE), expected, again.score_run_id)
    same_records(table(uri, HISTORY_TABLE, again.score_run_id), expected, again.score_run_id)
    assert table(uri, HISTORY_TABLE).height == 2 * expected.height

    monkeypatch.setitem(SINKS, "sql", "test_sinks_sql:InterruptedSqlSink")
    with pytest.raises(SinkAuthError, match="revoked"):
        run_score(world.events, config, sink="sql", **common)
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        run_id = ledger.runs()[-1][0]
        assert ledger.run(run_id, "sql").status == "interrupted"
        batches = ledger.batches(run_id, "sql")
    assert sum(b.state == "done" for b in batches) == 2 and len(batches) > 3
    # the batch written before the failure is in the table, yet not marked done
    assert 0 < table(uri, HISTORY_TABLE, run_id).height < expected.height

    monkeypatch.setitem(SINKS, "sql", "lapse.sinks.sql:SqlSink")
    resumed = run_score(world.events, config, as_of=world.as_of, resume=run_id)
    assert resumed.score_run_id == run_id
    same_records(table(uri, LATEST_TABLE), expected, run_id)
    same_records(table(uri, HISTORY_TABLE, run_id), expected, run_id)
    assert table(uri, HISTORY_TABLE).height == 3 * expected.height


def test_tables_have_proper_types_and_keys(
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    uri, schema = pg_schema
    monkeypatch.setenv("LAPSE_SQL_SINK_URI", uri)
    data = load_config().model_dump(by_alias=True)
    data["sinks"]["sql"]["schema"] = f"{schema}_out"
    sink = make_sink("sql", type(load_config()).model_validate(data))
    try:
        assert "reachable" in sink.check()
        assert PASSWORD not in sink.describe()
    finally:
        sink.close()
    with psycopg.connect(uri) as conn:
        types = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s",
                [f"{schema}_out"],
            ).fetchall()
        )
        keys = conn.execute(
            "SELECT tc.table_name, string_agg(k.column_name, ',' ORDER BY k.ordinal_position) "
            "FROM information_schema.table_constraints tc JOIN information_schema.key_column_usage k "
            "USING (constraint_schema, constraint_name) WHERE tc.constraint_type = 'PRIMARY KEY' "
            "AND tc.table_schema = %s GROUP BY 1 ORDER BY 1",
            [f"{schema}_out"],
        ).fetchall()
        conn.execute(f'DROP SCHEMA "{schema}_out" CASCADE')
    assert types[f"{LATEST_TABLE}.reasons"] == "ARRAY"
    assert types[f"{LATEST_TABLE}.as_of"] == "date"
    assert types[f"{HISTORY_TABLE}.churn_risk"] == "double precision"
    assert types[f"{HISTORY_TABLE}.next_order_date"] == "date"
    assert keys == [(HISTORY_TABLE, "user_id,sink,score_run_id"), (LATEST_TABLE, "user_id,sink")]


def test_bad_or_missing_credentials_are_clear_and_secret_free(
    pg_server: str,  # noqa: F811
) -> None:
    wrong = pg_server.replace(PASSWORD, "not-the-password")
    sink = SqlSink(wrong)
    with pytest.raises(SinkAuthError) as bad:
        sink.check()
    message = str(bad.value)
    assert "authentication failed" in message and "$LAPSE_SQL_SINK_URI" in message
    assert "not-the-password" not in message and wrong not in message
    with pytest.raises(SinkAuthError, match="environment variable LAPSE_SQL_SINK_URI"):
        SqlSink(None).send("b1", [])


def test_cli_scores_events_from_postgres_into_postgres(
    world: World,
    _isolated_home: Path,
    pg_schema: tuple[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app
    from test_events_sql import load_postgres

    uri, _ = pg_schema
    load_postgres(uri, pl.read_parquet(world.events))
    monkeypatch.setenv("LAPSE_EVENTS_DB_URI", uri)
    monkeypatch.setenv("LAPSE_SQL_SINK_URI", uri)
    config = config_for(_isolated_home, world)
    out = _isolated_home / "scores.parquet"
    run_score(world.events, config, as_of=world.as_of, model=str(world.bundle), out=out)
    expected = read_records(out)

    path = _isolated_home / "lapse.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["source"]["sql"] = {"table": "events"}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    args = ["--as-of", f"{world.as_of:%Y-%m-%d}", "--config", str(path)]
    res = CliRunner().invoke(
        app, ["score", "sql", *args, "--model", str(world.bundle), "--sink", "sql"]
    )
    assert res.exit_code == 0, res.output
    assert PASSWORD not in res.output
    latest = table(uri, LATEST_TABLE)
    same_records(latest, expected, latest["score_run_id"][0])
