"""Iterable: ``dataFields`` through ``/api/users/bulkUpdate``, events through ``/api/events/trackBulk``.

One record becomes one user update (the ``{prefix}`` attributes as
``dataFields``, matched on ``userId`` or ``email`` as configured) and one event
per fired trigger and segment change. Each event carries ``id`` derived from
(run date, user, event name); Iterable updates the event with that id instead
of adding one, so a resent batch logs nothing twice. Per-user rejections
(``invalidEmails``, ``invalidUserIds``, ``failedUpdates``,
``disallowedEventNames``) fail only their records.

Limits: Iterable documents rate limits (bulkUpdate 5 requests per second per
project, trackBulk 10) but no count or size limit for these two endpoints.
lapse chooses conservative ones: at most 200 users per request (so at most
1,400 events per trackBulk) and 1 MB per batch of records (their updates and
events together), paced at 4 batches per second (each batch is one bulkUpdate
and at most one trackBulk). A 413 still splits the batch.

Environment: ``LAPSE_ITERABLE_API_KEY`` (a server-side key, ``Api-Key`` header),
``LAPSE_ITERABLE_BASE_URL`` (default ``https://api.iterable.com``; EU projects:
``https://api.eu.iterable.com``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, dedupe_id, env
from lapse.sinks.base import Item, Limits, Outcome, Record

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["IterableSink"]

KEY_ENV = "LAPSE_ITERABLE_API_KEY"
URL_ENV = "LAPSE_ITERABLE_BASE_URL"
DEFAULT_URL = "https://api.iterable.com"
USERS = "/api/users/bulkUpdate"
EVENTS = "/api/events/trackBulk"


def _unix(value: Any) -> int:
    day = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def _strings(data: Any, *keys: str) -> set[str]:
    """Every string listed under ``keys`` in ``data`` and in its ``failedUpdates``."""
    out: set[str] = set()
    if not isinstance(data, dict):
        return out
    for source in (data, data.get("failedUpdates")):
        if not isinstance(source, dict):
            continue
        for key in keys:
            values = source.get(key)
            if isinstance(values, list):
                out.update(str(v) for v in values)
    return out


class IterableSink(HttpSink):
    """Records to Iterable (see the module docstring)."""

    name = "iterable"
    limits = Limits(max_items=200, max_bytes=1_000_000, envelope_bytes=64, requests_per_second=4.0)
    key_env = KEY_ENV

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        prefix: str = "lapse_",
        identifier: str = "userId",
        identifier_column: str = "user_id",
    ) -> None:
        super().__init__(
            prefix=prefix,
            identifier_column=identifier_column,
            missing=() if api_key else (KEY_ENV,),
        )
        self._key = api_key
        self.base_url = base_url or DEFAULT_URL
        self.identifier = identifier

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> IterableSink:
        it = config.sinks.iterable
        return cls(
            api_key=env(KEY_ENV),
            base_url=env(URL_ENV),
            prefix=config.sinks.prefix,
            identifier=it.identifier,
            identifier_column=it.identifier_column,
        )

    def make_client(self) -> HttpClient:
        assert self._key is not None
        return HttpClient(
            "iterable",
            self.base_url,
            key_env=KEY_ENV,
            headers={"Api-Key": self._key},
            secrets=(self._key,),
        )

    def encode(self, record: Record) -> Item | None:
        found = self.who(record, self.identifier)  # None for anonymous: Iterable has no id for them
        if found is None:
            return None
        (user,) = found.values()
        who: dict[str, Any] = dict(found)
        update: dict[str, Any] = {**who, "dataFields": self.attributes(record)}
        if self.identifier == "userId":
            update["preferUserId"] = True  # create the user by userId when unknown
        properties = self.event_properties(record)
        events = [
            {
                **who,
                "eventName": name,
                "id": dedupe_id(record["as_of"], user, name),
                "createdAt": _unix(record["as_of"]),
                "dataFields": properties,
            }
            for name in self.events(record)
        ]
        return {"user": update, "events": events}

    def payload(self, items: list[Item]) -> Any:
        requests: dict[str, Any] = {USERS: {"users": [i["user"] for i in items]}}
        events = [e for i in items for e in i["events"]]
        if events:
            requests[EVENTS] = {"events": events}
        return requests

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        requests = self.payload(items)
        failed: dict[int, str] = {}
        key = self.identifier
        data = self.json_body(self.post_json(USERS, requests[USERS]))
        bad = _strings(data, "invalidEmails", "invalidUserIds", "notFoundEmails", "notFoundUserIds")
        for k, item in enumerate(items):
            if str(item["user"][key]) in bad:
                failed[k] = f"iterable rejected the user update for this {key}"
        if EVENTS in requests:
            # events of users Iterable refused are not sent (they would create the user)
            events = [e for k, i in enumerate(items) if k not in failed for e in i["events"]]
            if events:
                data = self.json_body(self.post_json(EVENTS, {"events": events}))
                bad = _strings(
                    data, "invalidEmails", "invalidUserIds", "notFoundEmails", "notFoundUserIds"
                )
                banned = _strings(data, "disallowedEventNames")
                for k, item in enumerate(items):
                    if k in failed:
                        continue
                    if str(item["user"][key]) in bad:
                        failed[k] = f"iterable rejected the events for this {key}"
                    elif names := banned & {e["eventName"] for e in item["events"]}:
                        failed[k] = f"iterable disallows the event names {sorted(names)}"
        return Outcome(failed=failed)

    def check(self) -> str:
        # The cheapest read a server-side key may make: the project's message channels.
        self.client.request("GET", "/api/channels")
        return (
            f"iterable: {redact_url(self.base_url)} accepted {KEY_ENV} (GET /api/channels); a 401 "
            "would mean a wrong key, a client-side (JavaScript/mobile) key, or the wrong region"
        )

    def describe(self) -> str:
        return f"iterable {redact_url(self.base_url)}"
