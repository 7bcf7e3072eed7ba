"""What the messaging-platform sinks share: one HTTP client each, errors, record mapping.

:class:`HttpClient` wraps one ``httpx.Client`` per sink (timeouts, connection
reuse) and turns HTTP outcomes into the errors of :mod:`lapse.sinks.base`:

============================  ==========================================
401, 403                      :class:`SinkAuthError` naming the env var
413, or a 400 whose body has  :class:`PayloadTooLarge` (the batch is split;
one of ``too_large``          a record alone is dead-lettered)
408, 429, 5xx, timeouts,      :class:`RetryableError` with ``Retry-After``
dropped connections           (seconds or an HTTP-date) when given;
                              ``in_doubt`` when no answer came to a request
                              that went out (timeouts, dropped connections)
no connection at all          :class:`ConnectionFailed` naming the URL
other 4xx                     :class:`SinkError` with the platform's message
============================  ==========================================

Secrets (keys, write keys, site ids, and a password, token or query in the
base URL) are never put in a message: every text that leaves this module goes
through :meth:`HttpClient.scrub`, and a URL is only ever shown redacted
(:func:`lapse.redact.redact_url`).

:class:`HttpSink` holds what the platform sinks do alike: the identifier of a
record, the ``{prefix}`` attributes, the trigger and segment-change events and
their deterministic dedupe ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from lapse.redact import redact, redact_url
from lapse.schema import run_day
from lapse.sinks.base import (
    ConnectionFailed,
    PayloadTooLarge,
    Record,
    RetryableError,
    Sink,
    SinkAuthError,
    SinkError,
    json_default,
)

__all__ = [
    "HttpClient",
    "HttpSink",
    "dedupe_id",
    "env",
    "event_time",
    "parse_retry_after",
    "record_attributes",
    "record_events",
    "to_json",
    "ulid",
]

#: Seconds to connect, and to wait for a response (platforms answer batches in well under a minute).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
_DETAIL_CHARS = 300
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def env(name: str) -> str | None:
    """An environment variable, ``None`` when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def to_json(payload: Any) -> bytes:
    """``payload`` as compact UTF-8 JSON (the exact bytes sent, and signed)."""
    return json.dumps(
        payload, default=json_default, separators=(",", ":"), ensure_ascii=False
    ).encode()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class HttpClient:
    """One platform's HTTP client; see the module docstring for the error mapping.

    ``key_env`` names the environment variable(s) to blame for a 401/403;
    ``secrets`` are scrubbed from every message this client raises;
    ``too_large`` lists the phrases (lower case) with which the platform's 400
    says a request is too large (Braze: ``max input length exceeded``).
    """

    def __init__(
        self,
        platform: str,
        base_url: str,
        *,
        key_env: str,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        secrets: tuple[str | None, ...] = (),
        timeout: float = READ_TIMEOUT,
        too_large: tuple[str, ...] = (),
    ) -> None:
        self.platform = platform
        self.too_large = too_large
        self.base_url = base_url.rstrip("/")
        self.key_env = key_env
        self._secrets = tuple(s for s in secrets if s)
        self._client = httpx.Client(
            headers={"Content-Type": "application/json", **(headers or {})},
            auth=httpx.BasicAuth(*auth) if auth else None,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            follow_redirects=False,
        )

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``***`` (the base URL's included)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text, self.base_url)

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; a 2xx/3xx response is returned, anything else raised as an error."""
        where = f"{self.platform} {method} {path.split('?')[0]}"
        try:
            response = self._client.request(
                method, self.url(path), content=body, params=params, headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # refused, unknown host
            raise ConnectionFailed(
                self.scrub(
                    f"{self.platform} {method} {redact_url(self.url(path))}: cannot connect "
                    f"({type(exc).__name__}: {exc})"
                )
            ) from None
        except httpx.TimeoutException as exc:  # the request may have been processed
            raise RetryableError(
                f"{where}: timed out ({type(exc).__name__})",
                in_doubt=not isinstance(exc, httpx.PoolTimeout),
            ) from None
        except httpx.TransportError as exc:  # reset, closed before the response: in doubt
            raise RetryableError(
                self.scrub(f"{where}: connection failed ({type(exc).__name__}: {exc})"),
                in_doubt=True,
            ) from None
        status = response.status_code
        if status < 400:
            return response
        detail = self.scrub(" ".join(response.text.split())[:_DETAIL_CHARS]) or "(empty body)"
        if status in (401, 403):
            raise SinkAuthError(
                f"{where}: HTTP {status}, {self.platform} at {redact_url(self.base_url)} "
                f"refused the credentials: check "
                f"{self.key_env} (and that the key has the permissions this sink needs, and "
                f"the base URL is your region's); the platform said: {detail}"
            )
        if status == 413 or (status == 400 and any(p in detail.lower() for p in self.too_large)):
            raise PayloadTooLarge(f"{where}: HTTP {status}, the request is too large: {detail}")
        if status in (408, 429) or status >= 500:
            raise RetryableError(
                f"{where}: HTTP {status}: {detail}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        raise SinkError(f"{where}: HTTP {status}, {self.platform} refused the batch: {detail}")

    def close(self) -> None:
        self._client.close()


def record_attributes(record: Record, prefix: str) -> dict[str, Any]:
    """The profile attributes lapse writes for ``record`` (dates as ISO strings)."""
    values = {
        "churn_risk": record.get("churn_risk"),
        "churn_risk_percentile": record.get("churn_risk_percentile"),
        "risk_segment": record.get("risk_segment"),
        "reasons": list(record.get("reasons") or []),
        "triggers": list(record.get("triggers") or []),
        "refill_sku": record.get("refill_sku"),
        "next_order_date": record.get("next_order_date"),
        "depletion_date": record.get("depletion_date"),
        "refill_prompt_date": record.get("refill_prompt_date"),
        "model_version": record.get("model_version"),
        "as_of": record.get("as_of"),
        "control": bool(record.get("control") or False),
    }
    return {
        f"{prefix}{k}": v.isoformat() if isinstance(v, date | datetime) else v
        for k, v in values.items()
    }


def record_events(record: Record, prefix: str) -> list[str]:
    """Event names for ``record``: each fired trigger, then a segment change (if any)."""
    names = [f"{prefix}{t}" for t in record.get("triggers") or []]
    segment = record.get("risk_segment")
    if segment is not None and segment != record.get("previous_risk_segment"):
        names.append(f"{prefix}risk_{segment}")
    return names


def dedupe_id(as_of: date | str, user: str, event: str) -> str:
    """A deterministic event id from (run date, user, event): the same on every resend.

    >>> dedupe_id(date(2024, 5, 1), "u1", "lapse_milestone") == dedupe_id("2024-05-01", "u1", "lapse_milestone")
    True
    """
    digest = hashlib.sha256(f"{run_day(as_of)}\x1f{user}\x1f{event}".encode()).hexdigest()
    return f"lapse-{digest[:32]}"


def ulid(as_of: date | str, user: str, event: str) -> str:
    """A deterministic ULID (Customer.io's event id format): the run date's millisecond
    timestamp, then 80 bits of the hash of (run date, user, event)."""
    day = run_day(as_of)
    millis = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    digest = hashlib.sha256(f"{day.isoformat()}\x1f{user}\x1f{event}".encode()).digest()
    number = (millis << 80) | int.from_bytes(digest[:10], "big")
    return "".join(_CROCKFORD[(number >> (5 * i)) & 31] for i in reversed(range(26)))


def event_time(as_of: date | str) -> str:
    """The run date at 00:00 UTC, ISO 8601 (the time stamped on every event of a run)."""
    return f"{run_day(as_of)}T00:00:00Z"


class HttpSink(Sink):
    """A sink that talks to a platform over HTTP; subclasses build :attr:`client` in ``open``.

    ``identifier_column`` is the record column (``user_id``, or an attributes
    column listed in ``attribute_columns``) holding the platform's identifier.
    ``missing`` names the unset environment variables (the run stops at ``open``).
    """

    key_env: str = ""

    def __init__(
        self, *, prefix: str, identifier_column: str, missing: tuple[str, ...] = ()
    ) -> None:
        self.prefix = prefix
        self.identifier_column = identifier_column
        self.missing = missing
        if identifier_column != "user_id":
            self.attribute_columns = (identifier_column,)
        self._client: HttpClient | None = None

    # -- shared by encode ------------------------------------------------------------------
    def identity(self, record: Record) -> str | None:
        """The record's identifier for the platform, ``None`` when it has none."""
        value = record.get(self.identifier_column)
        if value is None:
            return None
        text = str(value).strip()
        return text or None

    def who(self, record: Record, field: str) -> dict[str, str] | None:
        """``{field: identifier}``, or ``{anonymous_identifier: user_id}`` for an
        anonymous record: an anonymous id never goes out as the user identifier."""
        if record.get("anonymous"):
            user = record.get("user_id")
            if self.anonymous_identifier is None or user is None:
                return None
            return {self.anonymous_identifier: str(user)}
        user = self.identity(record)
        return None if user is None else {field: user}

    def attributes(self, record: Record) -> dict[str, Any]:
        return record_attributes(record, self.prefix)

    def events(self, record: Record) -> list[str]:
        return record_events(record, self.prefix)

    # -- the client --------------------------------------------------------------------------
    def make_client(self) -> HttpClient:
        """The platform's client (credentials read in ``from_config``)."""
        raise NotImplementedError

    @property
    def client(self) -> HttpClient:
        if self.missing:
            raise SinkAuthError(
                f"{self.name}: {', '.join(self.missing)} "
                f"{'is' if len(self.missing) == 1 else 'are'} not set; export "
                f"{'it' if len(self.missing) == 1 else 'them'} before sending to {self.name}"
            )
        if self._client is None:
            self._client = self.make_client()
        return self._client

    def open(self, score_run_id: str) -> None:
        self.client  # noqa: B018  (fails fast, before any batch, when credentials are missing)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def check(self) -> str:
        """Verify credentials and reachability; a message saying what was checked.

        Raises the errors of :mod:`lapse.sinks.base` when something is wrong.
        """
        raise NotImplementedError

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> httpx.Response:
        return self.client.request("POST", path, body=to_json(payload), **kwargs)

    def json_body(self, response: httpx.Response) -> Any:
        """The response's JSON, ``{}`` when it has none."""
        try:
            return response.json()
        except ValueError:
            return {}

    def event_properties(self, record: Record) -> dict[str, Any]:
        """What every lapse event carries, for flows to personalise on."""
        return {
            k: v.isoformat() if isinstance(v, date | datetime) else v
            for k, v in (
                ("risk_segment", record.get("risk_segment")),
                ("previous_risk_segment", record.get("previous_risk_segment")),
                ("churn_risk", record.get("churn_risk")),
                ("refill_sku", record.get("refill_sku")),
                ("refill_prompt_date", record.get("refill_prompt_date")),
                ("score_run_id", record.get("score_run_id")),
            )
        }
