"""Read events from PostgreSQL, DuckDB database files and Delta Lake tables.

The database twin of :mod:`lapse.events.readers`: the result is a raw frame
that :func:`~lapse.events.map_events` maps like any file. Given a cutoff, only
the rows a run needs are read: the time window is pushed down into the
database as bound parameters,

    WHERE ts < :as_of AND ts >= :as_of - :max_window

(the second bound only when ``source.sql.max_window_days`` is set). Table and
column names are quoted as identifiers, never pasted into SQL; rows arrive in
chunks of ``source.sql.chunk_rows``. The PostgreSQL URI comes from the
environment variable named by ``source.sql.uri_env`` and appears in no
message: every error text passes through :func:`lapse.redact.redact`.

The drivers are optional (``pip install 'lapse[sql]'``): psycopg 3 for
PostgreSQL, ``duckdb``, and ``deltalake`` for Delta tables.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, Final
from urllib.parse import urlsplit

import polars as pl

from lapse.config import SourceConfig, SqlSourceConfig
from lapse.events.readers import EventSource, frame_digest, frame_name
from lapse.exceptions import ConfigError, ReadError
from lapse.redact import redact

__all__ = ["describe_uri", "scan_database", "source_label", "window_bounds"]

_LISTED: Final = 40
_EXTRA_HINT: Final = "install the SQL extra: pip install 'lapse[sql]'"

# PostgreSQL type OIDs -> Polars dtypes (anything else is read as text).
_PG_TYPES: Final[dict[int, pl.DataType]] = {
    16: pl.Boolean(),
    20: pl.Int64(),
    21: pl.Int64(),
    23: pl.Int64(),
    700: pl.Float64(),
    701: pl.Float64(),
    1700: pl.Float64(),
    1082: pl.Date(),
    1114: pl.Datetime("us"),
    1184: pl.Datetime("us", "UTC"),
}


def _driver(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReadError(f"{what} needs the {module!r} package; {_EXTRA_HINT}") from None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return f"[{shown}{more}]"


def _ts_column(source: SourceConfig) -> str:
    return source.columns.get("ts", "ts")


def window_bounds(
    spec: SqlSourceConfig | None, as_of: datetime | None
) -> tuple[datetime | None, timedelta | None]:
    """The cutoff (UTC) and the longest window read before it (``None``: all history)."""
    if as_of is None:
        return None, None
    cutoff = as_of if as_of.tzinfo is not None else as_of.replace(tzinfo=UTC)
    days = spec.max_window_days if spec is not None else None
    return cutoff.astimezone(UTC), timedelta(days=days) if days is not None else None


def source_label(path: EventSource, source: SourceConfig) -> str:
    """How messages name the source (for ``sql``: the table or query and the env var; for
    a frame in memory: its kind and content digest, :func:`~lapse.events.readers.frame_digest`)."""
    if not isinstance(path, str | Path):
        return f"{frame_name(path)} (digest {frame_digest(path)})"
    spec = source.sql
    what = (spec.table or "query") if spec is not None else ""
    if source.kind == "sql" and spec is not None:
        return f"sql {what} (${spec.uri_env})"
    if source.kind == "duckdb":
        return f"{path} ({what})"
    return str(path)


def scan_database(
    path: str | Path, source: SourceConfig, *, as_of: datetime | None = None
) -> pl.LazyFrame:
    """The raw events of a ``sql``, ``duckdb`` or ``delta`` source within the cutoff's window.

    Parameters
    ----------
    path
        The DuckDB file or Delta table; ignored for ``sql`` (the URI comes from
        the environment variable ``source.sql.uri_env``).
    as_of
        The cutoff; ``None`` reads every row.

    Raises
    ------
    ReadError
        A driver is missing, the server is unreachable, credentials are refused,
        the table or timestamp column is missing (the available ones are
        listed), or no row falls in the window. No message holds the URI.
    """
    kind = source.kind
    cutoff, window = window_bounds(source.sql, as_of)
    if kind == "delta":
        frame = _scan_delta(str(path), source, cutoff, window)
    else:
        spec = source.sql
        if spec is None:  # the config validator requires it
            raise ReadError(f"format {kind!r} needs a source.sql block with a table or query")
        if kind == "sql":
            frame = _read_postgres(spec, _ts_column(source), cutoff, window).lazy()
        else:
            frame = _read_duckdb(Path(path), spec, _ts_column(source), cutoff, window).lazy()
    return frame


def _no_rows(label: str, cutoff: datetime | None, window: timedelta | None) -> ReadError:
    if cutoff is None:
        return ReadError(f"{label}: the source holds no rows")
    start = f"{(cutoff - window):%Y-%m-%d %H:%M} UTC" if window is not None else "the beginning"
    return ReadError(
        f"{label}: no rows with ts in [{start}, {cutoff:%Y-%m-%d %H:%M} UTC); "
        "check --as-of, source.sql.max_window_days and the table's time range"
    )


# -- PostgreSQL ---------------------------------------------------------------------------


def _pg_uri(spec: SqlSourceConfig) -> str:
    uri = os.environ.get(spec.uri_env, "").strip()
    if not uri:
        raise ReadError(
            f"source.sql.uri_env: the environment variable {spec.uri_env} is not set; "
            "export the connection URI there, e.g. postgresql://user:password@host:5432/db "
            "(it is never read from the config file)"
        )
    return uri


def describe_uri(uri: str) -> str:
    """Host, port, database and user of a PostgreSQL URI, for messages (never the password)."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        db = parts.path.lstrip("/") or "(default)"
        user = parts.username or "(default)"
    except ValueError:
        return "the server"
    return f"{host}:{port} database {db} as user {user}"


