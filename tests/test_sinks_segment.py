"""Segment /v1/batch over real HTTP against a local server enforcing its contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lapse.sinks.segment import SegmentSink
from platform_servers import (
    CONTRACT,
    KEY,
    Platform,
    PlatformServer,
    SegmentServer,
    basic_user,
    contract_missing_key_fails_before_sending,
    expected_events,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
    with_triggers,
)


def _platform(server: SegmentServer) -> Platform:
    def make(key: str = KEY, **kw: Any) -> SegmentSink:
        return SegmentSink(write_key=key, base_url=server.url, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/v1/batch",
        key_env="LAPSE_SEGMENT_API_KEY",
        env={"LAPSE_SEGMENT_BASE_URL": server.url},
    )


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    # strict: refuses unknown write keys with 401 (real Segment accepts them silently,
    # see test_unknown_write_key_is_silently_dropped)
    return _platform(served(SegmentServer(strict=True)))  # type: ignore[arg-type]


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    if contract.__name__ == "contract_partial_success_per_record":
        pytest.skip("Segment reports no per-message errors (200 for the whole batch)")
    contract(platform, tmp_path)


def test_missing_key(platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_request_shape(platform: Platform, tmp_path: Path) -> None:
    run_delivery(platform.make_sink(), make_outbox(4), tmp_path)
    (request,) = platform.server.requests
    assert basic_user(request) == (KEY, "")
    batch = request.json()["batch"]
    identify = batch[0]
    assert identify["type"] == "identify" and identify["userId"] == "u000"
    assert identify["traits"]["lapse_churn_risk"] == 0.9
    tracks = [m for m in batch if m["type"] == "track" and m["userId"] == "u000"]
    assert [t["event"] for t in tracks] == ["lapse_replenishment_due", "lapse_risk_high"]
    assert len({m["messageId"] for m in batch}) == len(batch)


def test_message_ids_are_deterministic(platform: Platform) -> None:
    sink = platform.make_sink()
    record = make_outbox(1).to_dicts()[0]
    assert sink.encode(record) == sink.encode(dict(record))
    changed = sink.encode({**record, "churn_risk": 0.5})
    assert changed[0]["messageId"] != sink.encode(record)[0]["messageId"]  # new traits go through
    assert changed[1]["messageId"] == sink.encode(record)[1]["messageId"]  # same event, same id


def test_unknown_write_key_is_silently_dropped(
    served: Callable[[PlatformServer], PlatformServer],  # noqa: F811
    tmp_path: Path,
) -> None:
    server = served(SegmentServer())
    platform = _platform(server)  # type: ignore[arg-type]
    run = run_delivery(platform.make_sink(key="wrong-key"), make_outbox(3), tmp_path)
    assert run.report.sent == 3 and server.profiles == {}  # what real Segment does
    message = platform.make_sink(key="wrong-key").check()
    assert "cannot verify" in message and "wrong-key" not in message


def test_a_batch_never_carries_more_than_2500_messages(platform: Platform, tmp_path: Path) -> None:
    """Segment answers 200 to a batch of more than 2,500 messages and drops it."""
    outbox = with_triggers(make_outbox(250), lambda i: 11)  # 12 or 13 messages per record
    server: SegmentServer = platform.server  # type: ignore[assignment]
    server.batch_limit = 10**9  # only the message count binds here
    sink = platform.make_sink()
    sink.limits = replace(sink.limits, max_bytes=None)
    run = run_delivery(sink, outbox, tmp_path)
    assert run.report.failed == 0 and run.report.sent == 250
    assert server.dropped_over_count == 0
    assert max(len(r.json()["batch"]) for r in server.calls("/v1/batch")) <= 2_500
    assert server.event_names() == expected_events(outbox, lambda r: r["user_id"])
