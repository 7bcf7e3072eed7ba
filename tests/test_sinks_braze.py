"""Braze /users/track over real HTTP against a local server enforcing its contract."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lapse.delivery.batches import deliver
from lapse.delivery.ledger import Ledger
from lapse.sinks.base import SinkAuthError
from lapse.sinks.braze import BrazeSink
from platform_servers import (
    AS_OF,
    CONTRACT,
    FAST,
    KEY,
    BrazeServer,
    Platform,
    PlatformServer,
    contract_missing_key_fails_before_sending,
    expected_events,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
    with_triggers,
)

AS_OF_UTC = datetime(AS_OF.year, AS_OF.month, AS_OF.day, tzinfo=UTC)


def ident(record: dict[str, Any]) -> str:
    return str(record["user_id"])


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(BrazeServer())

    def make(key: str = KEY, **kw: Any) -> BrazeSink:
        return BrazeSink(api_key=key, base_url=server.url, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=ident,
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


def objects_per_request(server: PlatformServer) -> list[int]:
    bodies = [r.json() for r in server.calls("/users/track")]
    return [len(b.get("attributes", [])) + len(b.get("events", [])) for b in bodies]


def test_requests_hold_at_most_75_objects_counted_together(
    platform: Platform, tmp_path: Path
) -> None:
    outbox = with_triggers(make_outbox(120), lambda i: 2 + i % 2)  # 4-5 objects per user
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0 and run.report.sent == 120
    counts = objects_per_request(platform.server)
    assert max(counts) <= 75 and sum(counts) == 120 + len(expected_events(outbox, ident))
    assert platform.server.requests_over_limit == 0
    assert platform.server.event_names() == expected_events(outbox, ident)


def test_a_run_planned_per_array_is_split_when_resumed(platform: Platform, tmp_path: Path) -> None:
    """A run planned as 75 users per request (the legacy per-array rule) and resumed."""
    outbox = with_triggers(make_outbox(100), lambda i: 2 + i % 2)
    sink = platform.make_sink()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run(
        "old", "braze", as_of=AS_OF_UTC, model="m", target="", batches=[(0, 75), (75, 100)]
    )
    report = deliver(
        outbox, sink, ledger, "old", FAST, as_of=AS_OF_UTC, dead_letters=tmp_path / "dead.ndjson"
    )
    sink.close()
    assert report.failed == 0 and report.sent == 100
    assert "split" in {b.state for b in ledger.batches("old", "braze")}
    assert max(objects_per_request(platform.server)) <= 75
    assert platform.server.requests_over_limit == 0


def test_max_input_length_exceeded_splits_like_a_413(platform: Platform, tmp_path: Path) -> None:
    platform.server.max_objects = 20  # a contract stricter than the sink was told
    outbox = with_triggers(make_outbox(60), lambda i: 2 + i % 2)
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0 and run.report.sent == 60
    assert "split" in run.states() and platform.server.requests_over_limit > 0
    assert platform.server.event_names() == expected_events(outbox, ident)
    # told the contract's limit, the sink never goes over it
    platform.server.requests_over_limit = 0
    run_delivery(platform.make_sink(max_objects=20), outbox, tmp_path / "told")
    assert platform.server.requests_over_limit == 0


def test_a_record_over_the_limit_alone_is_dead_lettered(platform: Platform, tmp_path: Path) -> None:
    outbox = with_triggers(make_outbox(12), lambda i: 4 if i == 4 else 1)  # u004: 6 objects
    # the sink knows the limit: u004 never leaves, the others go
    run = run_delivery(platform.make_sink(max_objects=5), outbox, tmp_path / "known")
    assert run.report.sent == 11 and run.report.failed == 1
    (dead,) = [json.loads(line) for line in run.dead_letters.read_text().splitlines()]
    assert dead["record"]["user_id"] == "u004"
    assert "record makes 6 braze objects" in dead["reason"] and "limit of 5" in dead["reason"]
    assert "u004" not in platform.server.profiles
    # only Braze knows it: the 400 splits down to u004 alone, which fails once, no loop
    platform.server.max_objects = 5
    requests = len(platform.server.requests)
    run = run_delivery(platform.make_sink(), outbox, tmp_path / "unknown")
    assert run.report.sent == 11 and run.report.failed == 1
    (reason,) = run.report.reasons
    assert "HTTP 400" in reason and "Max Input Length Exceeded" in reason
    sent = platform.server.requests[requests:]
    assert len(sent) <= 2 * 12 - 1  # halving 12 records: at most 23 requests, then it stops
    alone = [r for r in sent if [a["external_id"] for a in r.json()["attributes"]] == ["u004"]]
    assert len(alone) == 1


def test_max_objects_per_request_comes_from_config(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lapse.config import load_config
    from lapse.sinks import make_sink

    config = load_config()
    assert config.sinks.braze.max_objects_per_request == 75
    config.sinks.braze.max_objects_per_request = 50
    monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
    monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", platform.server.url)
    assert make_sink("braze", config).limits.max_objects == 50


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


@pytest.mark.parametrize(
    ("fault", "policy", "copies"),
    [
        ("drop_after", "skip", 1),  # processed, the answer lost: the resend holds no event
        ("drop_after", "resend", 2),  # ... or the events again: twice
        ("drop_before", "skip", 0),  # never processed: the events are missing
        ("drop_before", "resend", 1),
    ],
)
def test_a_batch_in_doubt_follows_the_in_doubt_policy_and_is_counted(
    platform: Platform, tmp_path: Path, fault: str, policy: str, copies: int
) -> None:
    outbox = make_outbox(12)  # one request
    platform.server.fail_next("/users/track", fault)
    run = run_delivery(platform.make_sink(in_doubt=policy), outbox, tmp_path)
    want = expected_events(outbox, ident)
    assert run.report.sent == 12 and run.report.failed == 0
    assert set(platform.server.profiles) == set(outbox["user_id"])  # no record lost
    assert run.report.in_doubt == len({user for user, _ in want})  # users with events
    assert platform.server.event_names() == sorted(want * copies)
    resent = platform.server.requests[-1].json()
    assert ("events" in resent) == (policy == "resend")


def test_a_batch_left_sending_by_a_killed_run_is_in_doubt_when_resumed(
    platform: Platform, tmp_path: Path
) -> None:
    """The state a run killed with its request in flight leaves: the batch ``sending``."""
    outbox = make_outbox(12)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run("cut", "braze", as_of=AS_OF_UTC, model="m", target="", batches=[(0, 12)])
    ledger.mark("cut", "braze", "b000000", "sending")
    sink = platform.make_sink()
    report = deliver(
        outbox, sink, ledger, "cut", FAST, as_of=AS_OF_UTC, dead_letters=tmp_path / "dead.ndjson"
    )
    sink.close()
    assert report.sent == 12 and report.in_doubt == len(
        {u for u, _ in expected_events(outbox, ident)}
    )
    assert platform.server.event_names() == []  # skip, the default: no event sent twice
    assert set(platform.server.profiles) == set(outbox["user_id"])
    assert [b.state for b in ledger.batches("cut", "braze")] == ["done"]


def test_in_doubt_comes_from_config_and_defaults_to_skip(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lapse.config import load_config
    from lapse.sinks import make_sink

    config = load_config()
    monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
    monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", platform.server.url)
    assert config.sinks.braze.in_doubt == "skip" and make_sink("braze", config).in_doubt == "skip"
    config.sinks.braze.in_doubt = "resend"
    assert make_sink("braze", config).in_doubt == "resend"


def test_a_batch_in_doubt_split_before_its_resend_stays_in_doubt(
    platform: Platform, tmp_path: Path
) -> None:
    """Planned as one request, left ``sending``, resumed by a sink told a lower limit: the
    halves it is split into are in doubt too (their events skipped, their users counted)."""
    outbox = with_triggers(make_outbox(12), lambda i: 1)  # 2-3 objects per user
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run("cut", "braze", as_of=AS_OF_UTC, model="m", target="", batches=[(0, 12)])
    ledger.mark("cut", "braze", "b000000", "sending")
    sink = platform.make_sink(max_objects=12)
    report = deliver(
        outbox, sink, ledger, "cut", FAST, as_of=AS_OF_UTC, dead_letters=tmp_path / "dead.ndjson"
    )
    sink.close()
    states = [b.state for b in ledger.batches("cut", "braze")]
    assert "split" in states and states.count("done") >= 2
    assert report.sent == 12 and report.in_doubt == 12 == ledger.in_doubt("cut", "braze")
    assert platform.server.event_names() == []
    assert set(platform.server.profiles) == set(outbox["user_id"])
