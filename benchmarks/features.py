"""Benchmark: lapse's feature builder against a DuckDB SQL implementation.

Both sides build the core feature set (``usage``/``purchase`` counts,
``active_days``, ``revenue`` per 7/14/28/90-day window, recencies, tenure and
the two usage ratios) from the same synthetic Parquet file, each in its own
subprocess. The DuckDB side rolls events up to one row per user and day first,
then computes the windows from the daily rows (for several cutoffs it joins
the daily rows to every later cutoff). Results are checked to agree.

Usage::

    python benchmarks/features.py                  # 1M and 10M events, one cutoff
    python benchmarks/features.py --cutoffs 12     # 12 monthly cutoffs: build_many vs join
    python benchmarks/features.py --sizes 1000000  # one size
    python benchmarks/features.py --large          # adds 50M events
    python benchmarks/features.py --repeat 2       # best of two runs per side (noisy machines)

The headline compares like with like: ``build(..., feature_set="core")`` (or
``build_many``) against DuckDB's core set. The full feature set (``"all"``,
about 100 columns) is timed too and reported against the same DuckDB run.

With one cutoff it also runs the ``lapse features`` CLI as a user would (read,
validate, the full set, write; a fresh process) and prints its whole-process
time against DuckDB's whole process (the goal of issue #26: at most 1.5x), the
CPU time and peak memory of each, and the CLI's time per step (measured in a
further process: read and map, the rest of validation, build, write).

Synthetic data comes from ``lapse.datasets.generate`` (365 days, users scaled
to the event count) and is cached under ``benchmarks/.data/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
START = date(2026, 1, 1)
N_DAYS = 365
EVENTS_PER_USER = 237  # what generate() yields per user over 365 days
WINDOWS = (7, 14, 28, 90)
USAGE = ("app_open", "device_used")
PURCHASE = ("order_completed",)
CORE = [
    *(f"{r}_count_{w}d" for r in ("usage", "purchase") for w in WINDOWS),
    *(f"active_days_{w}d" for w in WINDOWS),
    *(f"revenue_{w}d" for w in WINDOWS),
    "days_since_last_usage",
    "days_since_last_purchase",
    "tenure_days",
    "decay_ratio_14d",
    "dropping_ratio_7d",
]


def cutoffs(n: int) -> list[datetime]:
    """``n`` monthly cutoffs (first of the month, 00:00 UTC) ending right after the data."""
    end = datetime(START.year + 1, 1, 1, tzinfo=UTC)
    out = []
    for k in range(n):
        month = end.month - k
        year = end.year + (month - 1) // 12
        out.append(end.replace(year=year, month=(month - 1) % 12 + 1))
    return sorted(out)


def ensure_data(n_events: int) -> Path:
    """Write (once) a synthetic events Parquet of about ``n_events`` rows."""
    path = DATA / f"events_{n_events}.parquet"
    if not path.exists():
        from lapse.datasets import generate

        DATA.mkdir(exist_ok=True)
        data = generate(
            n_users=max(1, n_events // EVENTS_PER_USER), n_days=N_DAYS, seed=0, start=START
        )
        # time-ordered like most event exports; Polars' default row-group size
        data.events.sort("ts").write_parquet(path)
    return path


# --- DuckDB side --------------------------------------------------------------------


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def duckdb_sql(path: Path, cuts: list[datetime]) -> str:
    """Core features in SQL: a daily roll-up, then windows over the daily rows."""
    usage, purchase = _names(USAGE), _names(PURCHASE)
    end = max(cuts).isoformat()
    cut_list = ", ".join(f"TIMESTAMPTZ '{c.isoformat()}'" for c in cuts)
    t = "c.cutoff"
    tday = "CAST(c.cutoff AS DATE)"

    def since(days: int) -> str:
        return f"({tday} - INTERVAL {days} DAY)"

    cols = []
    for w in WINDOWS:
        cols += [
            f"CAST(coalesce(sum(nu) FILTER (WHERE day >= {since(w)}), 0) AS BIGINT) AS usage_count_{w}d",
            f"CAST(coalesce(sum(np) FILTER (WHERE day >= {since(w)}), 0) AS BIGINT) AS purchase_count_{w}d",
            f"count(*) FILTER (WHERE day >= {since(w)}) AS active_days_{w}d",
            f"coalesce(sum(rev) FILTER (WHERE day >= {since(w)}), 0.0) AS revenue_{w}d",
        ]
    days_us = 86_400_000_000
    u = {k: f"coalesce(sum(nu) FILTER (WHERE day >= {since(k)}), 0)" for k in (7, 14, 28)}
    cols += [
        f"(epoch_us({t}) - epoch_us(max(lu))) // {days_us} AS days_since_last_usage",
        f"(epoch_us({t}) - epoch_us(max(lp))) // {days_us} AS days_since_last_purchase",
        f"(epoch_us({t}) - epoch_us(min(fe))) // {days_us} AS tenure_days",
        f"{u[14]} / nullif({u[28]} - {u[14]}, 0) AS decay_ratio_14d",
        f"{u[7]} / nullif(({u[28]} - {u[7]}) / 3.0, 0) AS dropping_ratio_7d",
    ]
    select = ",\n    ".join(cols)
    return f"""
