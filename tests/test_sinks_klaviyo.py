"""Klaviyo profile bulk import jobs and bulk event create over real HTTP against a local server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from lapse.sinks.klaviyo import KlaviyoSink
from platform_servers import (
    CONTRACT,
    KEY,
    KlaviyoServer,
    Platform,
    PlatformServer,
    contract_missing_key_fails_before_sending,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
)


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(KlaviyoServer())

    def make(key: str = KEY, **kw: Any) -> KlaviyoSink:
        return KlaviyoSink(api_key=key, base_url=server.url, poll_seconds=0.0, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/api/profile-bulk-import-jobs",
        key_env="LAPSE_KLAVIYO_API_KEY",
        env={"LAPSE_KLAVIYO_BASE_URL": server.url},
        events_on_path=False,  # see test_faults_on_events_and_polls
    )


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    contract(platform, tmp_path)


def test_missing_key(platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_jobs_are_polled_and_lists_follow_segments(platform: Platform, tmp_path: Path) -> None:
    sink = platform.make_sink(
        identifier="email",
        identifier_column="email",
        lists={"high": "L-high", "medium": "L-medium"},
    )
    run = run_delivery(sink, make_outbox(9, no_email=(8,)), tmp_path)
    assert run.report.failed == 0 and run.report.skipped == 1
    server: KlaviyoServer = platform.server  # type: ignore[assignment]
    assert server.lists["L-high"] == {"user0@example.com", "user3@example.com", "user6@example.com"}
    assert server.lists["L-medium"] == {
        "user1@example.com",
        "user4@example.com",
        "user7@example.com",
    }
    assert all(job["polls"] == 2 for job in server.jobs.values())  # queued, then complete
    first = server.requests[0]
    assert first.headers["authorization"] == f"Klaviyo-API-Key {KEY}"
    assert first.headers["revision"] == "2025-01-15"
    profile = first.json()["data"]["attributes"]["profiles"]["data"][0]["attributes"]
    assert profile["email"] == "user0@example.com"
    assert profile["properties"]["lapse_risk_segment"] == "high"
    assert "lapse_refill_sku" not in server.profiles["user1@example.com"]  # nulls are not sent


def test_faults_on_events_and_polls(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(20)
    platform.server.fail_next("/api/event-bulk-create-jobs", "drop_after", "429")
    platform.server.fail_next("/api/profile-bulk-import-jobs/job0", "503")
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0 and run.report.retried == 3
    assert platform.server.duplicates > 0  # resent events dropped on unique_id
    names = platform.server.event_names()
    assert len(names) == len(set(names))


def test_job_that_never_finishes_is_retried(platform: Platform, tmp_path: Path) -> None:
    sink = platform.make_sink(poll_timeout_seconds=0.0)  # gives up at the first "queued"
    run = run_delivery(sink, make_outbox(3), tmp_path)
    assert run.report.failed == 3 and "still 'queued'" in next(iter(run.report.reasons))


def test_events_are_chunked_to_1000(platform: Platform) -> None:
    sink = platform.make_sink()
    items = [sink.encode(r) for r in make_outbox(1500).to_dicts()]
    jobs = sink.payload(items)["/api/event-bulk-create-jobs"]
    sizes = [
        sum(
            len(e["attributes"]["events"]["data"])
            for e in j["data"]["attributes"]["events-bulk-create"]["data"]
        )
        for j in jobs
    ]
    assert len(jobs) >= 2 and all(s <= 1000 for s in sizes)


def test_check(platform: Platform) -> None:
    assert "accepted LAPSE_KLAVIYO_API_KEY" in platform.make_sink().check()
    message = platform.make_sink(lists={"high": "L-high", "low": "L-nope"}).check()
    assert "low -> L-nope" in message


def test_a_profile_over_100_kb_is_dead_lettered_alone(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(6)
    big = [f"reason {k}: " + "x" * 1_000 for k in range(110)]
    reasons = [
        big if u == "u001" else r for u, r in zip(outbox["user_id"], outbox["reasons"], strict=True)
    ]
    outbox = outbox.with_columns(pl.Series("reasons", reasons, dtype=pl.List(pl.String)))
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.sent == 5 and run.report.failed == 1
    (dead,) = [json.loads(line) for line in run.dead_letters.read_text().splitlines()]
    assert dead["record"]["user_id"] == "u001" and "limit of 100000 bytes" in dead["reason"]
    assert set(platform.server.profiles) == {"u000", "u002", "u003", "u004", "u005"}
