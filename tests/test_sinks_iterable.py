"""Iterable bulk user update and bulk track over real HTTP against a local server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lapse.sinks.iterable import IterableSink
from platform_servers import (
    CONTRACT,
    KEY,
    IterableServer,
    Platform,
    PlatformServer,
    contract_missing_key_fails_before_sending,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
)


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(IterableServer())

    def make(key: str = KEY, **kw: Any) -> IterableSink:
        return IterableSink(api_key=key, base_url=server.url, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/api/users/bulkUpdate",
        key_env="LAPSE_ITERABLE_API_KEY",
        env={"LAPSE_ITERABLE_BASE_URL": server.url},
        events_on_path=False,  # see test_faults_on_the_event_request_too
    )


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    contract(platform, tmp_path)


def test_missing_key(platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_request_shape(platform: Platform, tmp_path: Path) -> None:
    run_delivery(platform.make_sink(), make_outbox(4), tmp_path)
    users, events = platform.server.requests
    assert users.path == "/api/users/bulkUpdate" and users.headers["api-key"] == KEY
    first = users.json()["users"][0]
    assert first["userId"] == "u000" and first["preferUserId"] is True
    assert first["dataFields"]["lapse_next_order_date"] == "2024-06-10"
    evs = [e for e in events.json()["events"] if e["userId"] == "u000"]
    assert [e["eventName"] for e in evs] == ["lapse_replenishment_due", "lapse_risk_high"]
    assert evs[0]["createdAt"] == 1717200000 and evs[0]["id"].startswith("lapse-")


def test_faults_on_the_event_request_too(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(20)
    platform.server.fail_next("/api/events/trackBulk", "drop_after", "429", "500")
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0 and run.report.retried == 3
    assert platform.server.duplicates > 0  # the resent events were updates of the same ids
    assert len(platform.server.events) == len({(u, n) for u, n in platform.server.event_names()})


def test_email_identity(platform: Platform, tmp_path: Path) -> None:
    sink = platform.make_sink(identifier="email", identifier_column="email")
    run = run_delivery(sink, make_outbox(5, no_email=(2,)), tmp_path)
    assert run.report.skipped == 1
    body = platform.server.requests[0].json()["users"][0]
    assert body["email"] == "user0@example.com" and "preferUserId" not in body


def test_check(platform: Platform) -> None:
    assert "accepted LAPSE_ITERABLE_API_KEY" in platform.make_sink().check()
