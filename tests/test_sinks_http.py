"""The helpers every platform sink shares: Retry-After, dedupe ids, record mapping."""

from __future__ import annotations

from datetime import UTC, date, datetime
from email.utils import format_datetime

import pytest

from lapse.sinks._http import (
    HttpClient,
    dedupe_id,
    parse_retry_after,
    record_attributes,
    record_events,
    ulid,
)
from lapse.sinks.base import RetryableError
from platform_servers import make_outbox


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 2 ") == 2.0
    now = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(datetime(2024, 6, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == 30.0
    assert parse_retry_after(later, now=now.timestamp() + 60) == 0.0  # in the past
    assert parse_retry_after(None) is None and parse_retry_after("later") is None


def test_dedupe_ids_are_deterministic_and_distinct() -> None:
    a = dedupe_id(date(2024, 6, 1), "u1", "lapse_milestone")
    assert a == dedupe_id("2024-06-01", "u1", "lapse_milestone")
    assert a != dedupe_id(date(2024, 6, 2), "u1", "lapse_milestone")
    assert a != dedupe_id(date(2024, 6, 1), "u2", "lapse_milestone")
    u = ulid(date(2024, 6, 1), "u1", "lapse_milestone")
    assert len(u) == 26 and u == ulid("2024-06-01", "u1", "lapse_milestone")
    assert u[:10] == ulid(date(2024, 6, 1), "u2", "x")[:10]  # same run date, same time part


def test_record_mapping() -> None:
    record = make_outbox(1).to_dicts()[0]
    attrs = record_attributes(record, "lapse_")
    assert sorted(attrs) == sorted(
        f"lapse_{k}"
        for k in [
            "churn_risk",
            "churn_risk_percentile",
            "risk_segment",
            "reasons",
            "triggers",
            "refill_sku",
            "next_order_date",
            "depletion_date",
            "refill_prompt_date",
            "model_version",
            "as_of",
            "control",
        ]
    )
    assert attrs["lapse_as_of"] == "2024-06-01"
    assert record_events(record, "x_") == ["x_replenishment_due", "x_risk_high"]
    same = {**record, "previous_risk_segment": "high", "triggers": []}
    assert record_events(same, "lapse_") == []


def test_transport_errors_are_retryable_and_scrubbed() -> None:
    client = HttpClient("demo", "http://127.0.0.1:9", key_env="K", secrets=("s3cr3t",))
    with pytest.raises(RetryableError) as info:
        client.request("POST", "/x?key=s3cr3t", body=b"{}")
    assert "s3cr3t" not in str(info.value)
    client.close()
