"""Reliability: credentials in URLs never leak, an unreachable destination stops the run
(resumable) and a run's retries have one budget -- over real HTTP to the local platform
servers of ``platform_servers.py``."""

from __future__ import annotations

import json
import re
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import DeliveryConfig
from lapse.delivery.batches import (
    FIRST_CONTACT_ATTEMPTS,
    deliver,
    encode,
    plan_batches,
)
from lapse.delivery.ledger import Ledger
from lapse.exceptions import DestinationUnreachable
from lapse.redact import redact, redact_url
from lapse.sinks.base import Limits
from lapse.sinks.webhook import WebhookSink
from platform_servers import AS_OF, KEY, BrazeServer, WebhookServer, make_outbox
from worlds import World, trained_world, world_config

runner = CliRunner()
PASSWORD = "hunter2-Zq8"  # in a URL's userinfo: must appear in no output and no file
TOKEN = "tok-Lk2Jx9"  # a token in a URL's query: the same


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_password(url: str, user: str = "lapse") -> str:
    return url.replace("://", f"://{user}:{PASSWORD}@", 1)


# -- the redaction helper ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:pw-9@h.example.com:8443/hook", "https://u:***@h.example.com:8443/hook"),
        ("https://tok_123@h.example.com/hook", "https://***@h.example.com/hook"),
        ("https://h.example.com/hook?token=abc&v=2", "https://h.example.com/hook?token=***&v=***"),
        ("postgresql://app:pw@db:5432/lapse", "postgresql://app:***@db:5432/lapse"),
        ("https://rest.iad-01.braze.com", "https://rest.iad-01.braze.com"),
        ("sqlite:///home/me/mlflow.db", "sqlite:///home/me/mlflow.db"),
        ("not a url, user:pw@x", "not a url, user:pw@x"),
    ],
)
def test_redact_url_masks_userinfo_passwords_tokens_and_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_masks_a_secret_url_and_its_password_quoted_alone() -> None:
    url = f"https://lapse:{PASSWORD}@hooks.example.com/x?token={TOKEN}"
    text = f"cannot reach {url}: server said password {PASSWORD!r} or token {TOKEN} is wrong"
    out = redact(text, url, None)
    assert PASSWORD not in out and TOKEN not in out
    assert "https://lapse:***@hooks.example.com/x?token=***" in out


# -- an unreachable destination, the retry budget ----------------------------------------------


def _deliver(
    sink: WebhookSink,
    outbox: pl.DataFrame,
    ledger: Ledger,
    config: DeliveryConfig,
    waits: list[float],
    tmp_path: Path,
    *,
    start: bool = True,
    on_progress: object = None,
) -> object:
    as_of = datetime(AS_OF.year, AS_OF.month, AS_OF.day, tzinfo=UTC)
    if start:
        plan = plan_batches(encode(sink, outbox), sink, config.batch_size)
        ledger.start_run("run-1", sink.name, as_of=as_of, model="m", target="", batches=plan)
    try:
        return deliver(
            outbox,
            sink,
            ledger,
            "run-1",
            config,
            as_of=as_of,
            dead_letters=tmp_path / "dead.ndjson",
            sleep=waits.append,
            on_progress=on_progress,  # type: ignore[arg-type]
        )
    finally:
        sink.close()


def webhook(url: str, max_items: int = 10) -> WebhookSink:
    return WebhookSink(url=url, secret=KEY, limits=Limits(max_items=max_items))


def test_an_unreachable_destination_stops_the_run_in_seconds_then_resumes(tmp_path: Path) -> None:
    outbox = make_outbox(40)
    url = with_password(f"http://127.0.0.1:{closed_port()}/hook")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    waits: list[float] = []
    began = time.monotonic()
    with pytest.raises(DestinationUnreachable) as info:
        _deliver(webhook(url), outbox, ledger, DeliveryConfig(), waits, tmp_path)
    assert time.monotonic() - began < 5
    # the default backoff between the few tries of the first contact: 1 + 2 seconds
    assert waits == [1.0, 2.0] and len(waits) == FIRST_CONTACT_ATTEMPTS - 1
    message = str(info.value)
    assert "\n" not in message and PASSWORD not in message
    assert f"lapse:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "cannot connect" in message and "--resume run-1" in message
    assert {b.state for b in ledger.batches("run-1", "webhook")} == {"pending"}
    assert ledger.failures("run-1", "webhook") == []
    assert not (tmp_path / "dead.ndjson").exists()

    with WebhookServer() as server:  # reachable now: the resume sends everything, once
        report = _deliver(
            webhook(with_password(server.url) + "/hook"),
            outbox,
            ledger,
            DeliveryConfig(),
            waits,
            tmp_path,
            start=False,
        )
    assert report.sent == 40 and report.failed == 0  # type: ignore[attr-defined]
    assert set(server.profiles) == set(outbox["user_id"].to_list())
    assert {b.state for b in ledger.batches("run-1", "webhook")} == {"done"}