def _pg_connect(spec: SqlSourceConfig, purpose: str) -> tuple[Any, str]:
    """An open psycopg connection (session time zone UTC) and its URI, or a clear ReadError."""
    psycopg = _driver("psycopg", f"{purpose} (PostgreSQL)")
    uri = _pg_uri(spec)
    where = describe_uri(uri)
    try:
        conn = psycopg.connect(uri, connect_timeout=10)
        conn.execute("SET TIME ZONE 'UTC'")
    except psycopg.Error as exc:
        detail = redact(" ".join(str(exc).split()), uri)
        low = detail.lower()
        if "authentication failed" in low or "password" in low:
            message = (
                f"authentication failed at {where}: the server refused the credentials in "
                f"${spec.uri_env}; check the user and password"
            )
        elif "database" in low and "does not exist" in low:
            message = f"{where}: the database does not exist; check the path of ${spec.uri_env}"
        else:
            message = (
                f"cannot reach the PostgreSQL server at {where}: {detail}; check the host and "
                f"port in ${spec.uri_env}, that the server runs and accepts TCP connections"
            )
        raise ReadError(f"sql source: {message}") from None
    return conn, uri


def _pg_relation(spec: SqlSourceConfig) -> Any:
    from psycopg import sql

    if spec.table is not None:
        return sql.Identifier(*spec.table.split("."))
    # The query is the operator's own SQL from the config file, not user input.
    return sql.SQL("({}) AS lapse_source").format(sql.SQL(spec.query.rstrip().rstrip(";")))  # type: ignore[union-attr]


def _pg_tables(conn: Any) -> list[str]:
    rows = conn.execute(
        "SELECT table_schema = ANY(current_schemas(false)), table_schema, table_name "
        "FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1 DESC, 2, 3"
    ).fetchall()
    return [name if visible else f"{schema}.{name}" for visible, schema, name in rows]


def _pg_frame(rows: list[tuple[Any, ...]], description: Any) -> pl.DataFrame:
    """One chunk of rows as a frame, typed by the columns' PostgreSQL types (not by values)."""
    values = list(zip(*rows, strict=True)) if rows else [() for _ in description]
    series = []
    for d, column in zip(description, values, strict=True):
        dtype = _PG_TYPES.get(d.type_code, pl.String())
        data = list(column)
        if dtype == pl.String():
            data = [v if v is None or isinstance(v, str) else str(v) for v in data]
        series.append(pl.Series(d.name, data, dtype=dtype, strict=False))
    return pl.DataFrame(series)


def _read_postgres(
    spec: SqlSourceConfig, ts: str, cutoff: datetime | None, window: timedelta | None
) -> pl.DataFrame:
    import psycopg
    from psycopg import sql

    label = f"sql {spec.table or 'query'} (${spec.uri_env})"
    conn, uri = _pg_connect(spec, "source format sql")
    relation = _pg_relation(spec)
    try:
        with conn:
            try:
                probe = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(relation))
            except psycopg.errors.UndefinedTable:
                conn.rollback()
                raise ReadError(
                    f"{label}: table {spec.table!r} does not exist; the database has "
                    f"{_listing(_pg_tables(conn))}; fix source.sql.table"
                    if spec.table is not None
                    else f"{label}: the query reads a table that does not exist; "
                    f"the database has {_listing(_pg_tables(conn))}"
                ) from None
            columns = [d.name for d in probe.description]
            if cutoff is not None and ts not in columns:
                raise ReadError(
                    f"{label}: no timestamp column {ts!r} (source.columns.ts); "
                    f"the source has {_listing(columns)}"
                )
            where: list[Any] = []
            params: dict[str, Any] = {}
            if cutoff is not None:
                where.append(sql.SQL("{} < %(as_of)s").format(sql.Identifier(ts)))
                params["as_of"] = cutoff
                if window is not None:
                    where.append(
                        sql.SQL("{} >= %(as_of)s - %(max_window)s").format(sql.Identifier(ts))
                    )
                    params["max_window"] = window
            stmt = sql.SQL("SELECT * FROM {}").format(relation)
            if where:
                stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(" AND ").join(where))
            frames = list(_pg_chunks(conn, stmt, params, spec.chunk_rows, label, ts))
    except psycopg.Error as exc:
        detail = redact(" ".join(str(exc).split()), uri)
        raise ReadError(f"{label}: the database refused the read: {detail}") from None
    finally:
        conn.close()
    frame = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    if frame.height == 0:
        raise _no_rows(label, cutoff, window)
    return frame


