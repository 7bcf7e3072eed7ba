"""The SQL sink: records into PostgreSQL tables that reverse-ETL tools and analysts read.

Two tables, created with proper types when absent (in ``sinks.sql.schema`` when set):

- ``lapse_scores_latest``: one row per (``user_id``, ``sink``), upserted, so it
  always holds each user's most recent score; a resumed older run never
  overwrites a newer one (rows are replaced only by an equal or later
  (``as_of``, ``score_run_id``)).
- ``lapse_scores_history``: one row per (``user_id``, ``sink``, ``score_run_id``).

``sink`` is ``sinks.sql.label`` (default ``sql``), so several deployments can
share the tables. Each batch is written in one transaction with
``INSERT ... ON CONFLICT DO UPDATE`` into both tables, so resending a batch
(a retry, a resume) changes nothing. Like the file sink it receives every
record of every run (a full snapshot).

The connection URI comes from the environment variable ``sinks.sql.uri_env``
(default ``LAPSE_SQL_SINK_URI``) and appears in no message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lapse.events.database import describe_uri
from lapse.redact import redact
from lapse.sinks.base import (
    RECORD_COLUMNS,
    Item,
    Limits,
    Outcome,
    Record,
    RetryableError,
    Sink,
    SinkAuthError,
    SinkError,
)

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["HISTORY_TABLE", "LATEST_TABLE", "SQL_TYPES", "SqlSink"]

LATEST_TABLE: Final = "lapse_scores_latest"
HISTORY_TABLE: Final = "lapse_scores_history"

#: Column -> PostgreSQL type: the record columns, then the sink label and write time.
SQL_TYPES: Final[dict[str, str]] = {
    "user_id": "text NOT NULL",
    "sink": "text NOT NULL",
    "as_of": "date NOT NULL",
    "score_run_id": "text NOT NULL",
    "churn_risk": "double precision",
    "churn_risk_percentile": "double precision",
    "risk_segment": "text",
    "reasons": "text[]",
    "triggers": "text[]",
    "refill_sku": "text",
    "next_order_date": "date",
    "depletion_date": "date",
    "refill_prompt_date": "date",
    "model_name": "text",
    "model_version": "text",
}
_COLUMNS: Final = tuple(SQL_TYPES)
_KEYS: Final = {
    LATEST_TABLE: ("user_id", "sink"),
    HISTORY_TABLE: ("user_id", "sink", "score_run_id"),
}


class SqlSink(Sink):
    """Upserts records into ``lapse_scores_latest`` and ``lapse_scores_history``."""

    name = "sql"
    limits = Limits(max_items=1000)
    full_snapshot = True
    anonymous_identifier = "user_id"  # lapse's own table: the id as scored

    def __init__(
        self,
        uri: str | None,
        *,
        uri_env: str = "LAPSE_SQL_SINK_URI",
        schema: str | None = None,
        label: str = "sql",
        limits: Limits | None = None,
    ) -> None:
        self._uri = uri
        self.uri_env = uri_env
        self.schema = schema
        self.label = label
        if limits is not None:
            self.limits = limits
        self._conn: Any = None
        self._ready = False

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> SqlSink:
        spec = config.sinks.sql
        uri = os.environ.get(spec.uri_env, "").strip() or None
        return cls(
            uri,
            uri_env=spec.uri_env,
            schema=spec.schema_name,
            label=spec.label,
            limits=Limits(max_items=spec.batch_rows),
        )

    # -- connection -------------------------------------------------------------------

    def _message(self, exc: BaseException) -> str:
        return redact(" ".join(str(exc).split()), self._uri)

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise SinkError(
                "the sql sink needs the 'psycopg' package; install the SQL extra: "
                "pip install 'lapse[sql]'"
            ) from None
        if self._uri is None:
            raise SinkAuthError(
                f"the sql sink needs a connection URI in the environment variable "
                f"{self.uri_env}, e.g. postgresql://user:password@host:5432/db"
            )
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        where = describe_uri(self._uri)
        try:
            self._conn = psycopg.connect(self._uri, connect_timeout=10)
        except psycopg.Error as exc:
            detail = self._message(exc)
            low = detail.lower()
            if "authentication failed" in low or "password" in low:
                raise SinkAuthError(
                    f"sql sink: authentication failed at {where}: the server refused the "
                    f"credentials in ${self.uri_env}; check the user and password"
                ) from None
            raise RetryableError(
                f"sql sink: cannot reach the PostgreSQL server at {where}: {detail}"
            ) from None
        self._ready = False
        return self._conn

    def _table(self, table: str) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, table) if self.schema else sql.Identifier(table)

    def _create(self, conn: Any) -> None:
        from psycopg import sql

        with conn.transaction():
            if self.schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            for table, keys in _KEYS.items():
                columns: list[sql.Composable] = [
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
                    for c, t in SQL_TYPES.items()
                ]
                columns.append(sql.SQL("written_at timestamptz NOT NULL DEFAULT now()"))
                columns.append(
                    sql.SQL("PRIMARY KEY ({})").format(
                        sql.SQL(", ").join(map(sql.Identifier, keys))
                    )
                )
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                        self._table(table), sql.SQL(", ").join(columns)
                    )
                )
        self._ready = True

    def _upsert(self, table: str) -> Any:
        from psycopg import sql

        keys = _KEYS[table]
        target = self._table(table)
        updates = [c for c in _COLUMNS if c not in keys]
        stmt = sql.SQL(
            "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        ).format(
            t=target,
            cols=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
            keys=sql.SQL(", ").join(map(sql.Identifier, keys)),
            sets=sql.SQL(", ").join(
                [
                    *(sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in updates),
                    sql.SQL("written_at = now()"),
                ]
            ),
        )
        if table == LATEST_TABLE:
            # a resumed older run never replaces a newer score
            stmt = sql.SQL(
                "{} WHERE (excluded.as_of, excluded.score_run_id) >= ({t}.as_of, {t}.score_run_id)"
            ).format(stmt, t=target)
        return stmt

    # -- the sink protocol ----------------------------------------------------------------

    def encode(self, record: Record) -> Item | None:
        return {k: record[k] for k in RECORD_COLUMNS}

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        import psycopg

        rows = [tuple(self.label if c == "sink" else i[c] for c in _COLUMNS) for i in items]
        conn = self._connect()
        try:
            if not self._ready:
                self._create(conn)
            # one transaction per batch: both tables or neither
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._upsert(LATEST_TABLE), rows)
                cur.executemany(self._upsert(HISTORY_TABLE), rows)
        except psycopg.OperationalError as exc:
            raise RetryableError(f"sql sink: the connection failed: {self._message(exc)}") from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SinkAuthError(f"sql sink: {self._message(exc)}") from None
        except psycopg.Error as exc:
            raise SinkError(f"sql sink: the batch was refused: {self._message(exc)}") from None
        return Outcome()

    def check(self) -> str:
        """Connect, create the tables if absent, and say where the records will go."""
        conn = self._connect()
        self._create(conn)
        return f"sql: {self.describe()} is reachable; the tables exist"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def describe(self) -> str:
        prefix = f"{self.schema}." if self.schema else ""
        where = describe_uri(self._uri) if self._uri else f"${self.uri_env} (unset)"
        return f"sql {prefix}{LATEST_TABLE} + {prefix}{HISTORY_TABLE} at {where}"
