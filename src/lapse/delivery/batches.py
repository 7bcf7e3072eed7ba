"""The one delivery layer every sink shares: batches, retries, throttling, ledger, dead letters.

A run's outbox (the records to send, in a fixed order) is cut into batches
that respect the sink's :class:`~lapse.sinks.base.Limits` (records, platform
objects and bytes per request); the batches are recorded in the ledger before
the first send. Each batch is sent with retries (tenacity: exponential backoff,
honouring a destination's ``Retry-After``, capped by
``delivery.max_backoff_seconds``), split in two when the destination says it is
too large (a batch over the sink's current limits, e.g. planned by an older
version of a run being resumed, is split before it is sent), and marked
``done`` only after the destination acknowledged it. Delivery is therefore at
least once: :func:`deliver` on a run that already has batches (a resume) sends
only those not yet ``done``.

Before each request a batch is marked ``sending``. A batch that is still
``sending`` when a run is resumed (killed with the request in flight, or between
the acknowledgement and the ledger write), or whose request got no answer (a
timeout, a connection dropped after sending: ``RetryableError.in_doubt``), is *in
doubt*: the destination may have processed it. It is sent again; what the
destination dedupes (profile upserts, events with an id) is unchanged by that.
For objects it cannot dedupe (:meth:`~lapse.sinks.base.Sink.undeduped`, Braze's
events) the sink's ``in_doubt`` policy decides: ``resend`` sends them again,
``skip`` sends the rest of each record only (:meth:`~lapse.sinks.base.Sink.deduped_part`).
The users concerned are counted either way (:attr:`DeliveryReport.in_doubt`, and in
the ledger for the run's summary over all its attempts), also when a batch in doubt
is split.

A destination that cannot be reached stops the run instead of filling the
dead letters: when no connection can be made (:class:`~lapse.sinks.base.ConnectionFailed`:
refused, unknown host, connect timeout) before the destination acknowledged any
batch of the run, the batch is tried :data:`FIRST_CONTACT_ATTEMPTS` times and the
run stops (:class:`~lapse.exceptions.DestinationUnreachable`, one line naming the redacted
URL), its batches pending, nothing dead-lettered, resumable. Later in a run a
lost connection is retried like any transient failure, and still stops the run
rather than dead-letter records that were never sent. Every retry of a run draws
on one budget (:class:`RetryBudget`, ``delivery.max_retry_seconds``): the waits
between tries and the time of the tries that failed. Once it is spent nothing is
retried any more; a batch that then fails is dead-lettered (or, unreachable,
stops the run), so a struggling destination costs a run minutes, not hours.

The frequency cap (``delivery.frequency_cap``) is enforced here too, by
:func:`apply_frequency_cap` before a run's outbox is fixed, for every trigger
and every kind of run: a *message* (:func:`is_message`) is a record that carries
at least one trigger and is not in the control group; once a sink acknowledged
it, the ledger remembers one message for that user, sink and run. A user who
already got ``messages`` messages from the sink within the ``days`` days ending
on the run's ``as_of`` day has this run's triggers withheld: the record still
goes, as an attribute update (segment, risk, dates) with empty ``triggers``, the
withheld ones stay in the audit snapshot (``withheld_triggers``), the user is
counted as ``capped``, and no cooldown starts, so the trigger fires again once
the cap allows. Attribute-only refreshes never count as messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from lapse.config import DeliveryConfig, FrequencyCap
from lapse.delivery.ledger import Batch, Ledger
from lapse.exceptions import DestinationUnreachable
from lapse.faults import fault_point
from lapse.files import atomic_path
from lapse.sinks.base import (
    ConnectionFailed,
    DeliveryStopped,
    Item,
    Outcome,
    PayloadTooLarge,
    RetryableError,
    Sink,
    SinkError,
    json_default,
    json_size,
)

__all__ = [
    "FIRST_CONTACT_ATTEMPTS",
    "INTERNAL_COLUMNS",
    "DeliveryReport",
    "RetryBudget",
    "apply_frequency_cap",
    "cap_window",
    "deliver",
    "delta_changes",
    "encode",
    "is_message",
    "plan_batches",
    "settle",
]

#: Outbox columns the delivery layer uses and never hands to a sink.
INTERNAL_COLUMNS: tuple[str, ...] = ("delta_key", "cooldown_keys")
#: Tries of a batch whose connection cannot be made before the destination
#: acknowledged anything of the run (then the run stops: a few seconds, not minutes).
FIRST_CONTACT_ATTEMPTS = 3


@dataclass
class RetryBudget:
    """The seconds a run may still spend on retries, shared by all its :func:`deliver` calls.

    ``reached`` turns true once the destination acknowledged a batch of the run;
    ``spent`` once a retry was refused for want of budget.
    """

    seconds: float
    reached: bool = False
    spent: bool = False

    @classmethod
    def of(cls, config: DeliveryConfig) -> RetryBudget:
        """A run's whole budget, ``delivery.max_retry_seconds``."""
        return cls(config.max_retry_seconds)


