"""A generic JSON webhook: batches of records POSTed to ``LAPSE_WEBHOOK_URL``, signed.

Each request's body is ``{"score_run_id", "batch_id", "records": [...]}``; a
record holds the pinned record columns (dates as ISO strings), plus
``previous_risk_segment``, ``control``, ``events`` (the ``{prefix}`` event names
that fire for it) and ``idempotency_key`` (from the run date and user: the same
on every resend, so a receiver can drop duplicates). Headers:

- ``X-Lapse-Signature``: hex HMAC-SHA256 of the exact body bytes, keyed with
  ``LAPSE_WEBHOOK_SECRET``; receivers recompute it and compare in constant time.
- ``X-Lapse-Batch-Id``: ``<score_run_id>/<batch_id>``, stable across resends.

The receiver answers 2xx to accept the batch, optionally with
``{"failed": [{"index": i, "reason": "..."}]}`` for records it rejected; 413 to
have the batch split; 429/5xx (``Retry-After`` honoured) to have it resent;
401/403 stops the run. Limits come from ``sinks.webhook`` in the config.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, dedupe_id, env, to_json
from lapse.sinks.base import RECORD_COLUMNS, Item, Limits, Outcome, Record

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["WebhookSink", "sign"]

URL_ENV = "LAPSE_WEBHOOK_URL"
SECRET_ENV = "LAPSE_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-Lapse-Signature"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Lapse-Signature`` of ``body``: hex HMAC-SHA256 keyed with ``secret``.

    >>> sign("s3cret", b"{}")[:12]
    'adbde1ce40c8'
    """
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(HttpSink):
    """Records to a JSON webhook (see the module docstring)."""

    name = "webhook"
    anonymous_identifier = "anonymous_id"
    key_env = SECRET_ENV

    def __init__(
        self,
        *,
        url: str | None,
        secret: str | None,
        prefix: str = "lapse_",
        limits: Limits | None = None,
    ) -> None:
        missing = tuple(n for n, v in ((URL_ENV, url), (SECRET_ENV, secret)) if not v)
        super().__init__(prefix=prefix, identifier_column="user_id", missing=missing)
        self.url = url
        self._secret = secret
        self.limits = limits or Limits(max_items=500, max_bytes=1_000_000, envelope_bytes=128)
        self._run = ""

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> WebhookSink:
        hook = config.sinks.webhook
        return cls(
            url=env(URL_ENV),
            secret=env(SECRET_ENV),
            prefix=config.sinks.prefix,
            limits=Limits(
                max_items=hook.max_items,
                max_bytes=hook.max_bytes,
                envelope_bytes=128,
                requests_per_second=hook.requests_per_second,
            ),
        )

    def make_client(self) -> HttpClient:
        assert self.url is not None
        # the client also keeps the URL's own credentials (user:password@, a query token) out
        return HttpClient(
            "webhook", self.url, key_env=f"{SECRET_ENV} (and {URL_ENV})", secrets=(self._secret,)
        )

    def encode(self, record: Record) -> Item | None:
        found = self.who(record, "user_id")
        if found is None:
            return None
        (user,) = found.values()
        # an anonymous record carries anonymous_id in place of user_id
        item: dict[str, Any] = {**found}
        item.update((k, record.get(k)) for k in RECORD_COLUMNS if k != "user_id")
        item["previous_risk_segment"] = record.get("previous_risk_segment")
        item["control"] = bool(record.get("control") or False)
        item["events"] = self.events(record)
        item["idempotency_key"] = dedupe_id(record["as_of"], user, "record")
        return item

    def open(self, score_run_id: str) -> None:
        super().open(score_run_id)
        self._run = score_run_id

    def payload(self, items: list[Item]) -> Any:
        return {"score_run_id": self._run, "batch_id": None, "records": items}

    def _post(self, body: Any, batch: str) -> Any:
        assert self._secret is not None
        raw = to_json(body)
        response = self.client.request(
            "POST",
            "",
            body=raw,
            headers={SIGNATURE_HEADER: sign(self._secret, raw), "X-Lapse-Batch-Id": batch},
        )
        return self.json_body(response)

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        body = {**self.payload(items), "batch_id": batch_id}
        data = self._post(body, f"{self._run}/{batch_id}")
        failed: dict[int, str] = {}
        rejected = data.get("failed") if isinstance(data, dict) else None
        for entry in rejected if isinstance(rejected, list) else []:
            index = entry.get("index") if isinstance(entry, dict) else None
            if isinstance(index, int) and 0 <= index < len(items):
                failed[index] = f"webhook rejected the record: {entry.get('reason', 'no reason')}"
        return Outcome(failed=failed)

    def check(self) -> str:
        # A signed request with no records: the cheapest call a receiver can answer.
        self._post({"check": True, "records": []}, "check")
        return f"webhook: {self.describe()} accepted a signed request with no records"

    def describe(self) -> str:
        if not self.url:
            return "webhook (no URL)"
        return f"webhook {redact_url(self.url)}"