def test_a_connection_lost_mid_run_is_retried_within_the_budget_then_stops(tmp_path: Path) -> None:
    outbox = make_outbox(40)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    waits: list[float] = []
    config = DeliveryConfig(max_attempts=10, backoff_seconds=1.0, max_retry_seconds=10.0)
    server = WebhookServer().__enter__()

    def first_batch_then_gone(n: int) -> None:
        server.__exit__(None, None, None)  # idempotent: later calls do nothing new

    with pytest.raises(
        DestinationUnreachable, match=r"retry budget \(delivery.max_retry_seconds\)"
    ):
        _deliver(
            webhook(server.url + "/hook"),
            outbox,
            ledger,
            config,
            waits,
            tmp_path,
            on_progress=first_batch_then_gone,
        )
    # reached once, so retried past the first-contact tries, until the budget ran out
    assert waits == [1.0, 2.0, 4.0] and sum(waits) <= config.max_retry_seconds
    assert [b.state for b in ledger.batches("run-1", "webhook")] == ["done"] + ["pending"] * 3
    assert ledger.failures("run-1", "webhook") == []
    assert not (tmp_path / "dead.ndjson").exists()


def test_the_retry_budget_bounds_a_run_against_a_failing_destination(tmp_path: Path) -> None:
    outbox = make_outbox(40)
    config = DeliveryConfig(max_attempts=6, backoff_seconds=1.0, max_retry_seconds=5.0)
    waits: list[float] = []
    with WebhookServer() as server:
        server.fail_next("/hook", *["503"] * 100)
        report = _deliver(
            webhook(server.url + "/hook"),
            outbox,
            Ledger(tmp_path / "ledger.sqlite"),
            config,
            waits,
            tmp_path,
        )
    assert sum(waits) <= config.max_retry_seconds
    # without the budget: 4 batches x 6 tries; with it, the waits stop once 5 s are spent
    assert report.requests <= 8 < 4 * config.max_attempts  # type: ignore[attr-defined]
    assert report.failed == 40  # type: ignore[attr-defined]
    dead = [json.loads(line) for line in (tmp_path / "dead.ndjson").read_text().splitlines()]
    assert len(dead) == 40
    assert any("retry budget (delivery.max_retry_seconds) is spent" in d["reason"] for d in dead)


# -- a whole run: nothing it writes or prints holds a URL's credentials ------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return trained_world(
        tmp_path_factory.mktemp("reliability"),
        n_users=300,
        n_days=200,
        seed=5,
        train_days=160,
        score_day=170,
    )


def _config(home: Path, world: World) -> Path:
    return world_config(home, world, batch_size=40, backoff_seconds=0.0)


