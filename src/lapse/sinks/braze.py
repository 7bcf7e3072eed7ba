"""Braze: custom attributes and custom events through ``POST /users/track``.

One record becomes one attributes object (matched on ``external_id``) and one
event per fired trigger (``{prefix}{trigger_id}``) plus ``{prefix}risk_{segment}``
when the segment changed. A request carries at most
``sinks.braze.max_objects_per_request`` objects (default 75) counted across
``attributes`` and ``events`` together, Braze's current limit (accounts on
legacy rate limits may send 75 per array; some Monthly Active Users contracts
allow 50 combined). A record's objects travel together: batches are cut so that
no request holds more, and a record that alone holds more is dead-lettered.
Braze answers an over-limit request with ``400 Max Input Length Exceeded`` and a
body over 4 MB with 413: both split the batch in two, down to one record. Braze
answers a 2xx with ``errors[]`` (``input_array`` + ``index``) for objects it
rejected: those records fail alone.

Braze events have no dedupe key: a batch resent after a lost acknowledgement
logs its events twice. Attribute updates are idempotent, so flows that start on
an attribute change (e.g. ``lapse_risk_segment`` changed to ``high``) are the
safe choice; event-triggered flows should set a re-eligibility window. A batch
whose delivery is in doubt (the run was killed with its request in flight, or
the connection dropped after sending) follows ``sinks.braze.in_doubt``: ``skip``
(the default) resends its attributes only, so no event is doubled and one may be
missing (the ``lapse_triggers`` attribute still carries the triggers); ``resend``
sends the events again, so none is missing and some may arrive twice. The run
counts the users concerned either way.

Environment: ``LAPSE_BRAZE_API_KEY`` (a REST key with ``users.track``),
``LAPSE_BRAZE_BASE_URL`` (your instance's REST endpoint, e.g.
``https://rest.iad-01.braze.com``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lapse.redact import redact_url
from lapse.sinks._http import HttpClient, HttpSink, env, event_time
from lapse.sinks.base import (
    InDoubt,
    Item,
    Limits,
    Outcome,
    Record,
    RetryableError,
    SinkAuthError,
    SinkError,
)

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["BrazeSink"]

KEY_ENV = "LAPSE_BRAZE_API_KEY"
URL_ENV = "LAPSE_BRAZE_BASE_URL"
#: Objects (attributes and events together) per /users/track request: Braze's current limit.
MAX_OBJECTS = 75
#: The ``alias_label`` of the user aliases that carry anonymous ids.
ALIAS_LABEL = "anonymous_id"
#: How Braze's 400 says a request holds too many objects.
TOO_MANY_OBJECTS = "max input length exceeded"


class BrazeSink(HttpSink):
    """Records to Braze ``/users/track`` (see the module docstring)."""

    name = "braze"
    key_env = KEY_ENV
    # an anonymous visitor becomes an alias-only profile (alias label ALIAS_LABEL)
    anonymous_identifier = "user_alias"
    in_doubt: InDoubt = "skip"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        prefix: str = "lapse_",
        identifier_column: str = "user_id",
        max_objects: int = MAX_OBJECTS,
        in_doubt: InDoubt = "skip",
    ) -> None:
        missing = tuple(n for n, v in ((KEY_ENV, api_key), (URL_ENV, base_url)) if not v)
        super().__init__(prefix=prefix, identifier_column=identifier_column, missing=missing)
        self._key = api_key
        self.base_url = base_url
        self.in_doubt = in_doubt
        # 3,000 requests per three seconds by default: stay under 800/s.
        self.limits = Limits(
            max_items=max_objects, max_objects=max_objects, requests_per_second=800.0
        )

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> BrazeSink:
        return cls(
            api_key=env(KEY_ENV),
            base_url=env(URL_ENV),
            prefix=config.sinks.prefix,
            identifier_column=config.sinks.braze.identifier_column,
            max_objects=config.sinks.braze.max_objects_per_request,
            in_doubt=config.sinks.braze.in_doubt,
        )

    def make_client(self) -> HttpClient:
        assert self._key is not None and self.base_url is not None
        return HttpClient(
            "braze",
            self.base_url,
            key_env=KEY_ENV,
            headers={"Authorization": f"Bearer {self._key}"},
            secrets=(self._key,),
            too_large=(TOO_MANY_OBJECTS,),
        )

    def encode(self, record: Record) -> Item | None:
        found = self.who(record, "external_id")
        if found is None:
            return None
        who: dict[str, Any] = dict(found)
        extra: dict[str, Any] = {}
        if "user_alias" in who:  # an alias-only profile, created when missing
            who = {"user_alias": {"alias_name": who["user_alias"], "alias_label": ALIAS_LABEL}}
            extra = {"_update_existing_only": False}
        properties = self.event_properties(record)
        return {
            "attributes": {**who, **extra, **self.attributes(record)},
            "events": [
                {
                    **who,
                    "name": name,
                    "time": event_time(record["as_of"]),
                    "properties": properties,
                }
                for name in self.events(record)
            ],
        }

    def objects(self, item: Item) -> int:
        return 1 + len(item["events"])

    def undeduped(self, item: Item) -> int:
        return len(item["events"])

    def deduped_part(self, item: Item) -> Item:
        return {**item, "events": []}

    def payload(self, items: list[Item]) -> Any:
        body: dict[str, Any] = {"attributes": [i["attributes"] for i in items]}
        events = [e for i in items for e in i["events"]]
        if events:
            body["events"] = events
        return body

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        response = self.post_json("/users/track", self.payload(items))
        data = self.json_body(response)
        owners = {
            "attributes": list(range(len(items))),
            "events": [k for k, i in enumerate(items) for _ in i["events"]],
        }
        failed: dict[int, str] = {}
        errors = data.get("errors") if isinstance(data, dict) else None
        for error in errors if isinstance(errors, list) else []:
            if not isinstance(error, dict):
                continue
            where = owners.get(str(error.get("input_array")), [])
            index = error.get("index")
            if isinstance(index, int) and 0 <= index < len(where):
                failed.setdefault(
                    where[index],
                    f"braze rejected the {error.get('input_array')} object: {error.get('type')}",
                )
        return Outcome(failed=failed)

    def check(self) -> str:
        # Braze has no read-only call a users.track key may make; an empty /users/track
        # is refused for its body (400) only after the key was accepted, and writes nothing.
        try:
            self.client.request("POST", "/users/track", body=b"{}")
        except (SinkAuthError, RetryableError):
            raise
        except SinkError:
            pass  # the empty body refused (400): the key itself was accepted
        return (
            f"braze: {redact_url(self.client.base_url)} is reachable and accepted {KEY_ENV} "
            "(an empty /users/track request, which writes nothing)"
        )

    def describe(self) -> str:
        return f"braze {redact_url(self.base_url) if self.base_url else '(no base URL)'}"
