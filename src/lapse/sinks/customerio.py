"""Customer.io: attributes and events through Track API v2 ``/api/v2/batch``, plus manual segments.

One record becomes one ``person``/``identify`` operation (the ``{prefix}``
attributes) and one ``person``/``event`` operation per fired trigger and
segment change. Each event carries ``id``, a ULID derived from (run date,
user, event name): Customer.io drops an event whose id it has seen, so a
resent batch logs nothing twice. A ``207`` answer lists the operations it
rejected (``errors[].batch_index``); only their records fail.

Manual segments (``sinks.customerio.segments``: risk segment -> segment id):
after the batch, people are added to their segment's manual segment and, when
their segment changed, removed from the previous one (Track API v1
``/api/v1/segments/{id}/add_customers`` and ``remove_customers``, same
credentials; both idempotent).

Limits (documented): a batch request under 500 KB and each operation under
32 KB; the 32 KB bound is applied to a record's operations together
(stricter than needed). No count limit is documented; batches carry at most
1,000 records, the documented maximum of ids per manual-segment request. The
Track API's fair-use limit is 100 requests per second; a batch makes up to
1 + 2 x segments requests, so batches are paced at 10 per second.

Environment: ``LAPSE_CUSTOMERIO_SITE_ID`` and ``LAPSE_CUSTOMERIO_API_KEY`` (the
workspace's Track API credentials, HTTP Basic), ``LAPSE_CUSTOMERIO_BASE_URL``
(default ``https://track.customer.io``; EU: ``https://track-eu.customer.io``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, env, ulid
from lapse.sinks.base import Item, Limits, Outcome, Record

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["CustomerioSink"]

KEY_ENV = "LAPSE_CUSTOMERIO_API_KEY"
SITE_ENV = "LAPSE_CUSTOMERIO_SITE_ID"
URL_ENV = "LAPSE_CUSTOMERIO_BASE_URL"
DEFAULT_URL = "https://track.customer.io"
BATCH = "/api/v2/batch"


def _unix(value: Any) -> int:
    day = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


#: The Track v2 field of an anonymous person's events.
ANONYMOUS_ID = "anonymous_id"


class CustomerioSink(HttpSink):
    """Records to Customer.io's Track API (see the module docstring)."""

    name = "customerio"
    anonymous_identifier = ANONYMOUS_ID
    limits = Limits(
        max_items=1000,
        max_bytes=500_000,
        max_item_bytes=32_000,
        envelope_bytes=32,
        requests_per_second=10.0,
    )
    key_env = KEY_ENV

    def __init__(
        self,
        *,
        site_id: str | None,
        api_key: str | None,
        base_url: str | None = None,
        prefix: str = "lapse_",
        identifier: str = "id",
        identifier_column: str = "user_id",
        segments: dict[str, int | str] | None = None,
    ) -> None:
        missing = tuple(n for n, v in ((SITE_ENV, site_id), (KEY_ENV, api_key)) if not v)
        super().__init__(prefix=prefix, identifier_column=identifier_column, missing=missing)
        self._site, self._key = site_id, api_key
        self.base_url = base_url or DEFAULT_URL
        self.identifier = identifier
        self.segments = {k: str(v) for k, v in (segments or {}).items()}

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> CustomerioSink:
        cio = config.sinks.customerio
        return cls(
            site_id=env(SITE_ENV),
            api_key=env(KEY_ENV),
            base_url=env(URL_ENV),
            prefix=config.sinks.prefix,
            identifier=cio.identifier,
            identifier_column=cio.identifier_column,
            segments=cio.segments,
        )

    def make_client(self) -> HttpClient:
        assert self._site is not None and self._key is not None
        return HttpClient(
            "customerio",
            self.base_url,
            key_env=f"{SITE_ENV} and {KEY_ENV}",
            auth=(self._site, self._key),
            secrets=(self._key, self._site),
        )

    def encode(self, record: Record) -> Item | None:
        found = self.who(record, self.identifier)
        if found is None:
            return None
        (user,) = found.values()
        anonymous = ANONYMOUS_ID in found
        # an anonymous person has no profile to identify: only its events go, under
        # anonymous_id, for Customer.io to merge when the person is identified
        who = found if anonymous else {"identifiers": found}
        ops: list[dict[str, Any]] = []
        if not anonymous:
            ops.append(
                {
                    "type": "person",
                    **who,
                    "action": "identify",
                    "attributes": self.attributes(record),
                }
            )
        properties = self.event_properties(record)
        ops.extend(
            {
                "type": "person",
                **who,
                "action": "event",
                "id": ulid(record["as_of"], user, name),
                "name": name,
                "timestamp": _unix(record["as_of"]),
                "attributes": properties,
            }
            for name in self.events(record)
        )
        return {
            "ops": ops,
            "user": None if anonymous else user,
            "segment": record.get("risk_segment"),
            "previous": record.get("previous_risk_segment"),
        }

    def _requests(self, items: list[Item]) -> dict[str, Any]:
        requests: dict[str, Any] = {BATCH: {"batch": [op for i in items for op in i["ops"]]}}
        adds: dict[str, list[str]] = {}
        removes: dict[str, list[str]] = {}
        for item in items:
            if item["user"] is None:  # anonymous: no profile to put in a segment
                continue
            target = self.segments.get(str(item["segment"]))
            if target is not None:
                adds.setdefault(target, []).append(item["user"])
            before = self.segments.get(str(item["previous"]))
            if before is not None and before != target:
                removes.setdefault(before, []).append(item["user"])
        for seg, ids in adds.items():
            requests[f"/api/v1/segments/{seg}/add_customers"] = {"ids": ids}
        for seg, ids in removes.items():
            requests[f"/api/v1/segments/{seg}/remove_customers"] = {"ids": ids}
        return requests

    def payload(self, items: list[Item]) -> Any:
        requests = self._requests(items)
        return requests[BATCH] if len(requests) == 1 else requests

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        requests = self._requests(items)
        response = self.post_json(BATCH, requests.pop(BATCH))
        failed: dict[int, str] = {}
        if response.status_code == 207:
            ops = [(k, op["action"]) for k, i in enumerate(items) for op in i["ops"]]
            data = self.json_body(response)
            errors = data.get("errors") if isinstance(data, dict) else None
            for error in errors if isinstance(errors, list) else []:
                index = error.get("batch_index") if isinstance(error, dict) else None
                if isinstance(index, int) and 0 <= index < len(ops):
                    owner, action = ops[index]
                    why = " ".join(
                        str(error[k]) for k in ("reason", "field", "message") if error.get(k)
                    )
                    failed.setdefault(owner, f"customerio rejected the {action} operation: {why}")
        refused = {items[k]["user"] for k in failed}
        params = {"id_type": "email"} if self.identifier == "email" else None
        for path, body in requests.items():
            ids = [u for u in body["ids"] if u not in refused]
            if ids:  # a person Customer.io refused is not put in a segment
                self.post_json(path, {"ids": ids}, params=params)
        return Outcome(failed=failed)

    def check(self) -> str:
        # The cheapest authenticated Track API call: which region the workspace is in.
        data = self.json_body(self.client.request("GET", "/api/v1/accounts/region"))
        region = data.get("url") if isinstance(data, dict) else None
        note = ""
        if region and region.rstrip("/") != self.base_url.rstrip("/"):
            note = f"; the workspace's Track API is {region}: set {URL_ENV} to it"
        center = data.get("data_center", "unknown") if isinstance(data, dict) else "unknown"
        return (
            f"customerio: {redact_url(self.base_url)} accepted {SITE_ENV} and {KEY_ENV} "
            f"(data center: {center}){note}"
        )

    def describe(self) -> str:
        return f"customerio {redact_url(self.base_url)}"
