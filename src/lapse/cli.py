"""The `lapse` command line: thin typer commands, one pipeline call each.

Errors a user can cause (:class:`lapse.LapseError`) print one line and exit
with the error's ``exit_code``: 2 usage, configuration or input; 3 another run
holds the lock; 4 promotion refused or inconclusive; 5 a write failed. A
validation over its threshold or records that failed exit with 1. The table of
every command: ``docs/exit-codes.md``.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import polars as pl
import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lapse import __version__
from lapse._process import tune_gc
from lapse.config import ENGINES, dump_config, load_config
from lapse.exceptions import LapseError, WriteFailed

# each command imports its job inside it: startup (`lapse --help`) loads the config alone
if TYPE_CHECKING:
    from lapse.events import ValidationReport
    from lapse.jobs import FeaturesResult
    from lapse.registry import RegisteredVersion
    from lapse.score.steps import ScoreHeader, ScoreRunResult
    from lapse.score.trigger_run import TriggerRunResult
    from lapse.train.churn import TrainResult

__all__ = ["app", "lean_lightgbm", "main"]

# lapse's own linear algebra is small (survival and BG/NBD fits over a few columns) and an
# OpenBLAS thread pool spins between such calls: a BG/NBD fit took 10x the CPU with two
# threads. Set before numpy or scipy first load OpenBLAS (importing this module loads
# neither); a user's own OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
tune_gc()  # few collections over the imported modules, none at exit

# LightGBM's `import` tries scikit-learn and pandas (lightgbm.compat), and scikit-learn pulls
# SciPy: about 1.0 s of CPU, 1.2 s with pandas, in every command that loads a model. lapse
# calls LightGBM's core (Dataset, train, Booster) on NumPy arrays only and needs neither: a
# `lapse triggers run --incremental` spent a fifth of its time on this import. LightGBM fixes
# what it found when lightgbm.compat is first imported (its scikit-learn API then refuses to
# fit, and it takes no pandas frames), so the `lapse` process alone imports it so (`main`);
# `import lapse` and `from lapse.cli import app` leave a notebook's LightGBM whole.
_LIGHTGBM_WITHOUT = ("sklearn", "pandas")


class _Without(importlib.abc.Loader):
    """Runs a module's loader with the modules ``names`` not importable (the ones already
    imported stay): an ``import`` of them inside raises ImportError."""

    def __init__(self, loader: importlib.abc.Loader, names: Sequence[str]) -> None:
        self._loader, self._names = loader, names

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hidden = [name for name in self._names if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # import's "not there" mark
        try:
            self._loader.exec_module(module)
        finally:
            for name in hidden:
                del sys.modules[name]


class _LeanLightGBM(importlib.abc.MetaPathFinder):
    """Finds lightgbm.compat with :class:`_Without` its optional scikit-learn and pandas
    (once: it then leaves ``sys.meta_path``)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "lightgbm.compat":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Without(spec.loader, _LIGHTGBM_WITHOUT)
        return spec


def lean_lightgbm() -> None:
    """Make this process import LightGBM without scikit-learn and pandas (about 1.2 s of CPU
    less to load a model). For a process of lapse's own (the `lapse` command, a benchmark):
    LightGBM's scikit-learn API refuses to fit in it, and its Dataset takes no pandas frame;
    a no-op once LightGBM is imported."""
    if "lightgbm" not in sys.modules and not any(
        isinstance(f, _LeanLightGBM) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _LeanLightGBM())


def main() -> None:
    """The `lapse` command (the console script): :data:`app` with :func:`lean_lightgbm`."""
    lean_lightgbm()
    app()


