"""Benchmark: the nightly `lapse score` on 1M users (the goal: 60 s and 4 GB).

One run scores every eligible user of a synthetic event log as of the day
after it: read + validate, features, churn (calibrated), survival (open
consumable episodes), rules, segments, reasons for the users sent with
something to say, audit snapshot, file sink.

The issue's workload explains about 10% of the users. Reasons go to every
user sent with a non-low segment or a fired trigger, so the bundle's segments
are quantiles of its training scores (``high``: the top 5%, ``medium``: the
next 5%) and the run sends the built-in triggers, which fire for most
synthetic users, to those segments only (``audience: [high, medium]``), as a
shop would. The triggers are still evaluated for every user; the benchmark
prints the share explained. A small bundle is trained once
on a sample of users (not timed) and cached with the data under
``benchmarks/.data/``. The score runs in its own subprocess; the benchmark
prints its wall time per step, its compute time (the run itself) with the CPU
time of the process (all threads: read it when the machine is shared), the
whole process's wall time, its peak memory (max RSS, and per step, sampled every
10 ms) and the ratios to the goal.

Usage::

    python benchmarks/score.py                    # 1M users x 60 days
    python benchmarks/score.py --users 100000     # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
START = date(2026, 1, 1)
GOAL_SECONDS = 60.0
GOAL_BYTES = 4 * 2**30


def prepare(users: int, days: int, train_users: int) -> tuple[Path, Path, datetime]:
    """Events for ``users`` (cached) and a bundle trained on ``train_users`` users x 150 days."""
    from lapse.config import SegmentsConfig, load_config
    from lapse.datasets import generate, write
    from lapse.train.churn import train

    folder = DATA / f"score_{users}x{days}"
    events = folder / "events.parquet"
    if not events.exists():
        t = time.perf_counter()
        write(generate(n_users=users, n_days=days, seed=1, start=START), folder)
        print(f"generated {users:,} users x {days} days in {time.perf_counter() - t:.0f} s")
    model_dir = DATA / f"score_model_{train_users}_top10"
    bundle = model_dir / "models" / "lapse.pkl"
    if not bundle.exists():
        t = time.perf_counter()
        write(generate(n_users=train_users, n_days=150, seed=2, start=START), model_dir)
        config = load_config()
        config.labels.train_cutoffs = 4
        config.segments = SegmentsConfig(method="quantile", high=0.95, medium=0.90)
        train(
            model_dir / "events.parquet",
            config,
            out_dir=model_dir / "report",
            models_dir=model_dir / "models",
        )
        print(f"trained the bundle on {train_users:,} users in {time.perf_counter() - t:.0f} s")
    as_of = datetime(START.year, START.month, START.day, tzinfo=UTC) + timedelta(days=days)
    return events, bundle, as_of


class RssSampler:
    """The process's resident memory, sampled every 10 ms on a thread: :meth:`take`
    returns the peak since the last call (a step's peak)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.read()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()

    def read(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.read())
            time.sleep(0.01)

    def take(self) -> int:
        peak, self.peak = max(self.peak, self.read()), self.read()
        return peak


def child(events: str, bundle: str, as_of: str, out: str) -> None:
    """The timed side: one `run_score` with the file sink, step times on stdout as JSON."""
    # the run's audit trail and ledger in the benchmark's own folder (load_config reads it)
    os.environ["LAPSE_HOME"] = str(Path(out).parent)
    from lapse.cli import lean_lightgbm

    lean_lightgbm()  # the `lapse` command's process: LightGBM without scikit-learn and pandas
    from lapse.config import TriggerSpec, load_config
    from lapse.score.run import run_score
    from lapse.triggers import BUILTIN

    config = load_config()
    config.triggers = {name: TriggerSpec(audience=["high", "medium"]) for name in BUILTIN}
    steps: dict[str, float] = {}
    peaks: dict[str, int] = {}
    last = [time.perf_counter(), "start"]
    rss = RssSampler()

    class Timer:
        def begin(self, header: object) -> None:
            pass

        def stage(self, name: str) -> None:
            now = time.perf_counter()
            steps[str(last[1])] = now - float(last[0])
            peaks[str(last[1])] = rss.take()
            last[:] = [now, name]

        def delivering(self, total: int) -> None:
            self.stage("delivering records")

        def advance(self, n: int) -> None:
            pass

    t0 = time.perf_counter()
    result = run_score(
        Path(events),
        config,
        as_of=datetime.fromisoformat(as_of),
        model=bundle,
        out=Path(out),
        progress=Timer(),
    )
    Timer().stage("end")
    steps.pop("start", None)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "steps": steps,
                "peaks": peaks,
                "counts": result.counts,
                "reasons_share": None,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--train-users", type=int, default=20_000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    events, bundle, as_of = prepare(args.users, args.days, args.train_users)
    out = DATA / "score_run" / "scores.parquet"
    # a fresh trail each run: an earlier run's cooldowns would change who is sent what
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(events),
            str(bundle),
            as_of.isoformat(),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"score failed:\n{proc.stderr[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    import polars as pl

    scores = pl.read_parquet(out)
    explained = float((scores["reasons"].list.len() > 0).mean() or 0.0)
    print(
        f"lapse score: {args.users:,} users x {args.days} days, {report['counts']['scored']:,} scored, "
        f"{report['counts']['sent']:,} written, reasons for {explained:.1%}"
    )
    for name, seconds in report["steps"].items():
        print(f"  {name:<32} {seconds:7.1f} s  peak RSS {report['peaks'][name] / 2**30:5.2f} GB")
    print(
        f"compute time {report['seconds']:.1f} s (process {wall:.1f} s, CPU {cpu:.1f} s), "
        f"{report['seconds'] / GOAL_SECONDS:.2f} x the {GOAL_SECONDS:.0f} s goal"
    )
    print(
        f"peak memory  {peak / 2**30:.2f} GB, "
        f"{peak / GOAL_BYTES:.2f} x the {GOAL_BYTES / 2**30:.0f} GB goal"
    )


if __name__ == "__main__":
    main()
