"""Local stand-ins for the messaging platforms, and the contract every sink is held to.

Each server is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 enforcing its
platform's documented contract (auth header, payload shape, count and byte
limits) and keeping what it accepted: ``profiles`` (identifier -> attributes),
``events`` (dedupe key -> event; a platform without keys gets a fresh key per
event) and ``duplicates`` (events it dropped for a key it had already seen).

Faults are injected per path with :meth:`PlatformServer.fail_next`:
``"429"`` (``Retry-After: 1``), ``"500"``, ``"503"``, ``"400"``, ``"413"``,
``"drop_before"`` (the connection closes before the batch is processed) and
``"drop_after"`` (the batch is processed, then the connection closes with no
response: the client cannot know it went through).

The ``contract_*`` functions are the tests every platform passes; each
``test_sinks_<platform>.py`` binds them to its server with a ``platform`` fixture.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest

from lapse.config import DeliveryConfig
from lapse.delivery.batches import DeliveryReport, deliver, encode, plan_batches
from lapse.delivery.ledger import Ledger
from lapse.sinks.base import RECORD_SCHEMA, Sink, SinkAuthError

KEY = "sk-live-0123456789abcdef"
AS_OF = date(2024, 6, 1)


# -- the HTTP plumbing ----------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode())


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class PlatformServer:
    """A platform on localhost; subclasses implement :meth:`authorized` and :meth:`handle`."""

    #: What the platform answers a body over :attr:`max_bytes` (Segment says 400).
    too_large_status = 413

    def __init__(self, *, key: str = KEY, max_bytes: int | None = None) -> None:
        self.key = key
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self.faults: dict[str, list[str]] = {}
        self.requests: list[Request] = []
        self.profiles: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.reject: set[str] = set()  # identifiers refused per record
        self.seen: set[str] = set()  # every identifier in a processed request
        self.anonymous: set[str] = set()  # ids received under the anonymous-profile identifier
        self._ids = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> PlatformServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_next(self, path: str, *faults: str) -> None:
        with self.lock:
            self.faults.setdefault(path, []).extend(faults)

    def calls(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    # -- state helpers for subclasses -------------------------------------------------------------
    def upsert(self, ident: str, attributes: dict[str, Any]) -> None:
        self.seen.add(ident)
        self.profiles.setdefault(ident, {}).update(attributes)

    def event(self, ident: str, name: str, key: str | None, payload: Any = None) -> None:
        self.seen.add(ident)
        if key is None:
            key = f"auto-{next(self._ids)}"
        if key in self.events:
            self.duplicates += 1
            return
        self.events[key] = {"user": ident, "name": name, "payload": payload}

    def event_names(self) -> list[tuple[str, str]]:
        return sorted((e["user"], e["name"]) for e in self.events.values())

    # -- to implement --------------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        raise NotImplementedError

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    def unauthorized(self, request: Request) -> Reply:
        return Reply(401, {"message": "Invalid API key"})

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, request: Request) -> Reply | str | None:
        with self.lock:
            self.requests.append(request)
            queue = self.faults.get(request.path) or []
            fault = queue.pop(0) if queue else None
        if fault == "drop_before":
            return None
        if fault in ("429", "500", "503", "400", "413"):
            status = int(fault)
            headers = {"Retry-After": "1"} if status == 429 else {}
            return Reply(status, {"message": f"injected {status}"}, headers)
        if not self.authorized(request):
            return self.unauthorized(request)
        if self.max_bytes is not None and len(request.body) > self.max_bytes:
            return Reply(self.too_large_status, {"message": "Payload is too large"})
        try:
            with self.lock:
                reply = self.handle(request)
        except BadRequest as exc:
            reply = Reply(exc.status, {"message": str(exc)})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = Reply(400, {"message": f"malformed request: {exc!r}"})
        if fault == "drop_after":
            return None
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                reply = server._dispatch(request)
                if reply is None:  # drop the connection, no response
                    self.close_connection = True
                    return
                raw = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = _serve

        return Handler


def basic_user(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


# -- Braze ------------------------------------------------------------------------------------
class BrazeServer(PlatformServer):
    """``POST /users/track``: Bearer key; at most ``max_objects`` (75) objects per request
    counted across ``attributes``, ``events`` and ``purchases`` together, else ``400 Max
    Input Length Exceeded`` (Braze's API limits and errors pages); 413 over 4 MB (its
    user data endpoints); 201 with ``errors[]`` (``input_array``, ``index``) for rejected
    objects; no event dedupe. ``requests_over_limit`` counts the requests refused for
    their object count."""

    def __init__(self, *, max_objects: int = 75, **kwargs: Any) -> None:
        kwargs.setdefault("max_bytes", 4_000_000)
        super().__init__(**kwargs)
        self.max_objects = max_objects
        self.requests_over_limit = 0

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    def handle(self, request: Request) -> Reply:
        if request.method != "POST" or request.path != "/users/track":
            raise BadRequest("unknown endpoint", 404)
        body = request.json()
        attributes, events = body.get("attributes", []), body.get("events", [])
        purchases = body.get("purchases", [])
        if not attributes and not events and not purchases:
            raise BadRequest("Valid data must be provided in the 'attributes', 'events' fields.")
        if len(attributes) + len(events) + len(purchases) > self.max_objects:
            self.requests_over_limit += 1
            raise BadRequest("Max Input Length Exceeded")
        errors = []
        for i, attr in enumerate(attributes):
            if self._alias(attr):
                continue
            ident = attr.get("external_id")
            if not ident:
                errors.append(
                    {"type": "'external_id' is required", "input_array": "attributes", "index": i}
                )
            elif ident in self.reject:
                errors.append(
                    {"type": "invalid attribute", "input_array": "attributes", "index": i}
                )
            else:
                self.upsert(ident, {k: v for k, v in attr.items() if k != "external_id"})
        for i, ev in enumerate(events):
            if self._alias(ev):
                continue
            ident, name = ev.get("external_id"), ev.get("name")
            if not ident or not name or "time" not in ev:
                raise BadRequest("events need external_id, name and time")
            if ident in self.reject:
                errors.append({"type": "invalid event", "input_array": "events", "index": i})
                continue
            self.event(ident, name, None, ev.get("properties"))
        body_out: dict[str, Any] = {"message": "success", "attributes_processed": len(attributes)}
        if errors:
            body_out["errors"] = errors
        return Reply(201, body_out)

    def _alias(self, obj: dict[str, Any]) -> bool:
        """An object for an alias-only profile (``user_alias`` instead of ``external_id``)."""
        alias = obj.get("user_alias")
        if alias is None:
            return False
        if "external_id" in obj or not alias.get("alias_name") or not alias.get("alias_label"):
            raise BadRequest("user_alias needs alias_name and alias_label, and no external_id")
        self.anonymous.add(alias["alias_name"])
        return True


# -- Segment ----------------------------------------------------------------------------------
class SegmentServer(PlatformServer):
    """``POST /v1/batch``: Basic auth with the write key as user; 500 KB per batch and 32 KB
    per message (400 "too large" beyond); at most 2,500 messages per batch (beyond it a 200
    and the batch is dropped, counted in ``dropped_over_count``); dedupe on ``messageId``
    (Segment's HTTP API source docs). Like Segment, an unknown write key gets a 200 and its
    data is dropped, unless ``strict`` (then 401)."""

    too_large_status = 400

    def __init__(self, *, strict: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strict = strict
        self.batch_limit = 500_000
        self.max_messages = 2_500
        self.dropped_unknown_key = 0
        self.dropped_over_count = 0

    def authorized(self, request: Request) -> bool:
        creds = basic_user(request)
        return creds is not None and (creds[0] == self.key or not self.strict)

    def handle(self, request: Request) -> Reply:
        if request.path != "/v1/batch":
            raise BadRequest("unknown endpoint", 404)
        limit = min(self.batch_limit, self.max_bytes or self.batch_limit)
        if len(request.body) > limit:
            raise BadRequest("Payload is too large")
        batch = request.json()["batch"]
        for msg in batch:
            if len(json.dumps(msg)) > 32_000:
                raise BadRequest("Message is too large")
            if msg["type"] not in ("identify", "track") or not (
                msg.get("userId") or msg.get("anonymousId")
            ):
                raise BadRequest("userId or anonymousId required")
            if not msg.get("messageId"):
                raise BadRequest("messageId required")
            if msg["type"] == "track" and not msg.get("event"):
                raise BadRequest("track needs an event")
        creds = basic_user(request)
        if creds is None or creds[0] != self.key:
            self.dropped_unknown_key += len(batch)
            return Reply(200, {"success": True})
        if len(batch) > self.max_messages:
            self.dropped_over_count += len(batch)
            return Reply(200, {"success": True})
        for msg in batch:
            if not msg.get("userId"):  # an anonymous visitor's profile
                self.anonymous.add(msg["anonymousId"])
                continue
            if msg["type"] == "identify":
                if msg["messageId"] in self.events:
                    self.duplicates += 1
                    continue
                self.events[msg["messageId"]] = {"user": msg["userId"], "name": "identify"}
                self.upsert(msg["userId"], msg["traits"])
            else:
                self.event(msg["userId"], msg["event"], msg["messageId"], msg.get("properties"))
        return Reply(200, {"success": True})

    def event_names(self) -> list[tuple[str, str]]:
        return sorted(
            (e["user"], e["name"]) for e in self.events.values() if e["name"] != "identify"
        )


# -- webhook ----------------------------------------------------------------------------------
class WebhookServer(PlatformServer):
    """``POST /hook``: ``X-Lapse-Signature`` must be the hex HMAC-SHA256 of the body with the
    shared secret; a body over ``max_bytes`` gets 413; dedupe on ``idempotency_key`` (and
    on event name per user and day); records of ``reject`` users come back in ``failed``."""

    def authorized(self, request: Request) -> bool:
        expected = hmac.new(self.key.encode(), request.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(request.headers.get("x-lapse-signature", ""), expected)

    def unauthorized(self, request: Request) -> Reply:
        return Reply(401, {"message": "bad signature"})

    def handle(self, request: Request) -> Reply:
        if request.path != "/hook":
            raise BadRequest("unknown endpoint", 404)
        body = request.json()
        failed = []
        for i, record in enumerate(body["records"]):
            if "user_id" not in record:
                self.anonymous.add(record["anonymous_id"])
                continue
            ident = record["user_id"]
            if ident in self.reject:
                failed.append({"index": i, "reason": "unknown user"})
                continue
            if not record.get("idempotency_key") or "as_of" not in record:
                raise BadRequest("records need idempotency_key and as_of")
            self.upsert(ident, {k: v for k, v in record.items() if k != "events"})
            for name in record["events"]:
                self.event(ident, name, f"{record['as_of']}/{ident}/{name}")
        return Reply(200, {"failed": failed} if failed else {"ok": True})


# -- records and a delivery run ----------------------------------------------------------------
SEGMENTS = ("high", "medium", "low")


def make_outbox(
    n: int,
    *,
    as_of: date = AS_OF,
    no_email: tuple[int, ...] = (),
    skip: tuple[int, ...] = (),
    reasons_len: int = 2,
) -> pl.DataFrame:
    """``n`` records ``u000..``; user ``i`` is in segment ``SEGMENTS[i % 3]``, fired the
    ``replenishment_due`` trigger when ``i % 4 == 0``, and was in ``low`` before when
    ``i % 5 == 0`` (new users otherwise); ``no_email`` users lack an email, ``skip`` users
    are left out (suppressed)."""
    rows = []
    for i in range(n):
        if i in skip:
            continue
        seg = SEGMENTS[i % 3]
        rows.append(
            {
                "user_id": f"u{i:03d}",
                "as_of": as_of,
                "score_run_id": "run-1",
                "churn_risk": round(0.9 - 0.3 * (i % 3), 2),
                "churn_risk_percentile": float(100 - i % 100),
                "risk_segment": seg,
                "reasons": [f"reason {k} of user {i}" for k in range(reasons_len)]
                if seg != "low"
                else [],
                "triggers": ["replenishment_due"] if i % 4 == 0 else [],
                "refill_sku": "sku-7" if i % 4 == 0 else None,
                "next_order_date": date(2024, 6, 10) if i % 4 == 0 else None,
                "depletion_date": date(2024, 6, 8) if i % 4 == 0 else None,
                "refill_prompt_date": date(2024, 6, 5) if i % 4 == 0 else None,
                "model_name": "lapse-churn",
                "model_version": "3",
                "previous_risk_segment": "low" if i % 5 == 0 else None,
                "control": False,
                "email": None if i in no_email else f"user{i}@example.com",
                "delta_key": f"k{i}",
            }
        )
    schema = {
        **RECORD_SCHEMA,
        "previous_risk_segment": pl.String(),
        "control": pl.Boolean(),
        "email": pl.String(),
        "delta_key": pl.String(),
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def with_triggers(outbox: pl.DataFrame, per_user: Callable[[int], int]) -> pl.DataFrame:
    """``outbox`` with its ``i``-th record firing ``per_user(i)`` triggers (``t0``, ``t1``, ...)."""
    fired = [[f"t{k}" for k in range(per_user(i))] for i in range(outbox.height)]
    return outbox.with_columns(pl.Series("triggers", fired, dtype=pl.List(pl.String)))


def expected_events(
    outbox: pl.DataFrame, ident: Callable[[dict[str, Any]], str | None]
) -> list[tuple[str, str]]:
    """(identifier, event name) every record should produce, with the default prefix."""
    out = []
    for r in outbox.to_dicts():
        who = ident(r)
        if who is None:
            continue
        out.extend((who, f"lapse_{t}") for t in r["triggers"])
        if r["risk_segment"] != r["previous_risk_segment"]:
            out.append((who, f"lapse_risk_{r['risk_segment']}"))
    return sorted(out)


@dataclass
class Run:
    report: DeliveryReport
    ledger: Ledger
    waits: list[float]
    run_id: str
    sink_name: str
    dead_letters: Path

    def states(self) -> list[str]:
        return [b.state for b in self.ledger.batches(self.run_id, self.sink_name)]


FAST = DeliveryConfig(max_attempts=6, backoff_seconds=0.0, max_backoff_seconds=5.0)


def run_delivery(
    sink: Sink,
    outbox: pl.DataFrame,
    tmp_path: Path,
    *,
    run_id: str = "run-1",
    config: DeliveryConfig = FAST,
) -> Run:
    """Plan, record and deliver ``outbox`` to ``sink`` with a real ledger; waits are recorded,
    not slept."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    items = encode(sink, outbox)
    plan = plan_batches(items, sink, config.batch_size)
    as_of = datetime(AS_OF.year, AS_OF.month, AS_OF.day, tzinfo=UTC)
    ledger.start_run(
        run_id, sink.name, as_of=as_of, model="m", target=sink.describe(), batches=plan
    )
    waits: list[float] = []
    dead = tmp_path / f"dead-{run_id}.ndjson"
    try:
        report = deliver(
            outbox, sink, ledger, run_id, config, as_of=as_of, dead_letters=dead, sleep=waits.append
        )
    except SinkAuthError:
        sink.close()
        raise
    sink.close()
    return Run(report, ledger, waits, run_id, sink.name, dead)


# -- the contract every platform sink passes ---------------------------------------------------
@dataclass
class Platform:
    """A platform's server and how to build a sink pointed at it.

    ``make_sink(key)`` builds the sink with that credential; ``ident(record)`` is the
    identifier the platform stores for a record (``None``: the record has none);
    ``path`` is the request path faults are injected on; ``dedupes`` says whether the
    platform drops repeated event keys.
    """

    server: PlatformServer
    make_sink: Callable[..., Sink]
    ident: Callable[[dict[str, Any]], str | None]
    path: str
    key_env: str
    dedupes: bool = True
    env: dict[str, str] = field(default_factory=dict)
    events_on_path: bool = True  # False: events go in another request than ``path``


def expected_profiles(outbox: pl.DataFrame, platform: Platform) -> set[str]:
    return {w for r in outbox.to_dicts() if (w := platform.ident(r)) is not None}


def contract_every_record_arrives_under_faults(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(40)
    server = platform.server
    server.fail_next(platform.path, "429", "500", "drop_before", "drop_after", "503")
    sink = platform.make_sink()
    run = run_delivery(sink, outbox, tmp_path)
    assert run.report.failed == 0, run.report.reasons
    assert run.report.sent == len(outbox)
    assert run.report.retried >= 5
    assert 1.0 in run.waits  # Retry-After: 1 honoured (recorded, not slept)
    assert set(run.states()) == {"done"}
    assert set(server.profiles) == expected_profiles(outbox, platform)
    assert server.profiles["u004" if "u004" in server.profiles else next(iter(server.profiles))]
    want = expected_events(outbox, platform.ident)
    got = server.event_names()
    if platform.dedupes:
        assert got == want  # each event exactly once although a batch was resent
        if platform.events_on_path:
            assert server.duplicates > 0  # the resend after "drop_after" was deduplicated
    else:  # the batch in doubt after the dropped connections follows the sink's policy
        assert run.report.in_doubt > 0 and sink.in_doubt is not None
        if sink.in_doubt == "resend":
            assert set(got) == set(want)  # at least once; repeats are the documented risk
        else:
            assert len(set(got)) == len(got) and set(got) < set(want)  # at most once


def contract_attribute_updates_idempotent(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(12)
    run_delivery(platform.make_sink(), outbox, tmp_path, run_id="a")
    first = json.dumps(platform.server.profiles, sort_keys=True)
    events = platform.server.event_names()
    run_delivery(platform.make_sink(), outbox, tmp_path, run_id="b")
    assert json.dumps(platform.server.profiles, sort_keys=True) == first
    if platform.dedupes:
        assert platform.server.event_names() == events
        assert platform.server.duplicates >= len(events)  # every resent event was dropped


def contract_bad_key_fails_fast(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(10)
    wrong = "sk-wrong-key-987654321"
    with pytest.raises(SinkAuthError) as info:
        run_delivery(platform.make_sink(key=wrong), outbox, tmp_path)
    message = str(info.value)
    assert platform.key_env in message
    assert wrong not in message and KEY not in message
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert {b.state for b in ledger.batches("run-1", platform.make_sink().name)} == {"pending"}
    assert platform.server.profiles == {} and platform.server.events == {}
    assert len([r for r in platform.server.requests if r.method == "POST"]) == 1  # no retries


def contract_missing_key_fails_before_sending(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lapse.config import load_config
    from lapse.sinks import make_sink

    for name, value in platform.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(platform.key_env, raising=False)
    sink = make_sink(platform.make_sink().name, load_config())
    with pytest.raises(SinkAuthError, match=platform.key_env):
        run_delivery(sink, make_outbox(3), tmp_path)
    assert platform.server.requests == []


def contract_oversized_batch_is_split(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(24, reasons_len=3)
    platform.server.max_bytes = 4_000  # far below the documented limit the sink plans with
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0, run.report.reasons
    assert "split" in run.states()
    assert set(platform.server.profiles) == expected_profiles(outbox, platform)


def contract_partial_success_per_record(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(15)
    idents = sorted(expected_profiles(outbox, platform))
    platform.server.reject = {idents[2], idents[7]}
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 2
    assert run.report.sent == len(outbox) - 2
    dead = [json.loads(line) for line in run.dead_letters.read_text().splitlines()]
    assert len(dead) == 2 and all(d["reason"] for d in dead)
    assert set(platform.server.profiles) == set(idents) - platform.server.reject


def contract_malformed_batch_is_dead_lettered(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(5)
    platform.server.fail_next(platform.path, "400")
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 5 and run.report.retried == 0
    assert "HTTP 400" in next(iter(run.report.reasons))


def contract_suppressed_and_unidentified_never_sent(platform: Platform, tmp_path: Path) -> None:
    outbox = make_outbox(12, skip=(3, 4), no_email=(5, 6))
    run = run_delivery(platform.make_sink(), outbox, tmp_path)
    assert run.report.failed == 0
    assert "u003" not in json.dumps([r.body.decode() for r in platform.server.requests])
    assert not {"user3@example.com", "user4@example.com"} & platform.server.seen
    assert set(platform.server.profiles) == expected_profiles(outbox, platform)
    unidentified = sum(1 for r in outbox.to_dicts() if platform.ident(r) is None)
    assert run.report.skipped == unidentified
    assert run.report.sent == len(outbox) - unidentified


# the keys under which platforms take a known user's id
EXTERNAL_KEYS = frozenset({"external_id", "userId", "user_id", "id", "email", "ids"})


def _external_values(value: Any) -> Iterator[str]:
    """Every value under an :data:`EXTERNAL_KEYS` key, anywhere in a JSON body."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in EXTERNAL_KEYS:
                yield from (v if isinstance(v, list) else [v])
            yield from _external_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from _external_values(v)


def contract_anonymous_ids_never_external(platform: Platform, tmp_path: Path) -> None:
    anonymous = {"u001", "u002", "u004"}  # u004 fires a trigger; all change segment
    outbox = make_outbox(9).with_columns(
        pl.col("user_id").is_in(sorted(anonymous)).alias("anonymous")
    )
    sink = platform.make_sink()
    run = run_delivery(sink, outbox, tmp_path)
    assert run.report.failed == 0, run.report.reasons
    bodies = [json.loads(r.body) for r in platform.server.requests if r.body]
    used = {str(v) for body in bodies for v in _external_values(body)}
    assert not anonymous & used  # never under a known user's identifier
    assert not anonymous & set(platform.server.profiles)
    assert not anonymous & {user for user, _ in platform.server.event_names()}
    if sink.anonymous_identifier is None:  # held back: nothing of theirs leaves
        assert platform.server.anonymous == set()
        assert run.report.skipped == len(anonymous)
        assert not any(a in r.body.decode() for r in platform.server.requests for a in anonymous)
    else:
        assert platform.server.anonymous == anonymous
        assert run.report.skipped == 0
    known = outbox.filter(~pl.col("anonymous"))
    assert set(platform.server.profiles) == expected_profiles(known, platform)


CONTRACT = [
    contract_every_record_arrives_under_faults,
    contract_attribute_updates_idempotent,
    contract_bad_key_fails_fast,
    contract_oversized_batch_is_split,
    contract_partial_success_per_record,
    contract_malformed_batch_is_dead_lettered,
    contract_suppressed_and_unidentified_never_sent,
    contract_anonymous_ids_never_external,
]


@pytest.fixture
def served() -> Iterator[Callable[[PlatformServer], PlatformServer]]:
    """Start servers for a test and stop them after it."""
    started: list[PlatformServer] = []

    def start(server: PlatformServer) -> PlatformServer:
        started.append(server.__enter__())
        return server

    yield start
    for s in started:
        s.__exit__(None, None, None)


# -- Customer.io ------------------------------------------------------------------------------
class CustomerioServer(PlatformServer):
    """Track API: Basic ``site_id:api_key``. ``POST /api/v2/batch`` under 500 KB, operations
    under 32 KB, events deduplicated on their ULID ``id``, ``207`` with
    ``errors[].batch_index`` for rejected operations; ``POST /api/v1/segments/{id}/
    add_customers|remove_customers`` (``{"ids": [...]}``, at most 1000, ``id_type``);
    ``GET /api/v1/accounts/region``."""

    SITE = "site-42"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.segments: dict[str, set[str]] = {}

    def authorized(self, request: Request) -> bool:
        return basic_user(request) == (self.SITE, self.key)

    def handle(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == "/api/v1/accounts/region":
            return Reply(200, {"url": "https://track.customer.io", "data_center": "us"})
        if request.path.startswith("/api/v1/segments/"):
            _, _, _, _, seg, verb = request.path.split("/")
            ids = request.json()["ids"]
            if len(ids) > 1000:
                raise BadRequest("at most 1000 ids")
            members = self.segments.setdefault(seg, set())
            if verb == "add_customers":
                members.update(ids)
            elif verb == "remove_customers":
                members.difference_update(ids)
            else:
                raise BadRequest("unknown endpoint", 404)
            return Reply(200, {})
        if request.path != "/api/v2/batch":
            raise BadRequest("unknown endpoint", 404)
        if len(request.body) > 500_000:
            raise BadRequest("batch must be smaller than 500kb", 413)
        errors = []
        for index, op in enumerate(request.json()["batch"]):
            if len(json.dumps(op)) > 32_000:
                errors.append(
                    {
                        "batch_index": index,
                        "reason": "too large",
                        "field": "",
                        "message": "over 32kb",
                    }
                )
                continue
            if op.get("type") == "person" and op.get("anonymous_id") and "identifiers" not in op:
                if op.get("action") != "event":  # only events can be anonymous
                    raise BadRequest("identifiers are required")
                self.anonymous.add(op["anonymous_id"])
                continue
            if op.get("type") != "person" or not op.get("identifiers"):
                raise BadRequest("type and identifiers are required")
            ((kind, ident),) = op["identifiers"].items()
            if kind not in ("id", "email"):
                raise BadRequest(f"unknown identifier {kind}")
            if ident in self.reject:
                errors.append(
                    {
                        "batch_index": index,
                        "reason": "invalid",
                        "field": "identifiers",
                        "message": "person is invalid",
                    }
                )
                continue
            if op["action"] == "identify":
                self.upsert(ident, op["attributes"])
            elif op["action"] == "event":
                event_id = op["id"]
                if len(event_id) != 26:
                    raise BadRequest("event id must be a ULID")
                self.event(ident, op["name"], event_id, op.get("attributes"))
            else:
                raise BadRequest(f"unknown action {op['action']}")
        return Reply(207, {"errors": errors}) if errors else Reply(200, {})


# -- Iterable ---------------------------------------------------------------------------------
class IterableServer(PlatformServer):
    """``Api-Key`` header. ``POST /api/users/bulkUpdate`` (``users[]`` with ``email`` or
    ``userId`` and ``dataFields``, merged) and ``POST /api/events/trackBulk`` (``events[]``
    with ``eventName``, ``id``: an event with a known id is updated, not added); both answer
    ``successCount``/``failCount`` and ``invalidEmails``/``invalidUserIds`` for rejected
    users. Counts over 1000 get 400 (lapse's own limit is lower); ``GET /api/channels``."""

    def authorized(self, request: Request) -> bool:
        return request.headers.get("api-key") == self.key

    def unauthorized(self, request: Request) -> Reply:
        return Reply(401, {"msg": "Invalid API key", "code": "BadApiKey", "params": None})

    @staticmethod
    def _who(entry: dict[str, Any]) -> tuple[str, str]:
        if entry.get("userId"):
            return "invalidUserIds", entry["userId"]
        if entry.get("email"):
            return "invalidEmails", entry["email"]
        raise BadRequest("email or userId required")

    def handle(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == "/api/channels":
            return Reply(200, {"channels": []})
        body = request.json()
        invalid: dict[str, list[str]] = {"invalidEmails": [], "invalidUserIds": []}
        if request.path == "/api/users/bulkUpdate":
            entries = body["users"]
            if len(entries) > 1000:
                raise BadRequest("too many users")
            for user in entries:
                kind, ident = self._who(user)
                if ident in self.reject:
                    invalid[kind].append(ident)
                    continue
                self.upsert(ident, user["dataFields"])
        elif request.path == "/api/events/trackBulk":
            entries = body["events"]
            if len(entries) > 2000:
                raise BadRequest("too many events")
            for ev in entries:
                kind, ident = self._who(ev)
                if not ev.get("eventName"):
                    raise BadRequest("eventName required")
                if ident in self.reject:
                    invalid[kind].append(ident)
                    continue
                self.event(ident, ev["eventName"], ev.get("id"), ev.get("dataFields"))
        else:
            raise BadRequest("unknown endpoint", 404)
        fails = len(invalid["invalidEmails"]) + len(invalid["invalidUserIds"])
        return Reply(200, {"successCount": len(entries) - fails, "failCount": fails, **invalid})


# -- Klaviyo ----------------------------------------------------------------------------------
class KlaviyoServer(PlatformServer):
    """``Authorization: Klaviyo-API-Key <key>`` and a ``revision`` header on every call.
    ``POST /api/profile-bulk-import-jobs``: at most 10,000 profiles, 5 MB and 100 KB per
    profile (Klaviyo's Bulk Import Profiles reference), upserts on
    ``external_id``/``email``, adds them to the job's list; answers 202 with a job id whose
    status reads ``queued`` once, then ``complete`` with ``failed_count``; rejected
    profiles are listed in ``import-errors`` (``source.pointer`` to their position).
    ``POST /api/event-bulk-create-jobs``: at most 1,000 events and 5 MB (its Bulk Create
    Events reference); one event per ``unique_id``. ``GET /api/lists/{id}`` knows the lists in :attr:`lists`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lists: dict[str, set[str]] = {"L-high": set(), "L-medium": set()}
        self.jobs: dict[str, dict[str, Any]] = {}

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Klaviyo-API-Key {self.key}"

    def handle(self, request: Request) -> Reply:
        if not request.headers.get("revision"):
            raise BadRequest("revision header required")
        path = request.path
        if request.method == "GET":
            if path == "/api/profile-bulk-import-jobs":
                return Reply(200, {"data": [], "links": {}})
            if path.startswith("/api/lists/"):
                list_id = path.rsplit("/", 1)[-1]
                if list_id not in self.lists:
                    raise BadRequest("not found", 404)
                return Reply(200, {"data": {"type": "list", "id": list_id}})
            parts = path.split("/")
            job = self.jobs[parts[3]]
            if len(parts) == 5 and parts[4] == "import-errors":
                return Reply(200, {"data": job["errors"], "links": {"next": None}})
            job["polls"] += 1
            status = "queued" if job["polls"] == 1 else "complete"
            return Reply(
                200,
                {
                    "data": {
                        "type": "profile-bulk-import-job",
                        "id": parts[3],
                        "attributes": {"status": status, "failed_count": len(job["errors"])},
                    }
                },
            )
        if path == "/api/profile-bulk-import-jobs":
            if len(request.body) > 5_000_000:
                raise BadRequest("payload too large", 413)
            data = request.json()["data"]
            if data["type"] != "profile-bulk-import-job":
                raise BadRequest("wrong type")
            profiles = data["attributes"]["profiles"]["data"]
            if len(profiles) > 10_000:
                raise BadRequest("at most 10,000 profiles per job")
            lists = [
                d["id"] for d in data.get("relationships", {}).get("lists", {}).get("data", [])
            ]
            errors = []
            for i, profile in enumerate(profiles):
                if len(json.dumps(profile)) > 100_000:
                    raise BadRequest(f"profile {i} is larger than 100KB")
                attrs = profile["attributes"]
                if set(attrs) & {"external_id", "email"} == set() and attrs.get("anonymous_id"):
                    self.anonymous.add(attrs["anonymous_id"])
                    continue
                ident = attrs.get("external_id") or attrs.get("email")
                if not ident:
                    raise BadRequest("a profile identifier is required")
                if ident in self.reject:
                    errors.append(
                        {
                            "type": "import-error",
                            "attributes": {
                                "code": "invalid",
                                "title": "Invalid profile",
                                "detail": "bad data",
                                "source": {"pointer": f"/data/attributes/profiles/data/{i}"},
                            },
                        }
                    )
                    continue
                self.upsert(ident, attrs["properties"])
                for list_id in lists:
                    self.lists.setdefault(list_id, set()).add(ident)
            job_id = f"job{len(self.jobs)}"
            self.jobs[job_id] = {"errors": errors, "polls": 0}
            return Reply(202, {"data": {"type": "profile-bulk-import-job", "id": job_id}})
        if path == "/api/event-bulk-create-jobs":
            if len(request.body) > 5_000_000:
                raise BadRequest("payload too large", 413)
            entries = request.json()["data"]["attributes"]["events-bulk-create"]["data"]
            if sum(len(e["attributes"]["events"]["data"]) for e in entries) > 1000:
                raise BadRequest("at most 1,000 events per request")
            for entry in entries:
                attrs = entry["attributes"]["profile"]["data"]["attributes"]
                ident = attrs.get("external_id") or attrs.get("email")
                if not ident:
                    self.anonymous.add(attrs["anonymous_id"])
                    continue
                for ev in entry["attributes"]["events"]["data"]:
                    a = ev["attributes"]
                    self.event(ident, a["metric"]["data"]["attributes"]["name"], a["unique_id"])
            return Reply(202, None)
        raise BadRequest("unknown endpoint", 404)
