"""Klaviyo: profile bulk import jobs (properties and list membership) and bulk event create.

A batch of records becomes one profile bulk import job per risk segment
(``POST /api/profile-bulk-import-jobs``; the ``{prefix}`` properties, matched on
``external_id`` or ``email``; the job's ``lists`` relationship adds the
profiles to the list configured for that segment in ``sinks.klaviyo.lists``).
Import jobs are asynchronous: each is polled (``GET
/api/profile-bulk-import-jobs/{id}``) until ``complete`` before the batch
counts as sent, and the profiles it reports in ``import-errors`` fail alone. A
job that does not finish within ``poll_timeout_seconds`` makes the batch retry
(imports are upserts, so that is harmless). Then the trigger and
segment-change events go through ``POST /api/event-bulk-create-jobs``, each
with ``unique_id`` from (run date, user, event name): Klaviyo keeps one event
per ``unique_id``, so a resent batch logs nothing twice.

Limits (Klaviyo's Bulk Import Profiles and Bulk Create Events references):
10,000 profiles, 5 MB and 100 KB per profile per import job (the 100 KB is
checked on a record's profile and events together, stricter); 1,000 events or
5 MB per bulk event request (events are sent in chunks of 1,000); both
endpoints 10 requests/s burst, 150/min steady. Batches are paced at one per
10 seconds, which keeps a batch's imports, polls and event requests under the
steady limit; a 429 (``Retry-After`` honoured) resends the batch.

List membership is add-only: Klaviyo's list API removes profiles by Klaviyo
id, which lapse does not hold. For "currently high risk" build a Klaviyo
segment on ``lapse_risk_segment``; use the lists as "entered high risk" lists.
The bulk import cannot clear a property (nulls are ignored), so a date that
became null keeps its previous value on Klaviyo; read it with ``lapse_as_of``.

Environment: ``LAPSE_KLAVIYO_API_KEY`` (a private key with profiles, lists and
events read/write), ``LAPSE_KLAVIYO_BASE_URL`` (default ``https://a.klaviyo.com``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, dedupe_id, env, event_time
from lapse.sinks.base import Item, Limits, Outcome, Record, RetryableError, SinkError

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["KlaviyoSink"]

KEY_ENV = "LAPSE_KLAVIYO_API_KEY"
URL_ENV = "LAPSE_KLAVIYO_BASE_URL"
DEFAULT_URL = "https://a.klaviyo.com"
IMPORTS = "/api/profile-bulk-import-jobs"
EVENTS = "/api/event-bulk-create-jobs"
MAX_EVENTS = 1000
_JSON_API = "application/vnd.api+json"


def _chunks(entries: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Event entries (one per profile) grouped so each group has at most ``limit`` events."""
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    count = 0
    for entry in entries:
        n = len(entry["attributes"]["events"]["data"])
        if current and count + n > limit:
            out.append(current)
            current, count = [], 0
        current.append(entry)
        count += n
    if current:
        out.append(current)
    return out


#: Klaviyo's profile identifier for anonymous visitors.
ANONYMOUS_ID = "anonymous_id"


