"""The signed JSON webhook over real HTTP against a local receiver."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lapse.sinks.base import Limits, SinkAuthError
from lapse.sinks.webhook import WebhookSink
from platform_servers import (
    CONTRACT,
    KEY,
    Platform,
    PlatformServer,
    WebhookServer,
    contract_missing_key_fails_before_sending,
    make_outbox,
    run_delivery,
    served,  # noqa: F401  (fixture)
)


@pytest.fixture
def platform(served: Callable[[PlatformServer], PlatformServer]) -> Platform:  # noqa: F811
    server = served(WebhookServer())

    def make(key: str = KEY, **kw: Any) -> WebhookSink:
        return WebhookSink(url=f"{server.url}/hook", secret=key, **kw)

    return Platform(
        server=server,
        make_sink=make,
        ident=lambda r: r["user_id"],
        path="/hook",
        key_env="LAPSE_WEBHOOK_SECRET",
        env={"LAPSE_WEBHOOK_URL": f"{server.url}/hook"},
    )


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__.removeprefix("contract_"))
def test_contract(contract: Callable[..., None], platform: Platform, tmp_path: Path) -> None:
    contract(platform, tmp_path)


def test_missing_secret(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract_missing_key_fails_before_sending(platform, tmp_path, monkeypatch)


def test_signature_and_body(platform: Platform, tmp_path: Path) -> None:
    sink = platform.make_sink(limits=Limits(max_items=3))
    run_delivery(sink, make_outbox(5), tmp_path)
    first, second = platform.server.requests
    expected = hmac.new(KEY.encode(), first.body, hashlib.sha256).hexdigest()
    assert first.headers["x-lapse-signature"] == expected
    assert first.headers["x-lapse-batch-id"] == "run-1/b000000"
    body = first.json()
    assert body["score_run_id"] == "run-1" and body["batch_id"] == "b000000"
    record = body["records"][0]
    assert record["user_id"] == "u000" and record["as_of"] == "2024-06-01"
    assert record["events"] == ["lapse_replenishment_due", "lapse_risk_high"]
    assert len(body["records"]) == 3 and len(second.json()["records"]) == 2


def test_check(platform: Platform) -> None:
    assert "accepted a signed request" in platform.make_sink().check()
    with pytest.raises(SinkAuthError, match="LAPSE_WEBHOOK_SECRET") as info:
        platform.make_sink(key="other-secret").check()
    assert "other-secret" not in str(info.value)