def _pg_chunks(
    conn: Any, stmt: Any, params: dict[str, Any], chunk_rows: int, label: str, ts: str
) -> Iterator[pl.DataFrame]:
    import psycopg

    # A named (server-side) cursor streams the result: one chunk in memory at a time.
    try:
        with conn.cursor(name="lapse_events") as cur:
            cur.itersize = chunk_rows
            cur.execute(stmt, params)
            while rows := cur.fetchmany(chunk_rows):
                yield _pg_frame(rows, cur.description)
    except psycopg.errors.UndefinedFunction:
        raise ReadError(
            f"{label}: column {ts!r} is not a timestamp, so the time window cannot be pushed "
            "down; store it as timestamptz or cast it in source.sql.query"
        ) from None


# -- DuckDB --------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _read_duckdb(
    path: Path, spec: SqlSourceConfig, ts: str, cutoff: datetime | None, window: timedelta | None
) -> pl.DataFrame:
    duckdb = _driver("duckdb", "source format duckdb")
    label = f"{path} ({spec.table or 'query'})"
    if not path.is_file():
        raise ReadError(f"{path}: DuckDB database file not found")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise ReadError(f"{path}: cannot open as a DuckDB database: {exc}") from None
    try:
        con.execute("SET TimeZone = 'UTC'")
        relation = (
            _quote(spec.table)
            if spec.table is not None
            else f"({(spec.query or '').rstrip().rstrip(';')}) AS lapse_source"
        )
        try:
            columns = [d[0] for d in con.execute(f"SELECT * FROM {relation} LIMIT 0").description]
        except duckdb.CatalogException:
            tables = [
                r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
            ]
            raise ReadError(
                f"{label}: table {spec.table or '(in the query)'} does not exist; the database "
                f"has {_listing(sorted(tables))}"
            ) from None
        except duckdb.Error as exc:  # the query's own SQL: a syntax error, an unknown column
            key = "source.sql.query" if spec.table is None else "source.sql.table"
            raise ConfigError(
                f"{label}: {key} cannot run: {str(exc).splitlines()[0]}; fix it in the config"
            ) from None
        if cutoff is not None and ts not in columns:
            raise ReadError(
                f"{label}: no timestamp column {ts!r} (source.columns.ts); "
                f"the source has {_listing(columns)}"
            )
        stmt = f"SELECT * FROM {relation}"
        params: dict[str, Any] = {}
        if cutoff is not None:
            stmt += f" WHERE {_quote(ts)} < $as_of"
            params["as_of"] = cutoff
            if window is not None:
                stmt += f" AND {_quote(ts)} >= $as_of - $max_window"
                params["max_window"] = window
        try:
            reader = con.sql(stmt, params=params).to_arrow_reader(spec.chunk_rows)
            frames = [pl.DataFrame(pl.from_arrow(batch)) for batch in reader]
        except duckdb.Error as exc:
            raise ReadError(f"{label}: cannot read: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    frame = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    if frame.height == 0:
        raise _no_rows(label, cutoff, window)
    return frame


# -- Delta Lake -----------------------------------------------------------------------------


def _scan_delta(
    path: str, source: SourceConfig, cutoff: datetime | None, window: timedelta | None
) -> pl.LazyFrame:
    _driver("deltalake", "source format delta")
    from deltalake.exceptions import TableNotFoundError

    local = "://" not in path
    if local and not (Path(path) / "_delta_log").is_dir():
        raise ReadError(f"{path}: no Delta table there (no _delta_log folder)")
    try:
        lf = pl.scan_delta(path)
        schema = lf.collect_schema()
    except TableNotFoundError:
        raise ReadError(f"{path}: no Delta table there (no _delta_log)") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ReadError(f"{path}: cannot read as a Delta table: {exc}") from None
    if cutoff is None:
        return lf
    ts = _ts_column(source)
    dtype = schema.get(ts)
    if not isinstance(dtype, pl.Datetime):
        problem = "is missing" if dtype is None else f"is {dtype}, not a timestamp"
        raise ReadError(
            f"{path}: timestamp column {ts!r} {problem}; the table has "
            f"{_listing(list(schema.names()))}"
        )
    bound = cutoff if dtype.time_zone else cutoff.replace(tzinfo=None)
    cond = pl.col(ts) < bound
    if window is not None:
        cond = cond & (pl.col(ts) >= bound - window)
    # The filter reaches the Parquet files of the table (partition and row-group pruning).
    lf = lf.filter(cond)
    if lf.select(pl.len()).collect().item() == 0:
        raise _no_rows(path, cutoff, window)
    return lf
