"""Benchmark: `lapse train --register` on a real order log and `lapse demo`, as a user runs them.

Each job is the real CLI in its own subprocess (interpreter start and imports
included) with a fresh output folder:

* **train**: ``lapse train EVENTS --config configs/online_retail.yaml --until
  2011-09-09`` with ``--register`` into a SQLite MLflow store. By default the
  store already exists (created untimed first, as for someone retraining);
  ``--fresh-store`` times its creation too (MLflow's schema migrations, about
  3 s of MLflow's own).
* **demo**: ``lapse demo`` (2,000 users x 180 days: generate, validate,
  features, train, register in a new store, score).

For each the benchmark prints the wall time, the CPU time (user + system, from
``os.wait4`` on the CLI's process: its own and that of the child processes it
waited for, such as the replenishment race's) and the peak memory: the sum of
each process's own peak RSS (``VmHWM``, sampled every 20 ms over the CLI's
process tree; at least the CLI's own max RSS), with, when there are several, each
process's peak and the largest sum of their RSS at one instant, and wall and
memory as a ratio of the goal (10 s and 1 GB). On a shared machine the wall time
grows with the load while the CPU time barely moves: compare CPU times across
runs, and wall times only on an idle machine.

``--pss`` adds the largest sum of their PSS at one instant (pages they share
counted once), read from ``/proc/PID/smaps_rollup``; that walks each process's
page tables under its memory lock every 20 ms and stalls the job's own page
faults: the demo took 1.5 s longer (11.6 s against 10.1 s, CPU unchanged). The
wall time of such a run is not the job's.

Usage::

    python benchmarks/train.py --events ../shared/data/online_retail.parquet
    python benchmarks/train.py --events FILE --repeat 3 --jobs train
    python benchmarks/train.py --jobs demo --pss     # memory shared between the processes
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL_SECONDS = 10.0
GOAL_BYTES = 2**30
CLI = "from lapse.cli import main; main()"  # the `lapse` console script


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``; just ``pid`` elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _status(pid: int, pss: bool) -> dict[str, int]:
    """A process's ``VmHWM`` (its own peak RSS so far), ``VmRSS`` and, with ``pss``, its
    ``Pss``, in bytes."""
    try:
        rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    found = {
        key: int(row.split()[1]) * 1024
        for row in rows
        for key in ("VmHWM", "VmRSS")
        if row.startswith(f"{key}:")
    }
    if "VmHWM" not in found:  # a zombie: exited, not yet reaped
        return {}
    if not pss:
        return found
    try:  # the proportional share: pages shared with the other process count half
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        found["Pss"] = next(int(r.split()[1]) * 1024 for r in rollup if r.startswith("Pss:"))
    except (OSError, StopIteration):
        found["Pss"] = found.get("VmRSS", 0)
    return found


class Memory:
    """Each process's own peak RSS under a root process, and the largest sums of their RSS
    and, with ``pss``, of their PSS (shared pages split between them) at one sampling
    instant (every 20 ms)."""

    def __init__(self, root: int, pss: bool) -> None:
        self.root = root
        self.with_pss = pss
        self.peaks: dict[int, int] = {}
        self.together = 0
        self.pss = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            now = pss = 0
            for pid in _descendants(self.root):
                st = _status(pid, self.with_pss)
                if st:
                    self.peaks[pid] = max(st["VmHWM"], self.peaks.get(pid, 0))
                    now += st["VmRSS"]
                    pss += st.get("Pss", 0)
            self.together = max(self.together, now)
            self.pss = max(self.pss, pss)
            self.done.wait(0.02)

    def stop(self, root_maxrss: int) -> tuple[list[int], int, int]:
        """Each process's peak (the root first), and the peaks of the sums of RSS and PSS."""
        self.done.set()
        self.thread.join()
        self.peaks[self.root] = max(self.peaks.get(self.root, 0), root_maxrss)
        others = [v for p, v in sorted(self.peaks.items()) if p != self.root]
        return [self.peaks[self.root], *others], self.together, self.pss