class KlaviyoSink(HttpSink):
    """Records to Klaviyo (see the module docstring)."""

    name = "klaviyo"
    anonymous_identifier = ANONYMOUS_ID
    limits = Limits(
        max_items=10_000,
        max_bytes=5_000_000,
        max_item_bytes=100_000,
        envelope_bytes=256,
        requests_per_second=0.1,
    )
    key_env = KEY_ENV

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        prefix: str = "lapse_",
        identifier: str = "external_id",
        identifier_column: str = "user_id",
        lists: dict[str, str] | None = None,
        revision: str = "2025-01-15",
        poll_seconds: float = 2.0,
        poll_timeout_seconds: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            prefix=prefix,
            identifier_column=identifier_column,
            missing=() if api_key else (KEY_ENV,),
        )
        self._key = api_key
        self.base_url = base_url or DEFAULT_URL
        self.identifier = identifier
        self.lists = {k: str(v) for k, v in (lists or {}).items()}
        self.revision = revision
        self.poll_seconds = poll_seconds
        self.poll_timeout_seconds = poll_timeout_seconds
        self._sleep = sleep

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> KlaviyoSink:
        k = config.sinks.klaviyo
        return cls(
            api_key=env(KEY_ENV),
            base_url=env(URL_ENV),
            prefix=config.sinks.prefix,
            identifier=k.identifier,
            identifier_column=k.identifier_column,
            lists=k.lists,
            revision=k.revision,
            poll_seconds=k.poll_seconds,
            poll_timeout_seconds=k.poll_timeout_seconds,
        )

    def make_client(self) -> HttpClient:
        assert self._key is not None
        return HttpClient(
            "klaviyo",
            self.base_url,
            key_env=KEY_ENV,
            headers={
                "Authorization": f"Klaviyo-API-Key {self._key}",
                "revision": self.revision,
                "Accept": _JSON_API,
                "Content-Type": _JSON_API,
            },
            secrets=(self._key,),
        )

    def encode(self, record: Record) -> Item | None:
        who = self.who(record, self.identifier)
        if who is None:
            return None
        (user,) = who.values()
        properties = {k: v for k, v in self.attributes(record).items() if v is not None}
        event_props = self.event_properties(record)
        events = [
            {
                "type": "event",
                "attributes": {
                    "properties": event_props,
                    "metric": {"data": {"type": "metric", "attributes": {"name": name}}},
                    "time": event_time(record["as_of"]),
                    "unique_id": dedupe_id(record["as_of"], user, name),
                },
            }
            for name in self.events(record)
        ]
        return {
            "profile": {"type": "profile", "attributes": {**who, "properties": properties}},
            "segment": record.get("risk_segment"),
            "events": events,
        }

    # -- requests ----------------------------------------------------------------------------
    def _imports(self, items: list[Item]) -> list[tuple[list[int], dict[str, Any]]]:
        """One import job per target list (profiles of unlisted segments share one job)."""
        groups: dict[str | None, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(self.lists.get(str(item["segment"])), []).append(k)
        jobs = []
        for list_id, members in groups.items():
            data: dict[str, Any] = {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": [items[k]["profile"] for k in members]}},
            }
            if list_id is not None:
                data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
            jobs.append((members, {"data": data}))
        return jobs

    def _event_jobs(self, items: list[Item], skip: set[int]) -> list[dict[str, Any]]:
        entries = [
            {
                "type": "event-bulk-create",
                "attributes": {
                    "profile": {
                        "data": {
                            "type": "profile",
                            "attributes": {
                                k: v
                                for k, v in item["profile"]["attributes"].items()
                                if k in (self.identifier, ANONYMOUS_ID)
                            },
                        }
                    },
                    "events": {"data": item["events"]},
                },
            }
            for k, item in enumerate(items)
            if item["events"] and k not in skip
        ]
        return [
            {
                "data": {
                    "type": "event-bulk-create-job",
                    "attributes": {"events-bulk-create": {"data": chunk}},
                }
            }
            for chunk in _chunks(entries, MAX_EVENTS)
        ]

    def payload(self, items: list[Item]) -> Any:
        return {
            IMPORTS: [body for _, body in self._imports(items)],
            EVENTS: self._event_jobs(items, set()),
        }

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        failed: dict[int, str] = {}
        for members, body in self._imports(items):
            job = self.json_body(self.post_json(IMPORTS, body))
            job_id = job.get("data", {}).get("id") if isinstance(job, dict) else None
            if not job_id:
                raise RetryableError("klaviyo: the import job was accepted without an id")
            for position, why in self._wait_for(str(job_id), len(members)).items():
                failed[members[position]] = why
        for body in self._event_jobs(items, set(failed)):
            self.post_json(EVENTS, body)
        return Outcome(failed=failed)

    def _wait_for(self, job_id: str, size: int) -> dict[int, str]:
        """Poll an import job until it completes; the positions it rejected, with reasons."""
        waited = 0.0
        while True:
            job = self.json_body(self.client.request("GET", f"{IMPORTS}/{job_id}"))
            attrs = job.get("data", {}).get("attributes", {}) if isinstance(job, dict) else {}
            status = attrs.get("status")
            if status == "complete":
                break
            if status == "cancelled":
                raise SinkError(f"klaviyo: import job {job_id} was cancelled")
            if waited >= self.poll_timeout_seconds:
                raise RetryableError(
                    f"klaviyo: import job {job_id} still {status!r} after {waited:.0f}s"
                )
            self._sleep(self.poll_seconds)
            waited += max(self.poll_seconds, 1e-3)
        if not attrs.get("failed_count"):
            return {}
        rejected: dict[int, str] = {}
        url: str | None = f"{IMPORTS}/{job_id}/import-errors"
        while url:
            page = self.json_body(self.client.request("GET", url))
            for error in page.get("data", []) if isinstance(page, dict) else []:
                err = error.get("attributes", {}) if isinstance(error, dict) else {}
                pointer = str((err.get("source") or {}).get("pointer") or "")
                tail = pointer.rstrip("/").rsplit("/", 1)[-1]
                if tail.isdigit() and int(tail) < size:
                    rejected[int(tail)] = (
                        f"klaviyo rejected the profile: {err.get('title') or err.get('code')}"
                        f" {err.get('detail') or ''}".strip()
                    )
            links = page.get("links", {}) if isinstance(page, dict) else {}
            url = links.get("next") if isinstance(links, dict) else None
        return rejected

    def check(self) -> str:
        # The cheapest read that needs the scopes polling needs (lists:read, profiles:read).
        self.client.request("GET", IMPORTS, params={"page[size]": "1"})
        missing = []
        for segment, list_id in sorted(self.lists.items()):
            try:
                self.client.request("GET", f"/api/lists/{list_id}")
            except SinkError as exc:
                if "HTTP 404" not in str(exc):
                    raise
                missing.append(f"{segment} -> {list_id}")
        note = (
            f"; these lists do not exist (fix sinks.klaviyo.lists): {', '.join(missing)}"
            if missing
            else ""
        )
        return f"klaviyo: {redact_url(self.base_url)} accepted {KEY_ENV} (revision {self.revision}){note}"

    def describe(self) -> str:
        return f"klaviyo {redact_url(self.base_url)}"
