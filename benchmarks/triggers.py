"""Benchmark: a full trigger evaluation vs an incremental run with 10k new events on top.

A synthetic event log (``--users`` x ``--days``, about 56 events per user over
60 days) is the history of an append-only folder; the next day's first
``--new`` events are a new file in it. Two runs score and evaluate the triggers
as of just after the last new event and deliver to the file sink:

* **full**: ``lapse triggers run`` (everyone, and the state rebuilt);
* **incremental**: ``lapse triggers run --incremental`` on a copy of the state a
  full run left at midnight (prepared once, not timed): only the users with new
  events, plus anyone due, are read, scored, evaluated and looked ahead.

Each side runs in its own subprocess; the benchmark prints its compute time (the
run itself, loading the model included), the CPU time of the process (all threads:
read it when the machine is shared), its peak memory (max RSS), the incremental
side's ratio to the goal (5 s) and the ratios between the sides. ``--no-full``
leaves the full side out (the midnight state is still prepared). A small bundle
is trained once on other synthetic users (not timed) and cached with the data
under ``benchmarks/.data/``.

Usage::

    python benchmarks/triggers.py                       # 210k users: about 10M events
    python benchmarks/triggers.py --users 20000         # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
START = date(2026, 1, 1)
GOAL_SECONDS = 5.0


def prepare(users: int, days: int, new: int, train_users: int) -> tuple[Path, Path, datetime]:
    """The folder (history + one new file), the bundle, and the run's as_of (all cached)."""
    import polars as pl

    from lapse.config import load_config
    from lapse.datasets import generate, write
    from lapse.train.churn import train

    root = DATA / f"triggers_{users}x{days}_{new}"
    folder = root / "events"
    midnight = datetime(START.year, START.month, START.day, tzinfo=UTC) + timedelta(days=days)
    if not (folder / "new.parquet").exists():
        t = time.perf_counter()
        write(generate(n_users=users, n_days=days + 1, seed=1, start=START), root / "raw")
        events = pl.scan_parquet(root / "raw" / "events.parquet")
        folder.mkdir(parents=True, exist_ok=True)
        events.filter(pl.col("ts") < midnight).sink_parquet(folder / "history.parquet")
        fresh = events.filter(pl.col("ts") >= midnight).sort("ts").head(new).collect()
        fresh.write_parquet(root / "new.parquet")
        (root / "new.parquet").rename(folder / "new.parquet")
        print(
            f"generated {users:,} users x {days} days + {fresh.height:,} new events "
            f"in {time.perf_counter() - t:.0f} s"
        )
    model_dir = DATA / f"triggers_model_{train_users}"
    bundle = model_dir / "models" / "lapse.pkl"
    if not bundle.exists():
        t = time.perf_counter()
        write(generate(n_users=train_users, n_days=150, seed=2, start=START), model_dir)
        config = load_config()
        config.labels.train_cutoffs = 4
        train(
            model_dir / "events.parquet",
            config,
            out_dir=model_dir / "report",
            models_dir=model_dir / "models",
        )
        print(f"trained the bundle on {train_users:,} users in {time.perf_counter() - t:.0f} s")
    last = pl.scan_parquet(folder / "new.parquet").select(pl.col("ts").max()).collect().item()
    as_of = (last + timedelta(minutes=1)).replace(second=0, microsecond=0)
    return folder, bundle, as_of


def child(mode: str, folder: str, bundle: str, as_of: str, home: str) -> None:
    """One timed `run_triggers` in LAPSE_HOME ``home``; a JSON line on stdout."""
    os.environ["LAPSE_HOME"] = home
    from lapse.cli import lean_lightgbm

    lean_lightgbm()  # the `lapse` command's process: LightGBM without scikit-learn and pandas
    from lapse.config import load_config
    from lapse.score.trigger_run import run_triggers

    t0 = time.perf_counter()
    result = run_triggers(
        Path(folder),
        load_config(),
        as_of=datetime.fromisoformat(as_of),
        incremental=mode != "full",
        model=bundle,
        out=Path(home) / "triggers.parquet",
    )
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
    counts = result.delivery.counts if result.delivery is not None else {}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "peak": peak,
                "mode": result.mode,
                "touched": result.touched,
                "new_event_users": result.new_event_users,
                "due_users": result.due_users,
                "fired": result.fired,
                "sent": counts.get("sent", 0),
            }
        )
    )


def _run(*args: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{args[0]} run failed:\n{proc.stderr[-3000:]}")
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=210_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--new", type=int, default=10_000, help="new events in the new file")
    parser.add_argument("--train-users", type=int, default=20_000)
    parser.add_argument("--no-full", action="store_true", help="time the incremental side only")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    folder, bundle, as_of = prepare(args.users, args.days, args.new, args.train_users)
    import polars as pl

    history = pl.scan_parquet(folder / "history.parquet").select(pl.len()).collect().item()
    runs = DATA / "triggers_runs"
    shutil.rmtree(runs, ignore_errors=True)
    # the state a full run left at midnight, before the new file arrived (not timed)
    base = runs / "base"
    base.mkdir(parents=True)
    staged = runs / "staged"
    staged.mkdir()
    (folder / "new.parquet").rename(staged / "new.parquet")
    try:
        midnight = as_of.replace(hour=0, minute=0)
        _run("full", str(folder), str(bundle), midnight.isoformat(), str(base))
    finally:
        (staged / "new.parquet").rename(folder / "new.parquet")
    shutil.copytree(base, runs / "incremental")
    sides = {}
    if not args.no_full:
        sides["full"] = _run(
            "full", str(folder), str(bundle), as_of.isoformat(), str(runs / "full")
        )
    sides["incremental"] = inc = _run(
        "incremental", str(folder), str(bundle), as_of.isoformat(), str(runs / "incremental")
    )
    print(
        f"lapse triggers run: {args.users:,} users, {history:,} events of history, "
        f"{args.new:,} new events, as of {as_of:%Y-%m-%d %H:%M} UTC"
    )
    for name, r in sides.items():
        print(
            f"  {name:<12} {r['seconds']:7.1f} s (CPU {r['cpu']:6.1f} s)  "
            f"peak {r['peak'] / 2**20:7.0f} MB  "
            f"touched {int(r['touched']):,} (new events {int(r['new_event_users']):,}, "
            f"due {int(r['due_users']):,})  fired {int(r['fired']):,}  sent {int(r['sent']):,}"
        )
    print(
        f"incremental: {inc['seconds'] / GOAL_SECONDS:.2f} x the {GOAL_SECONDS:.0f} s goal"
        + (
            f"; incremental / full: time {inc['seconds'] / sides['full']['seconds']:.3f}, "
            f"memory {inc['peak'] / sides['full']['peak']:.3f}"
            if "full" in sides
            else ""
        )
    )


if __name__ == "__main__":
    main()
