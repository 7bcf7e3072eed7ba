"""Customer.io Track API v2 (and manual segments) over real HTTP against a local server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lapse.sinks.customerio import CustomerioSink
from platform_servers import (
    CONTRACT,
    KEY,
    CustomerioServer,
    Platform,
    PlatformServer,
    basic_user,
    contract_missing_key_fails_before_sending,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
)


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(CustomerioServer())

    def make(key: str = KEY, **kw: Any) -> CustomerioSink:
        return CustomerioSink(site_id=CustomerioServer.SITE, api_key=key, base_url=server.url, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/api/v2/batch",
        key_env="LAPSE_CUSTOMERIO_API_KEY",
        env={
            "LAPSE_CUSTOMERIO_BASE_URL": server.url,
            "LAPSE_CUSTOMERIO_SITE_ID": CustomerioServer.SITE,
        },
    )


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    contract(platform, tmp_path)


def test_missing_key(platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_request_shape(platform: Platform, tmp_path: Path) -> None:
    run_delivery(platform.make_sink(), make_outbox(4), tmp_path)
    (request,) = platform.server.requests
    assert basic_user(request) == (CustomerioServer.SITE, KEY)
    ops = request.json()["batch"]
    assert ops[0] == {
        "type": "person",
        "identifiers": {"id": "u000"},
        "action": "identify",
        "attributes": ops[0]["attributes"],
    }
    assert ops[0]["attributes"]["lapse_risk_segment"] == "high"
    events = [o for o in ops if o["action"] == "event" and o["identifiers"]["id"] == "u000"]
    assert [e["name"] for e in events] == ["lapse_replenishment_due", "lapse_risk_high"]
    assert events[0]["timestamp"] == 1717200000 and len(events[0]["id"]) == 26


def test_manual_segments_follow_the_risk_segment(platform: Platform, tmp_path: Path) -> None:
    segments = {"high": "11", "medium": "12", "low": "13"}
    sink = platform.make_sink(segments=segments, identifier="email", identifier_column="email")
    outbox = make_outbox(10, no_email=(9,))
    server: CustomerioServer = platform.server  # type: ignore[assignment]
    server.segments["13"] = {"user0@example.com", "user5@example.com"}  # were low before
    run = run_delivery(sink, outbox, tmp_path)
    assert run.report.failed == 0 and run.report.skipped == 1
    assert server.segments["11"] == {"user0@example.com", "user3@example.com", "user6@example.com"}
    assert "user0@example.com" not in server.segments["13"]  # moved from low to high
    assert "user5@example.com" in server.segments["13"]  # still low
    adds = [r for r in server.requests if r.path.endswith("add_customers")]
    assert all(r.query == {"id_type": ["email"]} for r in adds)


def test_check(platform: Platform) -> None:
    message = platform.make_sink().check()
    assert "accepted LAPSE_CUSTOMERIO_SITE_ID and LAPSE_CUSTOMERIO_API_KEY" in message
    assert "set LAPSE_CUSTOMERIO_BASE_URL" in message  # the local server is not the region URL


def test_config_takes_numeric_segment_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lapse.config import load_config
    from lapse.sinks import make_sink

    path = tmp_path / "c.yaml"
    path.write_text("sinks:\n  customerio:\n    identifier: email\n    segments: {high: 12}\n")
    monkeypatch.setenv("LAPSE_CUSTOMERIO_SITE_ID", "site")
    monkeypatch.setenv("LAPSE_CUSTOMERIO_API_KEY", "key")
    sink = make_sink("customerio", load_config(path))
    assert isinstance(sink, CustomerioSink)
    assert sink.segments == {"high": "12"} and sink.identifier == "email"