def run(
    args: list[str], env: dict[str, str], cwd: Path, pss: bool
) -> tuple[float, float, list[int], int, int]:
    """``(wall s, CPU s, each process's peak bytes, peak bytes of their RSS and PSS sums)``
    of one CLI child; exits on failure."""
    start = time.perf_counter()
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, *args], env=env, cwd=cwd, stdout=out, stderr=err
        )
        memory = Memory(proc.pid, pss)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    peaks, together, shared = memory.stop(usage.ru_maxrss * 1024)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (cwd / "stderr.txt").read_text()[-3000:] or (cwd / "stdout.txt").read_text()[-3000:]
        sys.exit(f"`lapse {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, peaks, together, shared


def _env(home: Path) -> dict[str, str]:
    """The children's environment: the lapse this interpreter imports (a relative
    ``PYTHONPATH=src`` would not survive the children's own working folder)."""
    spec = importlib.util.find_spec("lapse")
    assert spec is not None and spec.origin is not None, "lapse is not importable"
    src = str(Path(spec.origin).resolve().parent.parent)
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "LAPSE_HOME": str(home), "COLUMNS": "120", "PYTHONPATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_job(
    work: Path, events: Path, config: Path, until: str, fresh_store: bool, pss: bool
) -> tuple[float, float, list[int], int, int]:
    env = _env(work) | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    if not fresh_store:  # the store a retraining user already has (created untimed)
        subprocess.run(
            [sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1])"
             ".search_experiments()", env["MLFLOW_TRACKING_URI"]],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
    args = ["train", str(events), "--config", str(config), "--until", until]
    args += ["--out", str(work / "report"), "--models-dir", str(work / "models"), "--register"]
    return run(args, env, work, pss)


def demo_job(work: Path, pss: bool) -> tuple[float, float, list[int], int, int]:
    return run(["demo", "--out", str(work / "demo")], _env(work), work, pss)


def line(name: str, wall: float, cpu: float, peaks: list[int], together: int, pss: int) -> str:
    peak = sum(peaks)
    parts = " + ".join(f"{p / 2**30:.2f}" for p in peaks)
    gb = 2**30
    return (
        f"{name:<19} wall {wall:5.1f} s ({wall / GOAL_SECONDS:.2f} x the {GOAL_SECONDS:.0f} s goal)  "
        f"CPU {cpu:5.1f} s  peak {peak / gb:.2f} GB ({peak / GOAL_BYTES:.2f} x 1 GB"
        + (
            f"; {parts} GB; at one instant RSS {together / gb:.2f} GB"
            + (f", PSS {pss / gb:.2f} GB)" if pss else ")")
            if len(peaks) > 1
            else ")"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=Path, help="Online Retail (needed for the train job)")
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs/online_retail.yaml")
    parser.add_argument("--until", default="2011-09-09")
    parser.add_argument("--jobs", nargs="+", choices=("train", "demo"), default=["train", "demo"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--fresh-store", action="store_true", help="time creating the store too")
    parser.add_argument("--pss", action="store_true", help="also PSS (slows the run: see above)")
    args = parser.parse_args()
    if "train" in args.jobs and args.events is None:
        parser.error("--events is needed for the train job")
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.1f} at the start")
    for _ in range(args.repeat):
        for job in args.jobs:
            with tempfile.TemporaryDirectory(prefix=f"lapse-bench-{job}-") as tmp:
                if job == "train":
                    fig = train_job(
                        Path(tmp), args.events, args.config, args.until, args.fresh_store, args.pss
                    )
                    name = "train" + (" (fresh store)" if args.fresh_store else "")
                else:
                    fig = demo_job(Path(tmp), args.pss)
                    name = "demo"
            print(line(name, *fig), flush=True)


if __name__ == "__main__":
    main()
