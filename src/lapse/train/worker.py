"""The replenishment race in a child process, beside the churn race (``lapse train``).

The two races share nothing but the events, and almost all of both is
single-threaded Python (lifelines' fits) or short native calls, so on two
cores they overlap best as two processes. :func:`start` launches a fresh
interpreter (``python -m lapse.train.worker``: no fork of a process holding
Polars' threads, no ``if __name__ == "__main__"`` guard needed in a script or
notebook) which imports lifelines, SciPy and matplotlib while the parent reads
the events; :meth:`ReplenishmentWorker.send` hands it the validated events
(an Arrow IPC file), the identity links and the arguments of
:func:`~lapse.train.replenishment.run_replenishment`, and
:meth:`ReplenishmentWorker.result` returns what that call returned, or raises
what it raised (a :class:`~lapse.exceptions.LapseError` as it was, its message
unchanged). Warnings the stage raised are raised again in the parent, where
its own filters apply. The child writes its PNGs into the report folder itself.

When its race is done before the parent's churn side reaches its figures (the
demo's case), the child is idle and draws those too
(:meth:`ReplenishmentWorker.draw`): the parent goes on to its refit and the
MLflow store meanwhile. Otherwise, or when the child is gone, the parent draws
them itself; the figures and PNGs are the same either way.

The child exits when the parent closes its stdin (:meth:`ReplenishmentWorker.close`,
or the parent dying), so it never outlives the training run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from queue import SimpleQueue
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse._process import tune_gc
from lapse.config import LapseConfig
from lapse.exceptions import LapseError
from lapse.files import write_failure
from lapse.modeling.plots import churn_figures, save_figures
from lapse.parallel import cores
from lapse.train.replenishment import ReplenishmentResult, run_replenishment

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ChurnFigures", "Race", "ReplenishmentWorker", "start"]

_INPUT = "input.pkl"
_OUTPUT = "output.pkl"
_FIGURES_INPUT = "figures.pkl"
_FIGURES_OUTPUT = "figures-output.pkl"
_DRAW, _DONE = b"draw\n", b"done\n"  # the one line the parent sends after "go"
_EVENTS = "events.arrow"
_LINKS = "links.arrow"
# what run_replenishment imports on first use: loaded while the parent reads the events
_PRELOAD = ("lifelines", "scipy.special", "matplotlib.figure", "matplotlib.backends.backend_agg")


@dataclass(frozen=True)
class Race:
    """The arguments of one :func:`~lapse.train.replenishment.run_replenishment` call, in
    this process (:meth:`run`) or in the child (:meth:`ReplenishmentWorker.send`)."""

    events: pl.LazyFrame
    config: LapseConfig
    data_end: datetime
    out_dir: Path
    truth_dir: Path | None
    links: pl.DataFrame

    def run(self) -> ReplenishmentResult:
        return run_replenishment(
            self.events,
            self.config,
            data_end=self.data_end,
            out_dir=self.out_dir,
            truth_dir=self.truth_dir,
            links=self.links,
        )

    def rest(self) -> dict[str, Any]:
        """The arguments but the two frames (the child gets those as Arrow IPC files)."""
        return {
            "config": self.config,
            "data_end": self.data_end,
            "out_dir": self.out_dir,
            "truth_dir": self.truth_dir,
        }


@dataclass(frozen=True)
class ChurnFigures:
    """The churn race's figures (:func:`~lapse.modeling.plots.churn_figures` of these
    arguments) and their PNGs in ``out_dir``: drawn by :meth:`draw`, here or in the child."""

    y: npt.NDArray[np.float64]
    probas: dict[str, npt.NDArray[np.float64]]
    importance: pl.DataFrame
    title: str
    out_dir: Path

    def draw(self) -> tuple[dict[str, Figure], dict[str, Path]]:
        """The figures by name, and the PNGs written (by name)."""
        figures = churn_figures(self.y, self.probas, self.importance, title=self.title)
        return figures, save_figures(figures, self.out_dir)


@dataclass
class ReplenishmentWorker:
    """A running child process for one replenishment race (see the module docstring)."""

    proc: subprocess.Popen[bytes]
    folder: Path
    stderr: IO[bytes]

    def send(self, race: Race) -> None:
        """Start the race on these arguments."""
        race.out_dir.mkdir(parents=True, exist_ok=True)  # the child writes its PNGs there
        try:
            race.events.collect().write_ipc(self.folder / _EVENTS, compression="uncompressed")
            race.links.write_ipc(self.folder / _LINKS, compression="uncompressed")
            (self.folder / _INPUT).write_bytes(pickle.dumps(race.rest()))
        except Exception as exc:  # a full or read-only temporary folder: one line naming it
            failure = write_failure(self.folder, exc)
            if failure is None:
                raise
            raise failure from exc
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
        except OSError:  # the child is gone: result() says how it ended
            pass

    def draw(self, job: ChurnFigures) -> bool:
        """Hand ``job`` to the child if its race is done (it is idle, and so is a core);
        ``False`` when it is not (draw the job here; the child then exits after its race).
        Call it once, after :meth:`send`."""
        idle = (self.folder / _OUTPUT).exists() and self.proc.poll() is None
        try:
            if idle:
                (self.folder / _FIGURES_INPUT).write_bytes(pickle.dumps(job))
            self._say(_DRAW if idle else _DONE)
        except OSError:  # a full temporary folder, or the child gone: draw here
            return False
        return idle

    def drawn(self, job: ChurnFigures) -> tuple[dict[str, Figure], dict[str, Path]]:
        """What ``job``, handed over by :meth:`draw`, gave in the child; drawn here when
        the child is gone. Raises what drawing raised."""
        out = self._wait_for(_FIGURES_OUTPUT)
        if out is None:
            return job.draw()
        figures, plots = self._returned(out)
        return figures, plots

    def result(self) -> ReplenishmentResult:
        """What :func:`run_replenishment` returned in the child; raises what it raised."""
        out = self._wait_for(_OUTPUT)
        if out is None:
            code = self.proc.wait()
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
            raise LapseError(
                f"the replenishment race's process (pid {self.proc.pid}) exited with code {code} "
                f"before finishing{': ' + lines[-1] if lines else ''}; run the training again"
            )
        value = self._returned(out)
        assert isinstance(value, ReplenishmentResult)
        return value

    def _say(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def _wait_for(self, name: str) -> Path | None:
        """The child's output file ``name`` once written (atomically), or ``None`` when the
        child exited without it."""
        path = self.folder / name
        while not path.exists():
            if self.proc.poll() is not None:
                return path if path.exists() else None
            time.sleep(0.01)
        return path

    @staticmethod
    def _returned(out: Path) -> Any:
        """The value the child's job returned; its warnings raised again here, under this
        process's filters; raises what the job raised."""
        status, value, caught = pickle.loads(out.read_bytes())
        for message, category, filename, lineno, module in caught:
            owner = sys.modules.get(module or "")
            registry = None if owner is None else vars(owner).setdefault("__warningregistry__", {})
            warnings.warn_explicit(message, category, filename, lineno, module, registry)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the child if it still runs; remove its folder."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):  # the child already gone
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _site_dirs() -> set[Path]:
    """This interpreter's site-packages folders (an installed lapse is found there anyway;
    put first on the path, one could shadow the standard library)."""
    found = [*site.getsitepackages(), site.getusersitepackages()]
    return {Path(p).resolve() for p in found}


