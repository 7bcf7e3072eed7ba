"""A real PostgreSQL server for the SQL source and sink tests.

``LAPSE_TEST_PG_URI`` (exported by ``.ci/run`` through ``.ci/postgres start``) points at
a server with password authentication; without it the fixture starts one itself
with ``.ci/postgres`` when the server binaries are installed. When no server can be
found the tests are skipped, unless ``LAPSE_REQUIRE_POSTGRES=1`` (set by CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "postgres"


def _unavailable(reason: str) -> None:
    if os.environ.get("LAPSE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (LAPSE_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"no PostgreSQL server: {reason}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URI of a running server (a database the tests may fill and empty)."""
    uri = os.environ.get("LAPSE_TEST_PG_URI")
    if uri:
        yield uri
        return
    have_bins = shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not have_bins:
        _unavailable("LAPSE_TEST_PG_URI is unset and no server binaries are installed")
    done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, check=False)
    found = dict(re.findall(r"export (\w+)='([^']*)'", done.stdout))
    if done.returncode or "LAPSE_TEST_PG_URI" not in found:
        _unavailable(f".ci/postgres start failed: {done.stderr.strip()[-500:]}")
    try:
        yield found["LAPSE_TEST_PG_URI"]
    finally:
        subprocess.run([str(SCRIPT), "stop", found["LAPSE_TEST_PG_DIR"]], check=False)


@pytest.fixture
def pg_schema(pg_server: str) -> Iterator[tuple[str, str]]:
    """A fresh schema per test, as (URI whose search_path is that schema, schema name)."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    sep = "&" if "?" in pg_server else "?"
    yield f"{pg_server}{sep}options=-csearch_path%3D{name}", name
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
