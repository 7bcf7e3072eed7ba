"""Items worked on in threads, results in order (:mod:`lapse.parallel`)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from lapse.exceptions import LapseError
from lapse.parallel import cores, in_order

AT_ONCE = 2


@pytest.mark.skipif(cores() < AT_ONCE, reason="one core: the items run in turn")
def test_items_run_two_at_a_time_in_order_and_a_failure_is_raised() -> None:
    """``in_order`` returns the work's results in item order, draws an item only when a
    thread is free for it (at most ``at_once`` items held at once, and that many run at
    once) and raises the first failure."""
    held, running, most = [0], [0], [0]
    lock = threading.Lock()

    def items() -> Any:
        for i in range(7):
            with lock:
                assert held[0] < AT_ONCE  # drawn only with a thread free for it
                held[0] += 1
            yield i

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.01 * (7 - i))  # the first items finish last
        with lock:
            running[0] -= 1
            held[0] -= 1
        return i * i

    assert in_order(work, items(), AT_ONCE) == [i * i for i in range(7)]
    assert most[0] == AT_ONCE

    def failing(i: int) -> int:
        if i == 3:
            raise LapseError("shard 3")
        return i

    with pytest.raises(LapseError, match="shard 3"):
        in_order(failing, iter(range(7)), AT_ONCE)


def test_one_at_once_runs_the_items_in_this_thread() -> None:
    """One at once (or one core): the items run in turn, in the caller's thread."""
    here = threading.get_ident()
    assert in_order(lambda i: (i, threading.get_ident() == here), range(3), 1) == [
        (0, True),
        (1, True),
        (2, True),
    ]