WITH d AS (
  SELECT user_id, CAST(ts AS DATE) AS day,
    count(*) FILTER (WHERE event IN ({usage})) AS nu,
    count(*) FILTER (WHERE event IN ({purchase})) AS np,
    coalesce(sum(revenue), 0.0) AS rev,
    max(ts) FILTER (WHERE event IN ({usage})) AS lu,
    max(ts) FILTER (WHERE event IN ({purchase})) AS lp,
    min(ts) AS fe
  FROM read_parquet('{path}')
  WHERE ts < TIMESTAMPTZ '{end}'
  GROUP BY ALL
),
c AS (SELECT unnest([{cut_list}]) AS cutoff)
SELECT user_id, c.cutoff AS cutoff,
    {select}
FROM d JOIN c ON d.day < {tday}
GROUP BY user_id, c.cutoff
"""


def run_duckdb(path: Path, cuts: list[datetime], out: Path) -> dict[str, object]:
    import duckdb

    con = duckdb.connect()
    con.sql("SET TimeZone = 'UTC'")
    threads = con.sql("SELECT current_setting('threads')").fetchall()[0]
    start = time.perf_counter()
    table = con.sql(duckdb_sql(path, cuts)).to_arrow_table()
    elapsed = time.perf_counter() - start
    import pyarrow.parquet as pq

    pq.write_table(table, out)
    return {
        "compute_s": elapsed,
        "rows": table.num_rows,
        "version": duckdb.__version__,
        "threads": threads[0] if threads else None,
    }


# --- the floor: scanning the needed columns -----------------------------------------


def run_scan(path: Path, cuts: list[datetime]) -> dict[str, object]:
    """Read every value of the columns the core set needs, compute nothing else."""
    import polars as pl

    start = time.perf_counter()
    row = (
        pl.scan_parquet(path)
        .filter(pl.col("ts") < cuts[-1])
        .select(pl.len(), pl.col("user_id").max(), pl.col("event").max(), pl.col("revenue").sum())
        .collect(engine="streaming")
    )
    return {"compute_s": time.perf_counter() - start, "rows": row.item(0, 0)}


# --- lapse side ---------------------------------------------------------------------


def run_lapse(
    path: Path, cuts: list[datetime], out: Path, feature_set: str = "core"
) -> dict[str, object]:
    import polars as pl

    from lapse import load_config
    from lapse.features import build, build_many

    config = load_config()
    events = pl.scan_parquet(path)
    fs = "core" if feature_set == "core" else "all"
    start = time.perf_counter()
    if len(cuts) == 1:
        frame = build(events, cuts[0], config, feature_set=fs)
        frame = frame.with_columns(cutoff=pl.lit(cuts[0]))
    else:
        frame = build_many(events, cuts, config, feature_set=fs)
    elapsed = time.perf_counter() - start
    frame.select("user_id", "cutoff", *CORE).write_parquet(out)
    return {
        "compute_s": elapsed,
        "rows": frame.height,
        "columns": frame.width,
        "version": pl.__version__,
        "threads": pl.thread_pool_size(),
    }


def child(side: str, path: Path, n_cutoffs: int, out: Path) -> None:
    cuts = cutoffs(n_cutoffs)
    if side == "duckdb":
        result = run_duckdb(path, cuts, out)
    elif side == "scan":
        result = run_scan(path, cuts)
    elif side == "cli":
        result = run_cli(path, cuts, out)
    elif side == "steps":
        result = run_steps(path, cuts, out)
    else:
        result = run_lapse(path, cuts, out, "core" if side == "lapse" else "all")
    result["peak_rss_mb"] = peak_rss_mb()
    times = os.times()
    result["cpu_s"] = times.user + times.system  # the whole process, imports included
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux's ``ru_maxrss`` survives ``exec``, so a child would inherit the
    parent's peak (e.g. from generating the data); ``VmHWM`` is the child's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the CLI, whole process ---------------------------------------------------------

GOAL = 1.5  # lapse features CLI / DuckDB core set, whole process (issue #26)


def run_cli(path: Path, cuts: list[datetime], out: Path) -> dict[str, object]:
    """``lapse features PATH --as-of DAY --out OUT`` in this process, as the CLI runs it."""
    from lapse.cli import app

    start = time.perf_counter()
    day = f"{cuts[0]:%Y-%m-%d}"
    app(["features", str(path), "--as-of", day, "--out", str(out)], standalone_mode=False)
    elapsed = time.perf_counter() - start
    import polars as pl

    return {"compute_s": elapsed, "columns": len(pl.read_parquet_schema(out))}


def run_steps(path: Path, cuts: list[datetime], out: Path) -> dict[str, object]:
    """The CLI's steps timed one by one (reading twice: alone, then inside validation)."""
    from lapse import load_config
    from lapse.events.mapping import map_events
    from lapse.events.readers import collect_frame, scan_source
    from lapse.events.validate import validate_events
    from lapse.features import build

    config = load_config()
    clock: dict[str, float] = {}
    start = time.perf_counter()
    raw = scan_source(path)
    frame = collect_frame(map_events(raw, config, source_name=str(path)), str(path))
    clock["read_s"] = time.perf_counter() - start
    del frame
    start = time.perf_counter()
    kept, _ = validate_events(path, config, as_of=cuts[0])
    clock["validate_s"] = time.perf_counter() - start - clock["read_s"]
    start = time.perf_counter()
    frame = build(kept.lazy(), cuts[0], config)
    clock["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    frame.write_parquet(out)
    clock["write_s"] = time.perf_counter() - start
    return {**clock, "compute_s": sum(clock.values())}


# --- driver -------------------------------------------------------------------------


def spawn(side: str, path: Path, n_cutoffs: int, out: Path, repeat: int = 1) -> dict[str, object]:
    """Run ``side`` in fresh subprocesses ``repeat`` times; keep the fastest run."""
    runs = [_spawn_once(side, path, n_cutoffs, out) for _ in range(repeat)]
    return min(runs, key=lambda r: float(r["compute_s"]))  # type: ignore[arg-type]


def _spawn_once(side: str, path: Path, n_cutoffs: int, out: Path) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--path",
        str(path),
        "--cutoffs",
        str(n_cutoffs),
    ]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{proc.stderr}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def agree(lapse_out: Path, duck_out: Path) -> str:
    """Compare the two results; an empty string means they agree."""
    import polars as pl
    from polars.testing import assert_frame_equal

    a = pl.read_parquet(lapse_out)
    keys = ["cutoff", "user_id"] if "cutoff" in a.columns else ["user_id"]  # the CLI: one cutoff
    a = a.select(*keys, *CORE).sort(keys)
    b = pl.read_parquet(duck_out).select(a.columns).sort(keys)
    b = b.with_columns(pl.col(c).cast(a.schema[c]) for c in a.columns)
    try:
        assert_frame_equal(a, b, check_exact=False, rel_tol=1e-9, abs_tol=1e-6)
    except AssertionError as exc:
        return str(exc)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--large", action="store_true", help="add 50M events")
    parser.add_argument("--cutoffs", type=int, default=1, help="number of monthly cutoffs")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per side (fresh processes); the fastest is kept"
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full-set lapse run")
    parser.add_argument("--no-cli", action="store_true", help="skip the lapse features CLI runs")
    parser.add_argument(
        "--child",
        choices=["lapse", "lapse-all", "duckdb", "scan", "cli", "steps"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.cutoffs, args.out)
        return
    sizes = [*args.sizes, *([50_000_000] if args.large else [])]
    print(
        f"machine: {os.cpu_count()} cores; cutoffs: {args.cutoffs} (monthly, 00:00 UTC); "
        f"best of {args.repeat} run(s) per side"
    )
    for n in sizes:
        path = ensure_data(n)
        import polars as pl

        n_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        with tempfile.TemporaryDirectory() as tmp:
            lo, do = Path(tmp, "lapse.parquet"), Path(tmp, "duckdb.parquet")
            fo = Path(tmp, "lapse_all.parquet")
            load = _loadavg()
            lap = spawn("lapse", path, args.cutoffs, lo, args.repeat)
            duck = spawn("duckdb", path, args.cutoffs, do, args.repeat)
            full = None if args.no_full else spawn("lapse-all", path, args.cutoffs, fo, args.repeat)
            floor = spawn("scan", path, args.cutoffs, fo, args.repeat)
            cli = steps = None
            if args.cutoffs == 1 and not args.no_cli:
                cli = spawn("cli", path, args.cutoffs, Path(tmp, "cli.parquet"), args.repeat)
                steps = spawn("steps", path, args.cutoffs, Path(tmp, "steps.parquet"), args.repeat)
                problem_cli = agree(Path(tmp, "cli.parquet"), do)
            load_after = _loadavg()
            problem = agree(lo, do)
            problem_full = "" if full is None else agree(fo, do)
        print(f"\n{n_rows:,} events ({path.name}), {lap['rows']:,} feature rows")
        print(f"  loadavg before/after: {load} / {load_after}")
        print(f"  lapse : polars {lap['version']}, {lap['threads']} threads")
        print(f"  duckdb: duckdb {duck['version']}, {duck['threads']} threads, core set")
        print(
            f"  {'':18}{'compute s':>11}{'process s':>11}{'CPU s':>9}{'peak RSS MB':>13}"
            f"{'columns':>9}"
        )
        rows = [("lapse core", lap), ("duckdb core", duck)]
        if full is not None:
            rows.append(("lapse all", full))
        if cli is not None:
            rows.append(("lapse CLI (all)", cli))
        for name, r in rows:
            print(
                f"  {name:18}{r['compute_s']:>11.2f}{r['process_s']:>11.2f}{r['cpu_s']:>9.2f}"
                f"{r['peak_rss_mb']:>13.0f}{r.get('columns', len(CORE) + 2):>9}"
            )
        for name, r in rows:
            if r is duck:
                continue
            ratio = {
                k: float(r[k]) / float(duck[k])  # type: ignore[arg-type]
                for k in ("compute_s", "process_s", "cpu_s", "peak_rss_mb")
            }
            print(
                f"  {name[:10] + ' / duckdb':18}{ratio['compute_s']:>11.2f}"
                f"{ratio['process_s']:>11.2f}{ratio['cpu_s']:>9.2f}{ratio['peak_rss_mb']:>13.2f}"
            )
        if cli is not None and steps is not None:
            ratio = float(cli["process_s"]) / float(duck["process_s"])  # type: ignore[arg-type]
            verdict = "meets" if ratio <= GOAL else "misses"
            print(
                f"  CLI whole process / DuckDB whole process: {ratio:.2f}x, "
                f"{ratio / GOAL:.2f} of the goal ({GOAL}x): {verdict} it"
            )
            print(
                "  CLI steps (s, own process): "
                + ", ".join(
                    f"{k[:-2]} {float(steps[k]):.2f}"  # type: ignore[arg-type]
                    for k in ("read_s", "validate_s", "build_s", "write_s")
                )
                + f"; start-up and imports {float(cli['process_s']) - float(cli['compute_s']):.2f}"  # type: ignore[arg-type]
            )
            print(
                "  CLI full set: core columns agree with DuckDB"
                if not problem_cli
                else f"  CLI RESULTS DIFFER:\n{problem_cli}"
            )
        print(
            f"  scan floor (needed columns only): {floor['compute_s']:.2f} s; "
            f"lapse core / floor: {float(lap['compute_s']) / float(floor['compute_s']):.1f}x"  # type: ignore[arg-type]
        )
        print("  core results agree" if not problem else f"  CORE RESULTS DIFFER:\n{problem}")
        if full is not None:
            print(
                "  full-set core columns agree"
                if not problem_full
                else f"  FULL-SET RESULTS DIFFER:\n{problem_full}"
            )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
