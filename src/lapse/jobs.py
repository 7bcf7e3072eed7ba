"""The CLI's smaller jobs (validate, features, train, demo, drivers, forget) as functions;
no parsing, no printing. The score run lives in :mod:`lapse.score.run`."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from lapse.config import ENGINES, Engine, LapseConfig
from lapse.datasets import generate, write
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import Ledger, sink_lock
from lapse.events import ValidationReport, load_attributes, validate_events, validate_with_links
from lapse.events import store as event_store
from lapse.exceptions import LapseError
from lapse.features import build
from lapse.files import atomic_path
from lapse.insights.drivers import (
    DriversResult,
    drivers_figure,
    encourage_yaml,
    stickiness_drivers,
)
from lapse.modeling.plots import save_figures
from lapse.registry import RegisteredVersion, example_files, log_training, open_store
from lapse.schema import utc_cutoff
from lapse.score.run import run_score
from lapse.score.steps import ScoreRunResult
from lapse.spark.engine import (
    build_features_spark,
    validated_events_spark,
    write_single_parquet,
)
from lapse.train.churn import TrainResult, train

if TYPE_CHECKING:
    from lapse.spark import SparkSession

__all__ = [
    "DemoResult",
    "FeaturesResult",
    "ForgetResult",
    "run_demo",
    "run_drivers",
    "run_features",
    "run_forget",
    "run_train",
    "run_validate",
]


def run_validate(
    events: Path,
    config: LapseConfig,
    *,
    rejects: Path | None = None,
    as_of: datetime | None = None,
) -> ValidationReport:
    """Validate an event file; the caller compares ``report.rejected_share`` to its limit."""
    _, report = validate_events(events, config, as_of=as_of, rejects_path=rejects)
    return report


def run_drivers(
    events: Path,
    config: LapseConfig,
    *,
    as_of: datetime | None = None,
    attributes: Path | None = None,
    out: Path | None = None,
    triggers: Path | None = None,
) -> DriversResult:
    """Rank behaviors by their association with later retention (:mod:`lapse.insights.drivers`).

    With ``out``, writes ``out/drivers.csv`` (the table) and ``out/drivers.png``
    (the forest plot); with ``triggers``, writes the ``encourage_<behavior>``
    YAML snippet there. The result's ``files`` names what was written, its
    ``figures["drivers"]`` is the forest plot.
    """
    kept, _, links = validate_with_links(events, config)
    attrs = load_attributes(config, attributes)
    result = stickiness_drivers(kept.lazy(), config, as_of=as_of, attributes=attrs, links=links)
    files: dict[str, Path] = {}
    figures = {"drivers": drivers_figure(result)}
    if out is not None:
        files["table"] = out / "drivers.csv"
        with atomic_path(files["table"]) as tmp:
            result.table.write_csv(tmp)
        files["plot"] = save_figures(figures, out)["drivers"]
    if triggers is not None:
        with atomic_path(triggers) as tmp:
            tmp.write_text(encourage_yaml(result, config), encoding="utf-8")
        files["triggers"] = triggers
    return replace(result, files=files, figures=figures)


@dataclass(frozen=True)
class FeaturesResult:
    """What `lapse features` wrote."""

    path: Path
    as_of: datetime
    users: int
    columns: int
    null_share: dict[str, float]
    validation: ValidationReport | None
    engine: Engine = "local"


def run_features(
    events: Path,
    config: LapseConfig,
    *,
    as_of: datetime,
    out: Path,
    attributes: Path | None = None,
    engine: Engine = "local",
    spark: SparkSession | None = None,
) -> FeaturesResult:
    """Build features as of ``as_of`` from an event file and write them to Parquet.

    ``engine="local"`` (default) reads, maps and validates the events with
    Polars on this machine; ``engine="spark"`` reads Parquet, Delta
    (``delta:PATH``) or a table (``table:NAME``) with Spark (``spark``, else the
    active or a new session), maps and validates it the same way and builds
    the same rows per user shard (:mod:`lapse.spark.engine`). Both write one file at ``out``.
    """
    as_of = utc_cutoff(as_of)
    attrs = load_attributes(config, attributes)
    if engine == "spark":
        checked = validated_events_spark(events, config, spark=spark)
        spark_report = checked.report(config, as_of=as_of)
        frame_spark = build_features_spark(
            checked.kept, as_of, config, spark=spark, attributes=attrs, links=checked.links
        )
        write_single_parquet(frame_spark, out)
        # counted from the file lazily: the driver never holds every user's row
        return _features_result(pl.scan_parquet(out), out, as_of, spark_report, engine)
    if engine != "local":
        raise LapseError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    kept, report, links = validate_with_links(events, config, as_of=as_of)
    frame = build(kept.lazy(), as_of, config, attributes=attrs, links=links)
    with atomic_path(out) as tmp:
        frame.write_parquet(tmp)
    return _features_result(frame.lazy(), out, as_of, report, engine)


def _features_result(
    frame: pl.LazyFrame,
    out: Path,
    as_of: datetime,
    report: ValidationReport | None,
    engine: Engine,
) -> FeaturesResult:
    counts = frame.select(pl.len().alias("\0rows"), pl.all().null_count()).collect()
    nulls = counts.row(0, named=True)
    height = nulls.pop("\0rows")
    share = {k: v / height for k, v in nulls.items() if v and height}
    return FeaturesResult(out, as_of, height, len(nulls) - 1, share, report, engine)


def run_train(
    events: Path,
    config: LapseConfig,
    *,
    out_dir: Path,
    truth_dir: Path | None = None,
    models_dir: Path | None = None,
    register: bool = True,
    until: datetime | None = None,
) -> tuple[TrainResult, RegisteredVersion | None]:
    """Train (churn race + replenishment, the latter in a child process on 2+ cores), then
    log the run and register the bundle in MLflow."""
    result = train(
        events,
        config,
        out_dir=out_dir,
        truth_dir=truth_dir,
        models_dir=models_dir,
        until=until,
        parallel=True,
        meanwhile=functools.partial(_open_store, config) if register else None,
    )
    if not register:
        return result, None
    return result, log_training(result, config, events_path=events)


def _open_store(config: LapseConfig) -> None:
    """MLflow imported and its store opened while the replenishment race finishes; a store
    that fails says so from :func:`log_training`, once the bundle is saved, as before."""
    with contextlib.suppress(LapseError):
        open_store(config)


@dataclass(frozen=True)
class DemoResult:
    """What `lapse demo` produced."""

    files: dict[str, Path]
    features: FeaturesResult
    training: TrainResult
    registered: RegisteredVersion | None
    scored: ScoreRunResult


def run_demo(
    config: LapseConfig,
    *,
    out_dir: Path,
    n_users: int = 2000,
    n_days: int = 180,
    seed: int = 0,
) -> DemoResult:
    """The whole job on synthetic data: generate, validate, features, train, register, score.

    Everything lands in ``out_dir``: the data, ``features.parquet``, the report
    folder ``report/``, the bundle under ``models/`` and the scores
    (``scores.parquet``, file sink); the run is logged and the bundle registered
    in the config's MLflow store (``./mlflow.db`` by default), and the score run
    uses the registered version (the local bundle with ``register: false``).
    """
    start = date(2026, 1, 1)
    files = write(generate(n_users=n_users, n_days=n_days, seed=seed, start=start), out_dir)
    # The cutoff is the midnight after the simulated period, as the nightly job would use;
    # building the features also validates the events (their report is the demo's).
    end = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=n_days)
    features = run_features(
        files["events"],
        config,
        as_of=end,
        out=out_dir / "features.parquet",
        attributes=files["users"] if config.attributes.static_features else None,
    )
    training, registered = run_train(
        files["events"],
        config,
        out_dir=out_dir / "report",
        truth_dir=out_dir,
        models_dir=out_dir / "models",
    )
    model = (
        f"models:/{registered.name}/{registered.version}"
        if registered is not None
        else str(training.bundle_path)
    )
    scored = run_score(
        files["events"], config, as_of=end, model=model, sink="file", out=out_dir / "scores.parquet"
    )
    return DemoResult(
        files=files, features=features, training=training, registered=registered, scored=scored
    )


@dataclass(frozen=True)
class ForgetResult:
    """Rows removed per place by `lapse forget`, and the files it knows of that may hold
    the users but cannot be rewritten (``kept``, one line each: where and what to do)."""

    users: int
    removed: dict[str, int]
    kept: list[str] = field(default_factory=list)


def run_forget(config: LapseConfig, user_ids: list[str]) -> ForgetResult:
    """Erase users from audit snapshots, outboxes, dead letters, the incremental runs'
    event stores and the run ledger; report the MLflow input examples holding them
    (:func:`lapse.registry.example_files`)."""
    ids = {str(u) for u in user_ids}
    trail = AuditTrail(config.resolve(config.audit.path))
    with contextlib.ExitStack() as locks:
        # every sink's lock: a run writing snapshots, outboxes or the store meanwhile
        # would put back what is erased (a sink never run has nothing to erase)
        for lock in sorted(trail.locks.glob("*.lock")):
            locks.enter_context(sink_lock(trail.locks, lock.stem, "lapse forget"))
        removed = trail.forget(ids)
        removed["event_store_rows"] = event_store.forget(trail.root, ids)
        if trail.ledger.exists():
            with Ledger(trail.ledger) as ledger:
                removed["ledger_rows"] = ledger.forget(sorted(ids))
    return ForgetResult(users=len(ids), removed=removed, kept=example_files(config, ids))
