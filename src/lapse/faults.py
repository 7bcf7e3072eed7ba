"""Fault injection for crash tests: the one place lapse reads ``LAPSE_FAULT``.

``LAPSE_FAULT=STAGE`` kills the process (SIGKILL) when it reaches the fault point
``STAGE``; ``STAGE@N`` at the N-th time it gets there (a batch, say); a suffix
``:TERM`` or ``:INT`` sends that signal instead. Unset (always, outside tests), a
fault point does nothing. The stages, in the order a run reaches them:

``lapse score`` and ``lapse triggers run``
    ``run_recorded`` (the run is in the ledger, nothing written), ``after_snapshot``
    (the audit snapshot and summary are written, the outbox not), ``after_outbox``
    (the outbox is written, the batches not planned), ``before_delivery`` (planned,
    nothing sent), ``before_send`` (a batch is marked ``sending``, its request not yet
    made), ``after_send`` (the destination acknowledged a batch, the ledger does not
    know yet), ``after_delivery`` (every batch acknowledged, the run not yet finished);
    ``before_watermark`` (``triggers run``: delivered, the watermark not advanced).
``lapse train``
    ``train_logging`` (inside the MLflow run), ``after_register`` (a model version
    registered, its aliases not yet set).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["ENV", "fault_point"]

#: The environment variable naming the fault point to trip.
ENV = "LAPSE_FAULT"

_reached: Counter[str] = Counter()


def fault_point(stage: str) -> None:
    """Kill this process here when ``LAPSE_FAULT`` names ``stage`` (see the module docstring)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    spec, _, name = wanted.partition(":")
    point, _, nth = spec.partition("@")
    if point != stage:
        return
    _reached[stage] += 1
    if _reached[stage] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
