"""Items worked on in threads, their results in item order (two cores from one process).

Polars, NumPy and LightGBM release the GIL in their own work, so a second thread keeps
the second core busy while one item is in its single-threaded parts (Python between
queries, a one-thread LightGBM prediction). Items are drawn one at a time as a thread
frees up, so no more than ``at_once`` are held in memory at once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

__all__ = ["cores", "in_order"]

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def in_order(work: Callable[[T], R], items: Iterable[T], at_once: int) -> list[R]:
    """``[work(item) for item in items]``, up to ``at_once`` (and the cores) running at
    once in threads; an item is drawn only when a thread is free for it. The first failure
    is raised, in item order (once the running items are done)."""
    at_once = min(at_once, cores())
    if at_once <= 1:
        return [work(item) for item in items]
    out: list[R] = []
    todo = iter(items)
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        running = deque(pool.submit(work, item) for item in islice(todo, at_once))
        while running:
            out.append(running.popleft().result())
            running.extend(pool.submit(work, item) for item in islice(todo, 1))
    return out
