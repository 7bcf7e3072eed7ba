"""Composition of the parts into the jobs the CLI runs; no parsing, no printing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lapse.config import LapseConfig
from lapse.events import ValidationReport, validate_events

__all__ = ["DemoResult", "run_demo", "run_validate"]


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
class DemoResult:
    """What `lapse demo` produced."""

    files: dict[str, Path]
    report: ValidationReport


def run_demo(
    config: LapseConfig,
    *,
    out_dir: Path,
    n_users: int = 2000,
    n_days: int = 180,
    seed: int = 0,
) -> DemoResult:
    """Generate synthetic data into ``out_dir`` and validate it with ``config``."""
    from lapse.datasets import generate, write

    files = write(generate(n_users=n_users, n_days=n_days, seed=seed), out_dir)
    _, report = validate_events(
        files["events"], config, rejects_path=out_dir / "events.rejects.parquet"
    )
    return DemoResult(files=files, report=report)