def _every_byte_written(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_no_file_or_line_of_a_run_holds_a_url_password(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(_isolated_home, world)
    score = [
        "score",
        str(world.events),
        "--model",
        str(world.bundle),
        "--config",
        str(config),
        "--as-of",
        f"{world.as_of:%Y-%m-%d}",
    ]
    monkeypatch.setenv("LAPSE_WEBHOOK_SECRET", KEY)
    monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
    outputs: list[str] = []

    def lapse(*args: str) -> int:
        result = runner.invoke(app, list(args))
        outputs.append(result.output)
        return result.exit_code

    # 1. the webhook is down: one line naming the redacted URL, nothing dead-lettered
    monkeypatch.setenv(
        "LAPSE_WEBHOOK_URL", with_password(f"http://127.0.0.1:{closed_port()}/hook?t={TOKEN}")
    )
    assert lapse(*score, "--sink", "webhook") == 1  # not delivered yet: resume, as for failures
    stopped = outputs[-1].strip()
    assert "cannot connect" in stopped and "lapse:***@127.0.0.1" in stopped
    run_id = re.search(r"--resume (\S+?)`", stopped).group(1)  # type: ignore[union-attr]
    runs = _isolated_home / "lapse-runs"
    assert not (runs / "dead_letters").exists()

    with WebhookServer() as hook, BrazeServer() as braze:
        # 2. it is back (same credentials in its URL): the resume delivers; a rejected user
        # puts a reason in the ledger and the dead letters
        hook.reject = {"u000002"}
        monkeypatch.setenv("LAPSE_WEBHOOK_URL", with_password(hook.url) + f"/hook?t={TOKEN}")
        assert lapse(*score, "--sink", "webhook", "--resume", run_id) in (0, 1)
        assert hook.profiles
        summary = next(runs.glob("snapshots/*/*.json")).read_text()
        assert json.loads(summary)["sink"].startswith("webhook http://lapse:***@127.0.0.1:")
        # 3. a platform base URL with userinfo: its credentials win over the key (HTTP Basic),
        # so the platform refuses them; the check and the run say so without the password
        monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", with_password(braze.url, user="ops"))
        assert lapse("sinks", "check", "--sink", "braze") == 2
        assert lapse(*score, "--sink", "braze") == 2
        assert "ops:***@127.0.0.1" in outputs[-1]

    written = _every_byte_written(_isolated_home)
    assert b"lapse:***@127.0.0.1" in written  # the URL is recorded, redacted
    for secret in (PASSWORD, TOKEN):
        assert secret.encode() not in written
        assert not [o for o in outputs if secret in o]


# -- CSV output a spreadsheet would run ----------------------------------------------------------

# (ids starting with a tab or CR cannot reach the output: reading events strips ids)
HOSTILE = ("=cmd|' /C calc'!A0", "+1-555-0100", "@SUM(A1:A9)", "-2+3")


def _formula_cells(path: Path) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8") as fh:
        return [
            c for row in csv.reader(fh) for c in row if c[:1] in ("=", "+", "-", "@", "\t", "\r")
        ]


def test_formula_like_ids_stay_exact_warn_once_and_can_be_made_spreadsheet_safe(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    from lapse.sinks.file import read_records

    raw = pl.read_parquet(world.events)
    recent = raw.filter(pl.col("ts").is_between(world.as_of - timedelta(days=14), world.as_of))
    active = recent["user_id"].unique().sort().head(len(HOSTILE)).to_list()
    rename = pl.col("user_id").replace(dict(zip(active, HOSTILE, strict=True)))
    events = tmp_path / "events.parquet"
    raw.with_columns(rename).write_parquet(events)
    users = tmp_path / "users.parquet"
    pl.read_parquet(world.users).with_columns(rename).write_parquet(users)
    data = yaml.safe_load(_config(_isolated_home, world).read_text())
    data["attributes"]["path"] = str(users)

    def score(out: Path, **file_sink: bool) -> str:
        data["sinks"]["file"] = file_sink
        config = tmp_path / "lapse.yaml"
        config.write_text(yaml.safe_dump(data))
        args = ["score", str(events), "--model", str(world.bundle), "--config", str(config)]
        args += ["--as-of", f"{world.as_of:%Y-%m-%d}", "--sink", "file", "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return result.output

    output = score(tmp_path / "scores.csv")
    written = read_records(tmp_path / "scores.csv")
    hostile = set(HOSTILE) & set(written["user_id"].to_list())
    assert len(hostile) >= 3  # ids stay exact by default
    cells = _formula_cells(tmp_path / "scores.csv")
    assert set(cells) == hostile
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    formula = [w for w in warnings if "sinks.file.spreadsheet_safe" in w]
    assert len(formula) == 1 and f"warning: {len(cells):,} text cells of scores.csv" in formula[0]

    output = score(tmp_path / "safe.csv", spreadsheet_safe=True)
    assert "spreadsheet_safe" not in output
    assert _formula_cells(tmp_path / "safe.csv") == []
    safe = read_records(tmp_path / "safe.csv")["user_id"].to_list()
    assert {f"'{h}" for h in hostile} <= set(safe)
    assert set(safe) - {f"'{h}" for h in hostile} == set(written["user_id"]) - hostile

    output = score(tmp_path / "scores.parquet", spreadsheet_safe=True)  # Parquet: untouched
    assert "spreadsheet_safe" not in output
    assert hostile <= set(read_records(tmp_path / "scores.parquet")["user_id"].to_list())


def test_tab_and_carriage_return_cells_count_and_are_prefixed_in_csv_only(tmp_path: Path) -> None:
    from lapse.sinks.base import RECORD_SCHEMA
    from lapse.sinks.file import read_records, write_records

    rows = [("u1", "\tSKU-1", "m"), ("u2", "\rSKU-2", "=1+1"), ("u3", "SKU-3", "lapse")]
    frame = pl.DataFrame(
        [{"user_id": u, "refill_sku": sku, "model_name": m} for u, sku, m in rows]
    ).select(
        pl.col(c).cast(t)
        if c in ("user_id", "refill_sku", "model_name")
        else pl.lit(None, t).alias(c)
        for c, t in RECORD_SCHEMA.items()
    )
    assert write_records(frame, tmp_path / "exact.csv") == 3
    assert read_records(tmp_path / "exact.csv")["refill_sku"].to_list() == [
        "\tSKU-1",
        "\rSKU-2",
        "SKU-3",
    ]
    assert write_records(frame, tmp_path / "safe.csv", spreadsheet_safe=True) == 3
    safe = read_records(tmp_path / "safe.csv")
    assert safe["refill_sku"].to_list() == ["'\tSKU-1", "'\rSKU-2", "SKU-3"]
    assert safe["model_name"].to_list() == ["m", "'=1+1", "lapse"]
    assert write_records(frame, tmp_path / "same.parquet", spreadsheet_safe=True) == 0
    assert pl.read_parquet(tmp_path / "same.parquet")["model_name"].to_list() == [
        "m",
        "=1+1",
        "lapse",
    ]
