"""Braze /users/track over real HTTP against a local server enforcing its contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lapse.sinks.base import SinkAuthError
from lapse.sinks.braze import BrazeSink
from platform_servers import (
    CONTRACT,
    KEY,
    BrazeServer,
    Platform,
    PlatformServer,
    contract_missing_key_fails_before_sending,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
)


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(BrazeServer())

    def make(key: str = KEY, **kw: Any) -> BrazeSink:
        return BrazeSink(api_key=key, base_url=server.url, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/users/track",
        key_env="LAPSE_BRAZE_API_KEY",
        dedupes=False,  # Braze events have no dedupe key (documented)
        env={"LAPSE_BRAZE_BASE_URL": server.url},
    )


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    contract(platform, tmp_path)


def test_missing_key(platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_request_shape(platform: Platform, tmp_path: Path) -> None:
    run_delivery(platform.make_sink(), make_outbox(4), tmp_path)
    (request,) = platform.server.requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.json()
    first = body["attributes"][0]
    assert first["external_id"] == "u000"
    assert first["lapse_risk_segment"] == "high" and first["lapse_as_of"] == "2024-06-01"
    assert first["lapse_refill_prompt_date"] == "2024-06-05"
    assert first["lapse_triggers"] == ["replenishment_due"]
    names = [e["name"] for e in body["events"] if e["external_id"] == "u000"]
    assert names == ["lapse_replenishment_due", "lapse_risk_high"]
    assert body["events"][0]["time"] == "2024-06-01T00:00:00Z"


def test_more_than_75_events_split_the_batch(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(75)  # 75 attributes objects, but about 90 events
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0
    assert "split" in run.states()
    assert all(len(r.json().get("events", [])) <= 75 for r in platform.server.requests)
    assert len(platform.server.profiles) == 75


def test_custom_prefix_and_identifier_column(platform: Platform, tmp_path: Path) -> None:
    sink = platform.make_sink(prefix="ml_", identifier_column="email")
    assert sink.attribute_columns == ("email",)
    run = run_delivery(sink, make_outbox(6, no_email=(1,)), tmp_path)
    assert run.report.skipped == 1
    assert "user0@example.com" in platform.server.profiles
    assert "ml_churn_risk" in platform.server.profiles["user0@example.com"]


def test_check(platform: Platform) -> None:
    assert "accepted LAPSE_BRAZE_API_KEY" in platform.make_sink().check()
    with pytest.raises(SinkAuthError, match="LAPSE_BRAZE_API_KEY"):
        platform.make_sink(key="nope-nope").check()


def test_cli_sinks_check(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app

    runner = CliRunner()
    monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", platform.server.url)
    monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
    ok = runner.invoke(app, ["sinks", "check", "--sink", "braze"])
    assert ok.exit_code == 0, ok.output
    assert "accepted LAPSE_BRAZE_API_KEY" in ok.output
    monkeypatch.setenv("LAPSE_BRAZE_API_KEY", "sk-wrong-0000")
    bad = runner.invoke(app, ["sinks", "check", "--sink", "braze"])
    assert bad.exit_code == 2
    assert "LAPSE_BRAZE_API_KEY" in bad.output and "sk-wrong-0000" not in bad.output
    monkeypatch.delenv("LAPSE_BRAZE_API_KEY")
    missing = runner.invoke(app, ["sinks", "check", "--sink", "braze"])
    assert missing.exit_code == 2 and "LAPSE_BRAZE_API_KEY is not set" in missing.output


def test_split_batches_count_skipped_records_once(platform: Platform, tmp_path: Path) -> None:
    platform.server.max_bytes = 3_000  # forces 413 splits over batches holding skipped rows
    sink = platform.make_sink(identifier_column="email")
    run = run_delivery(sink, make_outbox(20, no_email=(1, 2, 9, 15)), tmp_path)
    assert "split" in run.states()
    assert run.report.failed == 0
    assert run.report.skipped == 4 and run.report.sent == 16