def start() -> ReplenishmentWorker | None:
    """A child process ready for one race; ``None`` on a single core (it would only take
    turns with the parent) or when this interpreter cannot start another (then the race
    runs in this process)."""
    if cores() < 2 or not sys.executable:
        return None
    folder = Path(tempfile.mkdtemp(prefix="lapse-replenishment-"))
    env = dict(os.environ)
    here = Path(__file__).resolve().parents[2]  # the lapse this process runs
    if here not in _site_dirs():  # a source tree (PYTHONPATH, sys.path): first for the child
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), env.get("PYTHONPATH")) if p)
    # the CLI's default: lifelines' small linear algebra only spins a second BLAS thread
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's, closed by close()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lapse.train.worker", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    except OSError:
        stderr.close()
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return ReplenishmentWorker(proc, folder, stderr)


# -- the child ----------------------------------------------------------------------------


def _module_of(filename: str) -> str | None:
    """The name of the loaded module whose file is ``filename`` (a filter's ``module``)."""
    for name, mod in list(sys.modules.items()):
        if getattr(mod, "__file__", None) == filename:
            return name
    return None


def _race(folder: Path) -> ReplenishmentResult:
    events = pl.read_ipc(folder / _EVENTS).lazy()
    links = pl.read_ipc(folder / _LINKS)
    race = Race(events=events, links=links, **pickle.loads((folder / _INPUT).read_bytes()))
    return race.run()