@dataclass
class DeliveryReport:
    """What one :func:`deliver` call did."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    batches: int = 0
    resumed_done: int = 0
    requests: int = 0
    in_doubt: int = 0
    dead_letters: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.failed == 0


def is_message() -> pl.Expr:
    """A record that is a message: at least one trigger, not in the control group."""
    return (pl.col("triggers").list.len() > 0) & ~pl.col("control").fill_null(False)


def apply_frequency_cap(
    records: pl.DataFrame,
    sendable: pl.Series,
    prior: Mapping[str, int],
    cap: FrequencyCap | None,
) -> pl.DataFrame:
    """The records with ``capped`` and ``withheld_triggers``; see the module docstring.

    ``sendable`` marks the records that may go to the sink at all (not suppressed);
    ``prior`` is the messages each user already got from the sink within the cap's
    window (:func:`cap_window`; users without any are left out). A capped record
    has its ``triggers`` moved to ``withheld_triggers``; every other record keeps
    them (``withheld_triggers`` empty). A run sends at most one message per user,
    so a user is capped when the messages already in the window reach ``cap.messages``.
    """
    empty = pl.lit([], dtype=pl.List(pl.String))
    if cap is None:
        return records.with_columns(pl.lit(False).alias("capped"), empty.alias("withheld_triggers"))
    counts = records["user_id"].replace_strict(dict(prior), default=0, return_dtype=pl.Int64)
    capped = (records.select(is_message()).to_series() & sendable & (counts >= cap.messages)).alias(
        "capped"
    )
    return records.with_columns(capped).with_columns(
        pl.when("capped").then("triggers").otherwise(empty).alias("withheld_triggers"),
        pl.when("capped").then(empty).otherwise("triggers").alias("triggers"),
    )


def cap_window(cap: FrequencyCap, on: date) -> tuple[date, date]:
    """The first and last day (inclusive) whose messages count toward ``cap`` on day ``on``."""
    return on - timedelta(days=cap.days - 1), on


def delta_changes(
    records: pl.DataFrame, last: Mapping[str, tuple[str, str | None]], *, everyone: bool
) -> tuple[pl.Series, pl.Series]:
    """Each record's previously delivered ``risk_segment`` and whether it is to be sent.

    ``last`` is :meth:`lapse.delivery.ledger.Ledger.delivered` (user -> delta key, segment).
    A record is sent when its ``delta_key`` differs from the one last delivered
    (or none was), or always with ``everyone`` (a full snapshot sink, ``--full``).
    """
    users = records["user_id"]
    previous = users.replace_strict(
        {u: seg for u, (_, seg) in last.items()}, default=None, return_dtype=pl.String
    )
    if everyone:
        return previous, pl.Series([True] * records.height)
    old_keys = users.replace_strict(
        {u: k for u, (k, _) in last.items()}, default=None, return_dtype=pl.String
    )
    return previous, (old_keys != records["delta_key"]).fill_null(True)


def encode(sink: Sink, outbox: pl.DataFrame) -> list[Item | None]:
    """Each outbox row as the sink's item (``None``: the sink skips the record)."""
    return sink.encode_frame(outbox.drop([c for c in INTERNAL_COLUMNS if c in outbox.columns]))


