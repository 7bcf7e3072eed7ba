"""Benchmark: the local engine vs Spark local mode, features + nightly score (issue #10).

Each engine runs ``lapse features`` and ``lapse score`` (file sink) on the same
synthetic events in its own subprocess; the parent samples the RSS of the whole
process tree (driver, JVM, Python workers) every 0.2 s and prints wall time,
peak memory and the Spark/local ratio. From the Spark run's time it derives the
throughput per core (events per second per core) and prints what a 1B-event
run needs: cores for a target wall time, partitions, executor memory.

Usage::

    python benchmarks/scale.py                       # about 10M events (210k users x 60 days)
    python benchmarks/scale.py --users 5000          # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from score import prepare  # noqa: E402  (the score benchmark's cached data and bundle)

EVENTS_PER_PARTITION = 2_000_000
TARGET_HOURS = 1.0


def child(engine: str, events: str, bundle: str, as_of: str, out: str, cores: int) -> None:
    from lapse.config import load_config
    from lapse.jobs import run_features
    from lapse.score.run import run_score

    spark = None
    if engine == "spark":
        from pyspark.sql import SparkSession  # noqa: TID251  # a sized local cluster

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = (
            SparkSession.builder.master(f"local[{cores}]")
            .config("spark.sql.shuffle.partitions", str(cores * 2))
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", "2g")
            .getOrCreate()
        )
    config = load_config()
    config = config.model_copy(
        update={"audit": config.audit.model_copy(update={"path": str(Path(out) / "audit")})}
    )
    cutoff = datetime.fromisoformat(as_of)
    times = {}
    t = time.perf_counter()
    run_features(
        Path(events),
        config,
        as_of=cutoff,
        out=Path(out) / "features.parquet",
        engine=engine,  # type: ignore[arg-type]
        spark=spark,
    )
    times["features"] = time.perf_counter() - t
    t = time.perf_counter()
    result = run_score(
        Path(events),
        config,
        as_of=cutoff,
        model=bundle,
        sink="file",
        out=Path(out) / "scores.parquet",
        engine=engine,  # type: ignore[arg-type]
        spark=spark,
    )
    times["score"] = time.perf_counter() - t
    print(json.dumps({"times": times, "users": result.counts["scored"]}))


def measure(argv: list[str]) -> tuple[dict[str, object], float, int]:
    """Run ``argv``; its JSON line, wall seconds and the peak RSS of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{argv[3]} engine failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=210_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, events, bundle, as_of, out, cores = args.child
        child(engine, events, bundle, as_of, out, int(cores))
        return
    import polars as pl

    events, bundle, as_of = prepare(args.users, args.days, 5000)
    n_events = pl.scan_parquet(events).select(pl.len()).collect().item()
    print(f"{n_events:,} events, {args.users:,} users, {args.cores} cores")
    got = {}
    for engine in ("local", "spark"):
        out = HERE / ".data" / f"scale_{engine}"
        argv = [sys.executable, __file__, "--child", engine, str(events), str(bundle)]
        argv += [as_of.isoformat(), str(out), str(args.cores)]
        info, wall, peak = measure(argv)
        times = info["times"]
        assert isinstance(times, dict)
        got[engine] = (sum(times.values()), peak)
        print(
            f"{engine:>5}: features {times['features']:.1f} s, score {times['score']:.1f} s, "
            f"wall {wall:.1f} s, peak RSS {peak / 2**30:.2f} GB (process tree)"
        )
    (lt, lm), (st, sm) = got["local"], got["spark"]
    print(f"spark/local: time x{st / lt:.2f}, memory x{sm / lm:.2f}")
    per_core = n_events / (st * args.cores)
    print(f"spark throughput: {per_core:,.0f} events/s per core (features + score, local mode)")
    target = TARGET_HOURS * 3600
    cores = 1e9 / (per_core * target)
    parts = 1e9 / EVENTS_PER_PARTITION
    # the run used 2 partitions per core; its peak per core, scaled to one 2M-event partition
    per_task = max(n_events / (args.cores * 2), 1)
    per_part_gb = sm / args.cores / per_task * EVENTS_PER_PARTITION / 2**30
    print(
        f"1B events in {TARGET_HOURS:.0f} h: 1e9 / ({per_core:,.0f} x {target:.0f} s) = "
        f"{cores:,.0f} cores; {parts:,.0f} partitions of {EVENTS_PER_PARTITION:,} events; "
        f"about {per_part_gb:.1f} GB per core (this run's peak per core, scaled to one "
        "partition): executor memory + spark.executor.pyspark.memory of that per core"
    )


if __name__ == "__main__":
    main()
