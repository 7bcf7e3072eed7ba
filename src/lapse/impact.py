"""`lapse impact`: did messaging move retention? Treated vs held-out control, per segment.

Every score run holds out ``control.share`` of each segment (see
:func:`lapse.scoring.control_mask`). For each run since a date whose label
window has closed, the outcome of every scored user (retained = not churned
within ``labels.horizon_days``, from :func:`lapse.labels.outcomes`) is compared
between the treated users and the control users of the same segment. The
difference carries a 95% confidence interval (normal approximation of the
difference of two proportions); users scored in several runs count once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from lapse.audit import AuditTrail
from lapse.config import LapseConfig
from lapse.events import validate_events
from lapse.exceptions import LapseError
from lapse.labels import data_span, outcomes

__all__ = ["ImpactResult", "impact"]

_Z95 = 1.959964


@dataclass(frozen=True)
class ImpactResult:
    """``table``: ``segment, treated, control, treated_retention, control_retention,
    lift, ci_low, ci_high`` (lift = treated minus control retention)."""

    table: pl.DataFrame
    runs: list[str]
    notes: list[str] = field(default_factory=list)


def impact(events: Path, config: LapseConfig, *, since: date) -> ImpactResult:
    """Compare later retention of treated and control users of runs since ``since``."""
    trail = AuditTrail(config.resolve(config.audit.path))
    snaps = trail.snapshots(since)
    if snaps.height == 0:
        raise LapseError(
            f"no score run since {since} in {trail.root / 'snapshots'}; run `lapse score` first"
        )
    kept, _ = validate_events(events, config)
    lazy = kept.lazy()
    end = data_span(lazy)[1]
    horizon = timedelta(days=config.labels.horizon_days)
    notes: list[str] = []
    rows = snaps.filter(~pl.col("suppressed")).select(
        "user_id",
        "score_run_id",
        "risk_segment",
        "control",
        pl.col("as_of").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("cutoff"),
    )
    open_runs = rows.filter(pl.col("cutoff") + horizon > end)["score_run_id"].unique().to_list()
    if open_runs:
        notes.append(
            f"{len(open_runs)} run(s) skipped: their {horizon.days}-day outcome window runs past "
            f"the end of the events ({end:%Y-%m-%d})"
        )
    labelled = rows.join(
        outcomes(lazy, rows.select("user_id", "cutoff").unique(), config, data_end=end),
        on=["user_id", "cutoff"],
        how="inner",
    )
    if labelled.height == 0:
        raise LapseError(
            "no scored user has a complete outcome window yet; run `lapse impact` once "
            f"{horizon.days} days of events after a score run are in {events}"
        )
    if not labelled["control"].any():
        notes.append("no control users in these runs: set control.share (e.g. 0.1) to measure")
    table = pl.concat(
        [
            _compare(labelled, "all"),
            *(
                _compare(labelled.filter(pl.col("risk_segment") == s), s)
                for s in ("high", "medium", "low")
                if (labelled["risk_segment"] == s).any()
            ),
        ]
    )
    runs = labelled["score_run_id"].unique().sort().to_list()
    return ImpactResult(table=table, runs=runs, notes=notes)


def _compare(rows: pl.DataFrame, segment: str) -> pl.DataFrame:
    def share(group: pl.DataFrame) -> tuple[int, float]:
        n = group.height
        return n, (float((~group["churned"]).mean()) if n else float("nan"))  # type: ignore[arg-type]

    nt, pt = share(rows.filter(~pl.col("control")))
    nc, pc = share(rows.filter(pl.col("control")))
    lift = pt - pc
    se = math.sqrt(pt * (1 - pt) / nt + pc * (1 - pc) / nc) if nt and nc else float("nan")
    return pl.DataFrame(
        {
            "segment": [segment],
            "treated": [nt],
            "control": [nc],
            "treated_retention": [pt],
            "control_retention": [pc],
            "lift": [lift],
            "ci_low": [lift - _Z95 * se],
            "ci_high": [lift + _Z95 * se],
        }
    )