def plan_batches(
    items: list[Item | None], sink: Sink, batch_size: int | None = None
) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` within the sink's count, object and byte limits.

    Skipped rows (``None`` items) ride along in whichever batch covers them and
    are never sent; an item too large for any request gets a batch of its own
    (the destination's 413, or the size check in :func:`deliver`, dead-letters it).
    A record is never split across batches: its objects travel together.
    """
    lim = sink.limits
    max_items = min(lim.max_items, batch_size or lim.max_items)
    byte_cap, object_cap = lim.max_bytes, lim.max_objects
    out: list[tuple[int, int]] = []
    start, count, nbytes, nobjects = 0, 0, lim.envelope_bytes, 0
    for i, item in enumerate(items):
        if item is None:
            continue
        size = json_size(item) + 1 if byte_cap is not None else 0
        objects = sink.objects(item) if object_cap is not None else 0
        full = (
            count >= max_items
            or (byte_cap is not None and nbytes + size > byte_cap)
            or (object_cap is not None and nobjects + objects > object_cap)
        )
        if count and full:
            out.append((start, i))
            start, count, nbytes, nobjects = i, 0, lim.envelope_bytes, 0
        count += 1
        nbytes += size
        nobjects += objects
    if items:
        out.append((start, len(items)))
    return out


class _Throttle:
    def __init__(self, per_second: float | None, sleep: Callable[[float], None]) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self.sleep = sleep
        self.last = float("-inf")

    def wait(self) -> None:
        if self.interval:
            gap = self.last + self.interval - time.monotonic()
            if gap > 0:
                self.sleep(gap)
            self.last = time.monotonic()


def _wait(config: DeliveryConfig) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return float(min(max(after, 0.0), config.max_backoff_seconds))
        backoff = config.backoff_seconds * 2 ** (state.attempt_number - 1)
        return float(min(backoff, config.max_backoff_seconds))

    return wait


def _stop(config: DeliveryConfig, budget: RetryBudget) -> Callable[[RetryCallState], bool]:
    """No more tries: the batch's attempts are used up, or the run's retry budget is."""
    wait = _wait(config)

    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        attempts = config.max_attempts
        if isinstance(exc, ConnectionFailed) and not budget.reached:
            attempts = min(attempts, FIRST_CONTACT_ATTEMPTS)
        if state.attempt_number >= attempts:
            return True
        if wait(state) > budget.seconds:
            budget.spent = True
            return True
        return False

    return stop


def _stopped(exc: ConnectionFailed, tries: int, budget: RetryBudget, score_run_id: str) -> str:
    """The one line that stops a run whose destination cannot be reached."""
    why = (
        "the run's retry budget (delivery.max_retry_seconds) is spent"
        if budget.spent
        else f"tried {tries} time{'s' if tries != 1 else ''}"
    )
    return (
        f"{exc}; {why}. Nothing of this batch was sent or dead-lettered: score run "
        f"{score_run_id} stops here with its unsent batches pending; once the destination "
        f"is reachable, finish it with `lapse score <events> --resume {score_run_id}`"
    )


def deliver(
    outbox: pl.DataFrame,
    sink: Sink,
    ledger: Ledger,
    score_run_id: str,
    config: DeliveryConfig,
    *,
    as_of: datetime,
    dead_letters: Path,
    on_progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    items: list[Item | None] | None = None,
    rows: tuple[int, int] | None = None,
    budget: RetryBudget | None = None,
) -> DeliveryReport:
    """Send the outbox's pending batches to ``sink``; see the module docstring.

    The run must be in the ledger (:meth:`~lapse.delivery.ledger.Ledger.start_run` with the
    ranges of :func:`plan_batches` over :func:`encode` of the same outbox).
    Records that did not get through are written to ``dead_letters`` (NDJSON,
    with their reasons; the file is removed when nothing failed). ``items`` are
    :func:`encode` of the outbox when the caller has them already.

    ``rows=(lo, hi)`` says ``outbox`` is only rows ``lo..hi`` of the run's outbox
    (a caller that goes through a large outbox in chunks, with no batch across
    two chunks): only the batches starting there are sent, and the caller opens
    the sink first and settles the run after the last chunk (:func:`settle`), and
    passes one ``budget`` (:meth:`RetryBudget.of`) to every chunk.

    Raises
    ------
    DeliveryStopped
        Credentials are missing or refused (:class:`~lapse.sinks.base.SinkAuthError`),
        or the destination cannot be reached (:class:`~lapse.exceptions.DestinationUnreachable`);
        the current batch is left pending.
    """
    if items is None:
        items = encode(sink, outbox)
    users = outbox["user_id"].cast(pl.String).to_list()
    keys = outbox["delta_key"].to_list() if "delta_key" in outbox.columns else None
    segments = outbox["risk_segment"].to_list()
    report = DeliveryReport()
    throttle = _Throttle(sink.limits.requests_per_second, sleep)
    name = sink.name
    lo, hi = rows if rows is not None else (0, outbox.height)
    queue = [
        b for b in ledger.batches(score_run_id, name) if b.state != "split" and lo <= b.start < hi
    ]
    report.resumed_done = sum(b.size for b in queue if b.state == "done")
    if on_progress and report.resumed_done:
        on_progress(report.resumed_done)
    pending = [b for b in queue if b.state != "done"][::-1]
    budget = budget if budget is not None else RetryBudget.of(config)
    if rows is None:
        sink.open(score_run_id)
    tries = 0
    doubt = False  # the current batch may have reached the destination already
    doubted: set[int] = set()  # rows whose undeduped objects were in doubt

    def send(batch_id: str, batch: list[Item]) -> Outcome:
        nonlocal tries, doubt
        throttle.wait()
        report.requests += 1
        tries += 1
        if doubt:
            batch, rows = _in_doubt(sink, batch, got)
            if rows - doubted:
                ledger.record_in_doubt(score_run_id, name, [(r, users[r - lo]) for r in rows])
                doubted.update(rows)
        began = time.monotonic()
        try:
            return sink.send(batch_id, batch)
        except RetryableError as exc:
            budget.seconds -= time.monotonic() - began
            doubt = doubt or exc.in_doubt
            raise

    def count_retry(state: RetryCallState) -> None:
        report.retried += 1
        budget.seconds -= state.next_action.sleep if state.next_action else 0.0
        ledger.attempt(score_run_id, name, current.batch_id)

    while pending:
        current = pending.pop()
        tries = 0
        doubt = current.state == "sending"
        got = [i for i in range(current.start, current.stop) if items[i - lo] is not None]
        batch_items = [items[i - lo] for i in got]
        too_big = _oversized(sink, batch_items)
        if too_big is not None and len(got) > 1:
            pending.extend(reversed(ledger.split(score_run_id, name, current, in_doubt=doubt)))
            continue
        try:
            if too_big is not None:
                raise SinkError(too_big)
            if not got:
                outcome_failed: dict[int, str] = {}
            else:
                if not doubt:
                    ledger.mark(score_run_id, name, current.batch_id, "sending")
                fault_point("before_send")
                retrying = Retrying(
                    retry=retry_if_exception_type(RetryableError),
                    stop=_stop(config, budget),
                    wait=_wait(config),
                    sleep=sleep,
                    before_sleep=count_retry,
                    reraise=True,
                )
                outcome_failed = retrying(send, current.batch_id, batch_items).failed
                fault_point("after_send")
        except PayloadTooLarge as exc:
            if len(got) > 1:
                pending.extend(reversed(ledger.split(score_run_id, name, current, in_doubt=doubt)))
                continue
            _fail(ledger, report, score_run_id, name, current, got, users, lo, str(exc))
        except (DeliveryStopped, ConnectionFailed) as exc:
            if not doubt:  # refused or never sent: pending, not in doubt
                ledger.mark(score_run_id, name, current.batch_id, "pending")
            if isinstance(exc, DeliveryStopped):
                raise
            # never sent: stop, resumable, rather than dead-letter
            raise DestinationUnreachable(_stopped(exc, tries, budget, score_run_id)) from None
        except SinkError as exc:  # retries exhausted (RetryableError) or a permanent refusal
            why = str(exc)
            if budget.spent and isinstance(exc, RetryableError):
                why += "; not retried: the run's retry budget (delivery.max_retry_seconds) is spent"
            _fail(ledger, report, score_run_id, name, current, got, users, lo, why)
        else:
            budget.reached = budget.reached or bool(got)
            failures = [(got[k], users[got[k] - lo], why) for k, why in outcome_failed.items()]
            bad = {r for r, _, _ in failures}
            took = [r for r in got if r not in bad]
            ledger.done(
                score_run_id,
                name,
                current,
                failures=failures,
                delivered=[(users[r - lo], keys[r - lo], segments[r - lo]) for r in took]
                if keys is not None and not sink.full_snapshot
                else (),
                as_of=as_of,
            )
            report.sent += len(took)
            report.failed += len(failures)
            for _, _, why in failures:
                report.reasons[why] = report.reasons.get(why, 0) + 1
            report.batches += 1
        # counted once the batch is settled: a split batch's halves count their own
        report.skipped += current.size - len(got)
        if on_progress:
            on_progress(current.size)
    report.in_doubt = len(doubted)
    if rows is not None:
        return report
    report.dead_letters = write_dead_letters(ledger, outbox, score_run_id, name, dead_letters)
    if report.dead_letters is None:
        sink.finish(score_run_id)
    return report


def _in_doubt(sink: Sink, batch: list[Item], rows: list[int]) -> tuple[list[Item], set[int]]:
    """What to send of a batch in doubt (the sink's ``in_doubt`` policy for the objects it
    cannot dedupe), and the ``rows`` of the records that hold such objects."""
    if sink.in_doubt is None:
        return batch, set()
    undeduped = [sink.undeduped(item) for item in batch]
    doubted = {r for r, flag in zip(rows, undeduped, strict=True) if flag}
    if sink.in_doubt == "resend":
        return batch, doubted
    sent = [sink.deduped_part(i) if u else i for i, u in zip(batch, undeduped, strict=True)]
    return sent, doubted


def _oversized(sink: Sink, items: list[Item]) -> str | None:
    """Why this batch cannot be sent as one request, or ``None`` when it fits."""
    lim = sink.limits
    if lim.max_item_bytes is not None:
        for item in items:
            size = json_size(item)
            if size > lim.max_item_bytes:
                return (
                    f"record is {size} bytes, over {sink.name}'s limit of "
                    f"{lim.max_item_bytes} bytes per record"
                )
    if lim.max_objects is not None:
        counts = [sink.objects(item) for item in items]
        alone = max(counts, default=0)
        if alone > lim.max_objects:
            return (
                f"record makes {alone} {sink.name} objects (its profile and events travel "
                f"together), over the limit of {lim.max_objects} per request"
            )
        if len(items) > 1 and sum(counts) > lim.max_objects:
            return (
                f"batch makes {sum(counts)} objects, over {sink.name}'s limit of "
                f"{lim.max_objects} per request"
            )
    if lim.max_bytes is not None and len(items) > 1:
        total = lim.envelope_bytes + sum(json_size(i) + 1 for i in items)
        if total > lim.max_bytes:
            return f"batch is {total} bytes, over {sink.name}'s limit of {lim.max_bytes}"
    return None


def _fail(
    ledger: Ledger,
    report: DeliveryReport,
    score_run_id: str,
    sink: str,
    batch: Batch,
    rows: list[int],
    users: list[str],
    offset: int,
    reason: str,
) -> None:
    ledger.failed(score_run_id, sink, batch, reason, [(r, users[r - offset]) for r in rows])
    report.failed += len(rows)
    report.reasons[reason] = report.reasons.get(reason, 0) + len(rows)


def write_dead_letters(
    ledger: Ledger,
    outbox: pl.DataFrame | Iterable[pl.DataFrame],
    score_run_id: str,
    sink: str,
    path: Path,
) -> Path | None:
    """Write every record of the run that did not get through (NDJSON with reasons).

    ``outbox`` is the run's whole outbox, or its consecutive chunks in order.
    """
    failures = ledger.failures(score_run_id, sink)
    if not failures:
        path.unlink(missing_ok=True)
        return None
    by_row = sorted(failures)
    chunks = [outbox] if isinstance(outbox, pl.DataFrame) else outbox
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        offset, k = 0, 0
        for chunk in chunks:
            records = chunk.drop([c for c in INTERNAL_COLUMNS if c in chunk.columns])
            end = offset + chunk.height
            while k < len(by_row) and by_row[k][0] < end:
                row, _user, batch_id, reason = by_row[k]
                line: dict[str, Any] = {
                    "score_run_id": score_run_id,
                    "sink": sink,
                    "batch_id": batch_id,
                    "reason": reason,
                    "record": records.row(row - offset, named=True),
                }
                fh.write(json.dumps(line, default=json_default, ensure_ascii=False) + "\n")
                k += 1
            offset = end
    return path


def settle(
    ledger: Ledger,
    chunks: Iterable[pl.DataFrame],
    sink: Sink,
    score_run_id: str,
    dead_letters: Path,
) -> Path | None:
    """After the last chunk of a chunked :func:`deliver`: dead letters, else ``sink.finish``."""
    written = write_dead_letters(ledger, chunks, score_run_id, sink.name, dead_letters)
    if written is None:
        sink.finish(score_run_id)
    return written