def _run(job: Callable[[], Any]) -> tuple[str, Any, list[tuple[Any, ...]]]:
    """``job()``'s outcome for the parent: its value or error, and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the parent's filters decide
        try:
            outcome: tuple[str, Any] = ("ok", job())
        except Exception as exc:  # handed to the parent as it was
            if not isinstance(exc, LapseError):  # a bug: keep where it happened
                exc.add_note(f"in the replenishment race's process:\n{traceback.format_exc()}")
            outcome = ("error", exc)
    seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for w in caught:
        key = (str(w.message), w.category, w.filename, w.lineno)
        seen.setdefault(key, (w.message, w.category, w.filename, w.lineno, _module_of(w.filename)))
    return outcome[0], outcome[1], list(seen.values())


def _output(outcome: tuple[str, Any, list[tuple[Any, ...]]]) -> bytes:
    """The pickled outcome; an exception that does not pickle becomes a LapseError saying it."""
    try:
        data = pickle.dumps(outcome)
        if outcome[0] == "error":  # an exception whose class pickle cannot rebuild
            pickle.loads(data)
        return data
    except Exception:
        status, value, caught = outcome
        return pickle.dumps((status, LapseError(f"{type(value).__name__}: {value}"), caught))


def _line() -> bytes:
    """One line from stdin, read unbuffered (no lock for a daemon thread to hold at exit)."""
    data = b""
    while not data.endswith(b"\n") and (chunk := os.read(0, 1)):
        data += chunk
    return data


def _watch_parent(lines: SimpleQueue[bytes]) -> None:
    """Pass on the parent's lines; exit as soon as it closes our stdin (it finished, failed
    or died)."""
    while line := _line():
        lines.put(line)
    os._exit(1)


def _write(folder: Path, name: str, outcome: tuple[str, Any, list[tuple[Any, ...]]]) -> None:
    """The outcome for the parent, written atomically (it waits for the file)."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(_output(outcome))
    tmp.replace(folder / name)


def main(argv: list[str]) -> None:
    folder = Path(argv[0])
    tune_gc()  # as in the CLI: few collections over the imported modules, none at exit
    for name in _PRELOAD:
        importlib.import_module(name)
    if _line() != b"go\n":
        return  # the parent gave up before sending anything
    lines: SimpleQueue[bytes] = SimpleQueue()
    threading.Thread(target=_watch_parent, args=(lines,), daemon=True).start()
    _write(folder, _OUTPUT, _run(lambda: _race(folder)))
    if lines.get() == _DRAW:
        job: ChurnFigures = pickle.loads((folder / _FIGURES_INPUT).read_bytes())
        _write(folder, _FIGURES_OUTPUT, _run(job.draw))


if __name__ == "__main__":
    main(sys.argv[1:])
