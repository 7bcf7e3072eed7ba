"""Segment: ``identify`` traits and ``track`` events through the HTTP Tracking API ``/v1/batch``.

One record becomes one ``identify`` (the ``{prefix}`` traits, ``userId`` from
the configured column) and one ``track`` per fired trigger and segment change.
Every message carries a deterministic ``messageId`` (Segment deduplicates on
it): events from (run date, user, event name), so a resent batch never logs an
event twice; identifies from (run date, user, the traits' hash), so a resend
with the same traits is dropped and a changed one still goes through.

Limits (Segment's HTTP API source docs, "Max request size", "Rate limits",
"Errors"): 500 KB per batch request and 32 KB per message, answered with a 400
saying the payload is too large, which this sink treats like a 413 so the
delivery layer splits the batch; at most 2,500 messages per batch (beyond it
Segment answers 200 and drops them, so batches never carry more). The 32 KB
bound is applied to a record's messages together (stricter than needed; a
record is about 1 KB). Batches carry at most 250 records (lapse's choice).
Segment asks for at most 1,000 requests per second per workspace (429 with
``Retry-After`` beyond); requests are paced at 50 per second.

Environment: ``LAPSE_SEGMENT_API_KEY`` (the HTTP API source's write key, sent
as the Basic-auth user), ``LAPSE_SEGMENT_BASE_URL`` (default
``https://api.segment.io``; EU workspaces: ``https://events.eu1.segmentapis.com``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, dedupe_id, env, event_time, to_json
from lapse.sinks.base import Item, Limits, Outcome, Record

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["SegmentSink"]

KEY_ENV = "LAPSE_SEGMENT_API_KEY"
URL_ENV = "LAPSE_SEGMENT_BASE_URL"
DEFAULT_URL = "https://api.segment.io"
MAX_BATCH_BYTES = 500_000
MAX_MESSAGE_BYTES = 32_000
MAX_MESSAGES = 2_500


class SegmentSink(HttpSink):
    """Records to Segment ``/v1/batch`` (see the module docstring)."""

    name = "segment"
    anonymous_identifier = "anonymousId"
    limits = Limits(
        max_items=250,
        max_bytes=MAX_BATCH_BYTES,
        max_item_bytes=MAX_MESSAGE_BYTES,
        envelope_bytes=64,
        requests_per_second=50.0,
        max_objects=MAX_MESSAGES,
    )
    key_env = KEY_ENV

    def __init__(
        self,
        *,
        write_key: str | None,
        base_url: str | None = None,
        prefix: str = "lapse_",
        identifier_column: str = "user_id",
    ) -> None:
        super().__init__(
            prefix=prefix,
            identifier_column=identifier_column,
            missing=() if write_key else (KEY_ENV,),
        )
        self._key = write_key
        self.base_url = base_url or DEFAULT_URL

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> SegmentSink:
        return cls(
            write_key=env(KEY_ENV),
            base_url=env(URL_ENV),
            prefix=config.sinks.prefix,
            identifier_column=config.sinks.segment.identifier_column,
        )

    def make_client(self) -> HttpClient:
        assert self._key is not None
        return HttpClient(
            "segment",
            self.base_url,
            key_env=KEY_ENV,
            auth=(self._key, ""),
            secrets=(self._key,),
            too_large=("too large",),  # Segment says 400 for an oversized batch or message
        )

    def encode(self, record: Record) -> Item | None:
        found = self.who(record, "userId")
        if found is None:
            return None
        (user,) = found.values()
        when = event_time(record["as_of"])
        traits = self.attributes(record)
        digest = hashlib.sha256(to_json(traits)).hexdigest()[:16]
        messages: list[dict[str, Any]] = [
            {
                "type": "identify",
                **found,
                "traits": traits,
                "timestamp": when,
                "messageId": dedupe_id(record["as_of"], user, f"identify:{digest}"),
            }
        ]
        properties = self.event_properties(record)
        messages.extend(
            {
                "type": "track",
                **found,
                "event": name,
                "properties": properties,
                "timestamp": when,
                "messageId": dedupe_id(record["as_of"], user, name),
            }
            for name in self.events(record)
        )
        return messages

    def payload(self, items: list[Item]) -> Any:
        return {"batch": [m for messages in items for m in messages]}

    def objects(self, item: Item) -> int:
        return len(item)  # the record's messages: its identify and its tracks

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        self.post_json("/v1/batch", self.payload(items))
        return Outcome()

    def check(self) -> str:
        # The Tracking API has no call that verifies a write key: it answers 200 to an
        # unknown key too. An empty batch (which records nothing) shows it is reachable.
        self.post_json("/v1/batch", {"batch": []})
        return (
            f"segment: {redact_url(self.base_url)} is reachable; Segment's tracking API cannot verify "
            f"a write key (it accepts unknown keys silently): check that {KEY_ENV} is the "
            "HTTP API source's write key and watch that source's debugger after a run"
        )

    def describe(self) -> str:
        return f"segment {redact_url(self.base_url)}"