app = typer.Typer(
    name="lapse",
    help="Churn and replenishment modeling from customer event streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or create configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
triggers_app = typer.Typer(help="Evaluate triggers and deliver them.", no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")

# rich cuts output at 80 columns when it is not a terminal: a log line this long is whole
LOG_WIDTH = 10_000


class _Console(Console):
    """rich's Console, full width when its stream is not a terminal (the nightly
    job's log, CI), where rich would cut tables and wrap lines at 80 columns."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console()
err_console = _Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config; the embedded default when omitted."),
]
SinkOpt = Annotated[str | None, typer.Option(help="Destination; default sinks.default (file).")]
OutOpt = Annotated[Path | None, typer.Option(help="The file sink's path (.parquet or .csv).")]
EventsArg = Annotated[Path, typer.Argument(help="Event file, folder or glob.", show_default=False)]


def _friendly(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a LapseError into one red line on stderr and its exit code (2 unless it says)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except LapseError as exc:
            # escape: messages list columns as [a, b], which rich would take for markup
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper


def _parse_date(value: str, option: str) -> datetime:
    """A CLI date means 00:00 UTC of that day."""
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date; use YYYY-MM-DD", param_hint=option
        ) from None
    return day.replace(tzinfo=UTC)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"lapse {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Churn and replenishment modeling from customer event streams."""


def _home() -> Path:
    home = os.environ.get("LAPSE_HOME")
    return Path(home).expanduser() if home else Path.cwd()


def _report_table(report: ValidationReport) -> Table:
    table = Table(title=f"events: {report.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    span = (
        "-"
        if report.ts_min is None
        else f"{report.ts_min:%Y-%m-%d %H:%M} .. {report.ts_max:%Y-%m-%d %H:%M} UTC"
    )
    rows: list[tuple[str, str]] = [
        ("rows read", f"{report.rows_read:,}"),
        ("rows kept", f"{report.rows_kept:,}"),
        ("users", f"{report.users:,}"),
        ("time span", span),
    ]
    rows += [(f"  role {role}", f"{n:,}") for role, n in report.events_per_role.items()]
    rows.append(("  in no role", f"{report.events_unassigned:,}"))
    if report.purchase_orders is None:
        rows.append(("purchases counted", "per row (no source.order_id)"))
    else:
        rows.append(("purchase orders", f"{report.purchase_orders:,} (source.order_id)"))
    rejected = sum(report.rejected_by_reason.values())
    rows.append(("rejected", f"{rejected:,} ({report.rejected_share:.2%})"))
    rows += [(f"  {reason}", f"{n:,}") for reason, n in report.rejected_by_reason.items()]
    rows.append(("duplicates dropped", f"{report.duplicates:,}"))
    rows += [(f"{call} calls (not events)", f"{n:,}") for call, n in report.calls.items()]
    if report.links or report.anonymous_only:
        rows.append(("identity links", f"{report.links:,}"))
        rows.append(("  ids merged into another", f"{report.merged_ids:,}"))
        rows.append(("  anonymous-only ids", f"{report.anonymous_only:,}"))
    if report.guest_rows:
        rows.append(("guest rows (no user id)", f"{report.guest_rows:,}"))
    rows.append(("future events (kept)", f"{report.future_events:,}"))
    if report.rejects_path is not None:
        rows.append(("rejects file", str(report.rejects_path)))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _features_table(result: FeaturesResult) -> Table:
    title = f"features as of {result.as_of:%Y-%m-%d %H:%M} UTC"
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column(style="bold")
    table.add_row("users", f"{result.users:,}")
    table.add_row("features", f"{result.columns:,}")
    table.add_row("engine", result.engine)
    v = result.validation
    if v is not None and (v.rows_rejected or v.duplicates):
        table.add_row(
            "events dropped",
            f"{v.rows_rejected:,} rejected (see {v.rejects_path}), {v.duplicates:,} duplicates",
        )
    sparse = sorted(result.null_share.items(), key=lambda kv: -kv[1])[:5]
    if sparse:
        table.add_row("mostly null", ", ".join(f"{k} {v:.0%}" for k, v in sparse))
    table.add_row("written to", str(result.path))
    return table


@app.command()
@_friendly
def validate(
    events: EventsArg,
    config: ConfigOpt = None,
    rejects: Annotated[
        Path | None,
        typer.Option(help="Where rejected rows go (Parquet, with a reason column)."),
    ] = None,
    max_reject_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Exit 1 when more rows than this are rejected.")
    ] = 0.05,
    as_of: Annotated[
        str | None, typer.Option(help="Flag events after this date (YYYY-MM-DD) instead of now.")
    ] = None,
) -> None:
    """Read, map and validate events; print a summary and write rejected rows."""
    from lapse.jobs import run_validate

    report = run_validate(
        events,
        load_config(config),
        rejects=rejects,
        as_of=None if as_of is None else _parse_date(as_of, "--as-of"),
    )
    console.print(_report_table(report))
    if report.rejected_share > max_reject_share:
        err_console.print(
            f"[bold red]error:[/] {escape(str(events))}: {report.rejected_share:.1%} of rows were rejected "
            f"(limit {max_reject_share:.1%}); see {report.rejects_path} for the rows and reasons, "
            "fix the source mapping in the config, or raise --max-reject-share"
            + (
                "; if rows without a user id are guest orders, set source.allow_guest_rows: "
                "true to count them as guest rows instead"
                if report.rejected_by_reason.get("null_user_id")
                else ""
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


@app.command()
@_friendly
def features(
    events: EventsArg,
    as_of: Annotated[str, typer.Option(help="Cutoff date (YYYY-MM-DD, 00:00 UTC).")],
    out: Annotated[Path, typer.Option(help="Parquet file for the feature rows.")],
    config: ConfigOpt = None,
    attributes: Annotated[
        Path | None, typer.Option(help="User attributes table; default attributes.path.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="local (Polars, this machine) or spark (canonical-event Parquet, "
            "sharded by user; needs the spark extra and Java 17+)."
        ),
    ] = "local",
) -> None:
    """Build point-in-time features (one row per user) as of a date."""
    from lapse.jobs import run_features

    cutoff = _parse_date(as_of, "--as-of")
    if engine not in ENGINES:
        raise LapseError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    with console.status(f"building features as of {as_of} ({engine} engine)"):
        result = run_features(
            events,
            load_config(config),
            as_of=cutoff,
            out=out,
            attributes=attributes,
            engine=engine,
        )
    console.print(_features_table(result))


@app.command()
@_friendly
def drivers(
    events: EventsArg,
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Latest cutoff (YYYY-MM-DD); default: the last with an observed horizon."
        ),
    ] = None,
    config: ConfigOpt = None,
    attributes: Annotated[
        Path | None,
        typer.Option(
            help="User attributes table (for drivers.behaviors); default attributes.path."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for drivers.csv (the table) and drivers.png (the forest plot)."),
    ] = None,
    triggers: Annotated[
        Path | None,
        typer.Option(
            help="YAML file for encourage_<behavior> triggers on the top drivers, to merge "
            "into the config."
        ),
    ] = None,
) -> None:
    """Rank behaviors by how strongly adopting them goes with later retention."""
    from lapse.jobs import run_drivers

    cutoff = _parse_date(as_of, "--as-of") if as_of else None
    with console.status("comparing adopters with similar non-adopters"):
        result = run_drivers(
            events,
            load_config(config),
            as_of=cutoff,
            attributes=attributes,
            out=out,
            triggers=triggers,
        )
    table = Table(
        title=f"stickiness drivers as of {result.as_of:%Y-%m-%d} "
        f"({len(result.cutoffs)} cutoffs, {result.pairs:,} user-cutoffs)",
        title_justify="left",
    )
    level = f"{result.confidence:.0%} CI"
    for name in ("behavior", "adopters", "retained", "vs similar", "lift", level, "driver"):
        table.add_column(name, justify="left" if name == "behavior" else "right", no_wrap=True)
    for r in result.table.iter_rows(named=True):
        table.add_row(
            escape(r["behavior"]) + ("*" if r["kind"] == "condition" else ""),
            f"{r['adopters']:,}",
            f"{r['retained_adopters']:.1%}",
            f"{r['retained_non_adopters']:.1%}",
            f"{r['lift']:+.1%}",
            f"[{r['ci_low']:+.1%}, {r['ci_high']:+.1%}]",
            "[green]yes[/]" if r["driver"] else "",
        )
    console.print(table)
    console.print(
        f"[dim]lift: retention of adopters minus non-adopters of the same tenure and "
        f"recent activity. Note: {result.caveat}.[/]"
    )
    if "condition" in result.table["kind"]:
        console.print("[dim]* declared in drivers.behaviors[/]")
    for what, path in result.files.items():
        console.print(f"wrote {what}: {escape(str(path))}")


_SHORT = {
    "test_cutoff": "test cutoff",
    "validation_auc": "val AUC",
    "roc_auc": "AUC",
    "pr_auc": "PR-AUC",
    "brier": "Brier",
    "ece": "ECE",
    "top_decile_lift": "lift@10%",
    "n_cutoffs": "cutoffs",
    "times_selected": "won",
    "roc_auc_mean": "AUC mean",
    "roc_auc_std": "AUC std",
    "roc_auc_min": "AUC min",
    "ece_mean": "ECE mean",
    "top_decile_lift_mean": "lift@10% mean",
    "concordance": "C-index",
    "mae_days": "MAE days",
    "ibs": "IBS",
    "brier_14d": "Brier 14d",
    "n": "n",
}


def _metrics_table(frame: pl.DataFrame, title: str) -> Table:
    """Model metrics, three decimals, the columns a terminal has room for."""
    columns = ["model", *(c for c in _SHORT if c in frame.columns), "selected"]
    table = Table(title=title, title_justify="left")
    shown = [c for c in columns if c in frame.columns]
    for c in shown:
        table.add_column(_SHORT.get(c, c), justify="left" if c == "model" else "right")
    for row in frame.select(shown).iter_rows():
        table.add_row(
            *(
                "*"
                if v is True
                else ""
                if v is False or v is None
                else f"{v:.3f}"
                if isinstance(v, float)
                else str(v)
                for v in row
            )
        )
    return table


def _print_training(result: TrainResult) -> None:
    title = f"churn race, test cutoff {result.test_cutoff:%Y-%m-%d}"
    console.print(_metrics_table(result.table, title))
    console.print(f"[bold]selected:[/] {result.selected} - {result.why}")
    if result.replenishment is not None:
        rep = result.replenishment
        console.print(_metrics_table(rep.table, "replenishment (time to next order)"))
        console.print(f"[bold]selected:[/] {rep.selected} - {rep.why}")
    if result.segments:
        from lapse.segments import describe_sizes

        console.print(
            f"[bold]segments[/] at {result.calibration_cutoff:%Y-%m-%d}: "
            f"{describe_sizes(result.segments)}",
            highlight=False,
        )
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(
        f"report in {result.out_dir} (open {result.html_path}), bundle at {result.bundle_path}",
        highlight=False,
    )


@app.command()
@_friendly
def train(
    events: EventsArg,
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option(help="Report folder: metrics.json and PNG plots.")] = Path(
        "report"
    ),
    truth: Annotated[
        Path | None, typer.Option(help="`lapse generate` output folder; adds the oracle AUC.")
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="Where the bundle is saved; default models/ of the config.")
    ] = None,
    register: Annotated[
        bool, typer.Option(help="Log the run to MLflow and register the bundle as a new version.")
    ] = True,
    until: Annotated[
        str | None,
        typer.Option(
            help="Train as of this date (YYYY-MM-DD, 00:00 UTC): later events are left out, "
            "e.g. to hold them back for an out-of-time check."
        ),
    ] = None,
) -> None:
    """Race churn and replenishment models out of time; report, save and register the bundle."""
    from lapse.jobs import run_train

    with console.status("building training frames and running the races"):
        result, registered = run_train(
            events,
            load_config(config),
            out_dir=out,
            truth_dir=truth,
            models_dir=models_dir,
            register=register,
            until=None if until is None else _parse_date(until, "--until"),
        )
    _print_training(result)
    if registered is not None:
        _print_registered(registered)


def _print_registered(reg: RegisteredVersion) -> None:
    aliases = ", ".join(reg.aliases) or "no alias"
    for note in reg.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    console.print(
        f"registered [bold]{reg.name}[/] version {reg.version} ({aliases}) in {reg.tracking_uri}; "
        f"MLflow run {reg.run_id}",
        highlight=False,
    )


NameOpt = Annotated[
    str | None, typer.Option("--name", help="Registered model name; default models.name.")
]


@app.command()
@_friendly
def review(
    events: EventsArg,
    name: NameOpt = None,
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the comparison plots.")] = None,
) -> None:
    """Score champion and challenger on the same recent cutoffs; compare with intervals.

    The verdict (promote, refuse or inconclusive) is what `lapse promote` acts on.
    """
    from lapse.modeling.compare import LEVEL
    from lapse.train.review import review as run_review

    with console.status("scoring champion and challenger"):
        result = run_review(events, load_config(config), name=name, out_dir=out)
    cutoffs = ", ".join(f"{c:%Y-%m-%d}" for c in result.cutoffs)
    table = Table(
        "task",
        "metric",
        f"champion v{result.champion}",
        f"challenger v{result.challenger}",
        "delta",
        f"{LEVEL:.0%} interval",
        title=f"{result.name}: cutoffs {cutoffs}; {result.n_users:,} users "
        f"({result.n_rows:,} user-cutoffs), churn rate {result.churn_rate:.1%}",
        title_justify="left",
    )
    for row in result.table.iter_rows(named=True):
        mark = " (primary)" if row["primary"] else ""
        table.add_row(
            row["task"],
            f"{row['metric']}{mark}",
            f"{row['champion']:.4f}",
            f"{row['challenger']:.4f}",
            f"{row['delta']:+.4f} ({row['better']} is better)",
            "" if row["low"] is None else f"{row['low']:+.4f} to {row['high']:+.4f}",
        )
    console.print(table)
    console.print(f"[bold]verdict:[/] {result.verdict}")
    console.print(f"  rule: {escape(result.rule)}", highlight=False, soft_wrap=True)
    for reason in [*result.reasons, *result.notes]:
        console.print(f"  {escape(reason)}", highlight=False, soft_wrap=True)
    console.print(f"comparison logged as MLflow run {result.run_id}")


@app.command()
@_friendly
def promote(
    name: NameOpt = None,
    version: Annotated[
        int | None, typer.Option(help="Version to promote; default challenger.")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Promote although the review refused it or was inconclusive.")
    ] = False,
    rollback: Annotated[
        bool, typer.Option(help="Restore the last champion before the current one.")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded on the version.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Move the champion alias to the challenger (or V) on the review's verdict, or roll back.

    Exit 4 when the review refused the version or was inconclusive (--force overrides).
    """
    from lapse.registry import promote as run_promote

    if force and rollback:
        raise typer.BadParameter("give --force or --rollback, not both", param_hint="--rollback")
    result = run_promote(
        load_config(config),
        name=name,
        version=version,
        force=force,
        rollback=rollback,
        reason=reason,
    )
    previous = "none" if result.previous_champion is None else f"v{result.previous_champion}"
    console.print(
        f"{result.name}: {result.action}; champion is now v{result.champion} "
        f"(previous-champion {previous}); by {result.user}: {result.reason}",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"  {escape(note)}", highlight=False)


@app.command()
@_friendly
def backtest(
    events: EventsArg,
    config: ConfigOpt = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Number of last complete cutoffs.")] = 6,
) -> None:
    """Repeat the race on each of the last K complete cutoffs; print metrics and spread."""
    from lapse.train.churn import backtest as run_backtest

    with console.status(f"racing on the last {k} complete cutoffs"):
        result = run_backtest(events, load_config(config), k=k)
    console.print(_metrics_table(result.per_cutoff, "per cutoff"))
    console.print(_metrics_table(result.spread, "spread over cutoffs"))
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)


@app.command()
@_friendly
def generate(
    out: Annotated[Path, typer.Option(help="Folder for events/users/truth Parquet files.")],
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 2000,
    days: Annotated[int, typer.Option(min=1, help="Days simulated.")] = 180,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 0,
    segment: Annotated[
        bool,
        typer.Option(
            "--segment",
            help="Also write segment.ndjson, a Segment export in which 30% of users begin "
            "anonymous and identify later, and identities.parquet (who, until when).",
        ),
    ] = False,
) -> None:
    """Write synthetic events with ground truth (events, users, truth, truth_hazard)."""
    from lapse.datasets import generate as generate_data
    from lapse.datasets import write, write_segment

    with console.status(f"simulating {users:,} users over {days} days"):
        data = generate_data(n_users=users, n_days=days, seed=seed)
        files = write(data, out)
        extra = write_segment(data, out, seed=seed) if segment else {}
    table = Table("file", "rows", title="synthetic data", title_justify="left")
    frames = {
        "events": data.events,
        "users": data.users,
        "truth": data.truth,
        "truth_hazard": data.truth_hazard,
    }
    for name, path in files.items():
        table.add_row(str(path), f"{frames[name].height:,}")
    for path in extra.values():
        table.add_row(str(path), "")
    console.print(table)


@app.command()
@_friendly
def demo(
    out: Annotated[
        Path | None, typer.Option(help="Output folder; default ./demo (or $LAPSE_HOME/demo).")
    ] = None,
    users: Annotated[int, typer.Option(min=1)] = 2000,
    days: Annotated[int, typer.Option(min=1)] = 180,
    seed: int = 0,
    config: ConfigOpt = None,
) -> None:
    """Run the main job end to end on synthetic data with the embedded defaults."""
    from lapse.jobs import run_demo

    out_dir = out if out is not None else _home() / "demo"
    cfg = load_config(config)
    with console.status("generating data, validating, training, registering, scoring"):
        result = run_demo(cfg, out_dir=out_dir, n_users=users, n_days=days, seed=seed)
    if result.features.validation is not None:
        console.print(_report_table(result.features.validation))
    console.print(_features_table(result.features))
    _print_training(result.training)
    if result.registered is not None:
        _print_registered(result.registered)
    _print_score_summary(result.scored)
    where = Table(title="where to look next", show_header=False, title_justify="left")
    where.add_column(style="bold")
    where.add_column()
    where.add_row("data", str(result.files["events"].parent))
    where.add_row("training report", str(result.training.report_path))
    where.add_row("scores", str(result.scored.out))
    where.add_row("audit snapshot", str(result.scored.snapshot))
    if result.registered is not None:
        where.add_row(
            "MLflow UI", f"mlflow ui --backend-store-uri {result.registered.tracking_uri}"
        )
    where.add_row(
        "score again",
        f"lapse score {result.files['events']} --as-of {result.scored.as_of:%Y-%m-%d}",
    )
    console.print(where)


class _ScoreBars:
    """Rich progress for `lapse score`: a spinner per step, a bar for the delivery."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def begin(self, header: ScoreHeader) -> None:
        """One line, before any work: the run, the model, what it was trained on and the
        exact command that resumes the run if it is cut off."""
        resume = f"; if cut off, resume with: {header.resume}" if header.resume else ""
        if header.resumed:
            console.print(
                f"[bold]resuming score run {header.score_run_id}[/]: "
                f"{escape(header.source)} (version {escape(header.version)}){escape(resume)}",
                highlight=False,
                soft_wrap=True,
            )
            return
        model = (
            f"model {header.model!r} version {header.version} ({header.source})"
            if header.version != "local"
            else f"model {header.model!r} (bundle file {header.source})"
        )
        console.print(
            f"[bold]score run {header.score_run_id}[/]: {escape(model)}; "
            f"trained on {escape(header.trained_on)}{escape(resume)}",
            highlight=False,
            soft_wrap=True,
        )

    def stage(self, name: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=1, total=1)
        self.task = self.progress.add_task(name, total=None)

    def delivering(self, total: int) -> None:
        self.stage("delivering records")
        assert self.task is not None
        self.progress.update(self.task, total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        err_console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _score_summary(result: ScoreRunResult) -> Table:
    kind = "dry run" if result.dry_run else ("resumed run" if result.resumed else "run")
    table = Table(
        title=f"score {kind} {result.score_run_id} as of {result.as_of:%Y-%m-%d} -> {result.sink}",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("model", result.model)
    order = (
        "scored",
        "would_send",
        "sent",
        "sent_earlier",
        "unchanged",
        "capped",
        "suppressed",
        "control",
        "skipped",
        "failed",
        "retried",
        "in_doubt",
    )
    for key in order:
        if key in result.counts:
            table.add_row(key.replace("_", " "), f"{result.counts[key]:,}")
    total = sum(result.segments.values())
    for seg in sorted(result.segments, key=lambda k: ("high", "medium", "low", k).index(k)):
        n = result.segments[seg]
        table.add_row(f"segment {seg}", f"{n:,} ({n / total:.1%})")
    for trig, n in result.triggers.items():
        table.add_row(f"trigger {trig}", f"{n:,}")
    if "churn_risk" in result.drift:
        worst = max(result.drift.items(), key=lambda kv: kv[1])
        table.add_row(
            "drift (PSI)", f"scores {result.drift['churn_risk']:.3f}, max {worst[0]} {worst[1]:.3f}"
        )
    table.add_row("time", f"{result.seconds:.1f} s")
    return table


def _print_score_summary(result: ScoreRunResult) -> None:
    from lapse.score.steps import resumed_line

    console.print(_score_summary(result))
    if result.resumed:
        console.print(f"resumed: {escape(resumed_line(result))}", highlight=False, soft_wrap=True)
    if result.who_was_scored:
        console.print(
            f"who was scored: {escape(result.who_was_scored)}", highlight=False, soft_wrap=True
        )


@app.command()
@_friendly
def score(
    events: EventsArg,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Cutoff date YYYY-MM-DD (00:00 UTC); default today."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/NAME@alias, models:/NAME/VERSION or a bundle file; default "
            "models:/<models.name>@champion."
        ),
    ] = None,
    config: ConfigOpt = None,
    sink: SinkOpt = None,
    out: OutOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Send nothing; print counts and example payloads.")
    ] = False,
    full: Annotated[
        bool,
        typer.Option("--full", help="Send every user, not only those whose delta key changed."),
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(help="Finish the run SCORE_RUN_ID without re-sending acknowledged batches."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="local (Polars, this machine) or spark (Parquet, delta:PATH or table:NAME, "
            "scored per user shard; needs the spark extra and Java 17+)."
        ),
    ] = "local",
) -> None:
    """Score every eligible user as of a date and deliver the records to a sink.

    Exit codes: 0 every record delivered; 1 some records failed (see the dead-letter
    file); 2 bad input or configuration; 3 another run holds the sink's lock; 5 a
    write failed (a full disk: the message names the path; resume or run again).
    """
    import json

    from lapse.score.run import run_score

    if engine not in ENGINES:
        raise LapseError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")

    day = (
        _parse_date(as_of, "--as-of")
        if as_of
        else datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    )
    cfg = load_config(config)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bars:
        result = run_score(
            events,
            cfg,
            as_of=day,
            model=model,
            sink=sink,
            out=out,
            dry_run=dry_run,
            full=full,
            resume=resume,
            progress=_ScoreBars(bars),
            engine=engine,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    _print_score_summary(result)
    if result.dry_run:
        for payload in result.examples:
            console.print_json(json.dumps(payload, default=str))
        return
    if result.snapshot is not None:
        console.print(f"audit snapshot: {result.snapshot}", highlight=False)
    if result.out is not None and result.complete:
        console.print(f"scores: {result.out}", highlight=False)
    if not result.complete:
        err_console.print(
            f"[bold red]{result.counts.get('failed', 0):,} records did not reach {escape(result.sink)}[/]; "
            f"dead letters: {result.dead_letters}; fix the cause, then run "
            f"`lapse score {events} --resume {result.score_run_id}`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


def _parse_instant(value: str, option: str) -> datetime:
    """A CLI instant: YYYY-MM-DD (00:00 UTC) or an ISO date-time (naive means UTC)."""
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date or time; use YYYY-MM-DD or YYYY-MM-DDTHH:MM",
            param_hint=option,
        ) from None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _triggers_summary(result: TriggerRunResult) -> Table:
    delivery = result.delivery
    kind = "dry run" if delivery is not None and delivery.dry_run else "run"
    run_id = f" {delivery.score_run_id}" if delivery is not None else ""
    table = Table(
        title=f"triggers {result.mode} {kind}{run_id} as of {result.as_of:%Y-%m-%d %H:%M} UTC",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    if result.mode == "full":
        table.add_row("full because", result.reason)
    table.add_row("files (new)", f"{result.files:,} ({result.new_files:,})")
    table.add_row("touched", f"{result.touched:,}")
    if result.mode == "incremental":
        table.add_row("  with new events", f"{result.new_event_users:,}")
        table.add_row("  due", f"{result.due_users:,}")
    table.add_row("fired", f"{result.fired:,}")
    counts = delivery.counts if delivery is not None else {}
    for key in ("scored", "would_send", "sent", "unchanged", "capped", "suppressed", "failed"):
        if key in counts or key in ("sent", "capped", "failed"):
            table.add_row(key.replace("_", " "), f"{counts.get(key, 0):,}")
    for trig, n in (delivery.triggers if delivery is not None else {}).items():
        table.add_row(f"trigger {trig}", f"{n:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    return table


@triggers_app.command("run")
@_friendly
def triggers_run(
    events: EventsArg,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental",
            help="Only users with events in new files or whose triggers came due "
            "(the first run evaluates everyone).",
        ),
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Cutoff: YYYY-MM-DD (00:00 UTC) or an ISO time; default now."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model as for `lapse score`; default models:/<models.name>@champion."),
    ] = None,
    config: ConfigOpt = None,
    sink: SinkOpt = None,
    out: OutOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Send nothing and keep the watermark.")
    ] = False,
) -> None:
    """Evaluate the triggers and deliver: everyone, or with --incremental the users
    with new events or due triggers (an append-only event folder).

    Exit codes as `lapse score`: 0 done; 1 some records failed; 2 bad input; 3 locked;
    5 a write failed.
    """
    from lapse.score.trigger_run import run_triggers

    when = (
        _parse_instant(as_of, "--as-of")
        if as_of
        else datetime.now(UTC).replace(second=0, microsecond=0)
    )
    cfg = load_config(config)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bars:
        result = run_triggers(
            events,
            cfg,
            as_of=when,
            incremental=incremental,
            model=model,
            sink=sink,
            out=out,
            dry_run=dry_run,
            progress=_ScoreBars(bars),
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print(_triggers_summary(result))
    delivery = result.delivery
    if delivery is not None and not delivery.complete:
        err_console.print(
            f"[bold red]{delivery.counts.get('failed', 0):,} records did not reach "
            f"{escape(delivery.sink)}[/]; dead letters: {delivery.dead_letters}; fix the cause, "
            f"then run `lapse score {events} --resume {delivery.score_run_id}`",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


@app.command()
@_friendly
def impact(
    events: EventsArg,
    since: Annotated[str, typer.Option("--since", help="First score run date, YYYY-MM-DD.")],
    config: ConfigOpt = None,
) -> None:
    """Compare later retention of messaged vs held-out control users, per segment."""
    from lapse.insights.impact import impact as measure

    result = measure(events, load_config(config), since=_parse_date(since, "--since").date())
    table = Table(
        title=f"impact of {len(result.runs)} score run(s) since {since}", title_justify="left"
    )
    for col in (
        "segment",
        "treated",
        "control",
        "treated retention",
        "control retention",
        "lift (95% CI)",
    ):
        table.add_column(col, justify="left" if col == "segment" else "right")
    for r in result.table.iter_rows(named=True):
        table.add_row(
            r["segment"],
            f"{r['treated']:,}",
            f"{r['control']:,}",
            f"{r['treated_retention']:.1%}",
            f"{r['control_retention']:.1%}",
            f"{r['lift']:+.1%} ({r['ci_low']:+.1%} to {r['ci_high']:+.1%})",
        )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command()
@_friendly
def forget(
    user_ids: Annotated[list[str], typer.Argument(help="User ids to erase.", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Remove users from audit snapshots, the run ledger and dead letters (erasure requests)."""
    from lapse.jobs import run_forget

    result = run_forget(load_config(config), user_ids)
    parts = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in result.removed.items())
    console.print(f"forgot {result.users:,} user(s): removed {parts}", highlight=False)
    for line in result.kept:
        err_console.print(
            f"[yellow]not rewritten:[/] {escape(line)}", highlight=False, soft_wrap=True
        )


registry_app = typer.Typer(help="Inspect the MLflow model registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("history")
@_friendly
def registry_history(name: NameOpt = None, config: ConfigOpt = None) -> None:
    """Show the promotion log: every champion change, refusal and rollback, oldest first."""
    from lapse.registry import history

    cfg = load_config(config)
    events = history(cfg, name)
    table = Table(
        "#",
        "when (UTC)",
        "action",
        "version",
        "champion before",
        "by",
        "why",
        title=f"promotion log of {name or cfg.models.name}",
        title_justify="left",
    )
    for e in events:
        table.add_row(
            str(e.seq),
            e.at.replace("T", " ").removesuffix("+00:00"),
            e.action.replace("_", " "),
            f"v{e.version}",
            "" if e.previous is None else f"v{e.previous}",
            escape(e.by),
            escape(e.reason),
        )
    console.print(table)
    if not events:
        console.print("no entries yet: `lapse train` registers the first champion")


@config_app.command("show")
@_friendly
def config_show(config: ConfigOpt = None) -> None:
    """Print the resolved configuration as YAML, defaults filled in."""
    cfg = load_config(config)
    typer.echo(f"# resolved from {cfg.origin}; relative paths resolve against {cfg.base_dir}")
    typer.echo(dump_config(cfg), nl=False)


@config_app.command("init")
@_friendly
def config_init(
    events: EventsArg,
    out: Annotated[Path, typer.Option(help="Where to write the skeleton.")] = Path("lapse.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Inspect a sample of EVENTS and write a commented config skeleton."""
    from lapse.events import init_config

    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists; pass --force to overwrite", param_hint="--out")
    text = init_config(events)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise WriteFailed.from_os_error(out, exc) from None
    console.print(
        f"wrote {out}: sort the event names under 'roles', then run `lapse validate {events} --config {out}`"
    )


sinks_app = typer.Typer(help="Check the messaging-platform sinks.", no_args_is_help=True)
app.add_typer(sinks_app, name="sinks")


@sinks_app.command("check")
@_friendly
def sinks_check(
    sink: Annotated[
        str,
        typer.Option(
            "--sink",
            help="braze, klaviyo, customerio, segment, iterable, webhook or sql.",
            show_default=False,
        ),
    ],
    config: ConfigOpt = None,
) -> None:
    """Verify a sink's credentials and reachability with its cheapest harmless call."""
    from lapse.sinks import check_sink

    console.print(f"[green]ok:[/] {escape(check_sink(sink, load_config(config)))}")
