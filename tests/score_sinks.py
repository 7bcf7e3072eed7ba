"""Sinks the score tests plug in (importable by subprocesses through PYTHONPATH=tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, ClassVar

from lapse.sinks.base import (
    RECORD_COLUMNS,
    Item,
    Limits,
    Outcome,
    Record,
    RetryableError,
    Sink,
    SinkError,
)
from lapse.sinks.file import FileSink

#: Requests the capturing sinks received in this process: (batch_id, items).
RECEIVED: list[tuple[str, list[Item]]] = []


class CaptureSink(Sink):
    """A delta-sync platform stand-in that keeps what it gets."""

    name = "capture"
    limits = Limits(max_items=40)
    attribute_columns = ("email",)

    def encode(self, record: Record) -> Item | None:
        return {k: record[k] for k in (*RECORD_COLUMNS, "previous_risk_segment", "email")}

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        RECEIVED.append((batch_id, items))
        return Outcome()


class FlakySink(CaptureSink):
    """Fails in every way a destination can: per record, per batch, transiently."""

    name = "flaky"
    reject: frozenset[str] = frozenset()  # users rejected one by one
    poison: frozenset[str] = frozenset()  # a batch holding one of them is refused whole
    seen: ClassVar[set[str]] = set()

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        if batch_id not in self.seen:  # every batch fails once with a 503 first
            self.seen.add(batch_id)
            raise RetryableError("503 Service Unavailable", retry_after=0)
        if any(i["user_id"] in self.poison for i in items):
            raise SinkError("400 Bad Request: malformed batch")
        RECEIVED.append((batch_id, items))
        return Outcome(
            failed={
                k: "invalid profile" for k, i in enumerate(items) if i["user_id"] in self.reject
            }
        )


class KillingFileSink(FileSink):
    """The file sink, SIGKILLed right after writing batch number $LAPSE_TEST_KILL_AFTER."""

    sent = 0

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        out = super().send(batch_id, items)
        _log(batch_id)
        KillingFileSink.sent += 1
        if KillingFileSink.sent == int(os.environ["LAPSE_TEST_KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)  # acknowledged but not yet in the ledger
        return out


class LoggingFileSink(FileSink):
    """The file sink, logging each batch id it writes to $LAPSE_TEST_SEND_LOG."""

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        out = super().send(batch_id, items)
        _log(batch_id)
        return out


def _log(batch_id: str) -> None:
    with Path(os.environ["LAPSE_TEST_SEND_LOG"]).open("a") as fh:
        fh.write(batch_id + "\n")


def run_cli(sink_class: str, *args: str) -> Any:
    """Run `lapse` in a subprocess with ``file`` mapped to a sink of this module."""
    import subprocess
    import sys

    code = (
        "import sys; from lapse.sinks import SINKS; "
        f"SINKS['file'] = 'score_sinks:{sink_class}'; "
        "from lapse.cli import app; sys.argv = ['lapse', *sys.argv[1:]]; app()"
    )
    # the tests folder first, then whatever the parent had (a source checkout on PYTHONPATH)
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


class AnonymousCaptureSink(CaptureSink):
    """A capture sink whose platform takes anonymous profiles under ``anonymousId``."""

    name = "anoncapture"
    anonymous_identifier = "anonymousId"

    def encode(self, record: Record) -> Item | None:
        item = super().encode(record)
        if record.get("anonymous"):
            item["anonymousId"] = item.pop("user_id")
        return item
