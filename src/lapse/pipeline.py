"""Composition of the parts into the jobs the CLI runs; no parsing, no printing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lapse.config import LapseConfig
from lapse.events import ValidationReport, load_attributes, validate_events

if TYPE_CHECKING:
    from lapse.registry import RegisteredVersion
    from lapse.training import TrainResult

__all__ = ["DemoResult", "FeaturesResult", "run_demo", "run_features", "run_train", "run_validate"]


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


@dataclass(frozen=True)
class FeaturesResult:
    """What `lapse features` wrote."""

    path: Path
    as_of: datetime
    users: int
    columns: int
    null_share: dict[str, float]
    validation: ValidationReport


def run_features(
    events: Path,
    config: LapseConfig,
    *,
    as_of: datetime,
    out: Path,
    attributes: Path | None = None,
) -> FeaturesResult:
    """Build features as of ``as_of`` from an event file and write them to Parquet."""
    from lapse.features import build

    kept, report = validate_events(events, config, as_of=as_of)
    frame = build(kept.lazy(), as_of, config, attributes=load_attributes(config, attributes))
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    nulls = frame.null_count().row(0, named=True)
    share = {k: v / frame.height for k, v in nulls.items() if v and frame.height}
    return FeaturesResult(out, as_of, frame.height, frame.width - 1, share, report)


def run_train(
    events: Path,
    config: LapseConfig,
    *,
    out_dir: Path,
    truth_dir: Path | None = None,
    models_dir: Path | None = None,
    register: bool = True,
) -> tuple[TrainResult, RegisteredVersion | None]:
    """Train (churn race + replenishment), then log the run and register the bundle in MLflow."""
    from lapse.training import train

    result = train(events, config, out_dir=out_dir, truth_dir=truth_dir, models_dir=models_dir)
    if not register:
        return result, None
    from lapse.registry import log_training

    return result, log_training(result, config, events_path=events)


@dataclass(frozen=True)
class DemoResult:
    """What `lapse demo` produced."""

    files: dict[str, Path]
    features: FeaturesResult
    training: TrainResult
    registered: RegisteredVersion | None


def run_demo(
    config: LapseConfig,
    *,
    out_dir: Path,
    n_users: int = 2000,
    n_days: int = 180,
    seed: int = 0,
) -> DemoResult:
    """Generate synthetic data, validate it, build features as of its end, race the models.

    Everything lands in ``out_dir``: the data, ``features.parquet``, the report
    folder ``report/`` and the bundle under ``models/``; the run is logged and
    the bundle registered in the config's MLflow store (``./mlflow.db`` by default).
    """
    from datetime import UTC, date, timedelta

    from lapse.datasets import generate, write

    start = date(2026, 1, 1)
    files = write(generate(n_users=n_users, n_days=n_days, seed=seed, start=start), out_dir)
    # The cutoff is the midnight after the simulated period, as the nightly job would use;
    # building the features also validates the events (their report is the demo's).
    features = run_features(
        files["events"],
        config,
        as_of=datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=n_days),
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
    return DemoResult(files=files, features=features, training=training, registered=registered)
