"""`lapse impact`: did messaging move retention? Treated vs held-out control, per segment.

Every score run holds out ``control.share`` of each segment (see
:func:`lapse.score.records.control_mask`). Only runs the ledger shows delivered
(``complete`` or ``partial``) count: a snapshot is written before its run sends
anything, so one of a run that was cut off, stopped or abandoned says nothing about
who was messaged (a note names how many were left out). For each run since a date whose label
window has closed, the outcome of every scored user (retained = not churned
within ``labels.horizon_days``, from :func:`lapse.labels.outcomes`) is compared
between the treated users and the control users of the same segment. The
difference carries a 95% confidence interval (normal approximation of the
difference of two proportions); users scored in several runs count once per run.
The ``all`` row is stratified by segment: each segment's difference weighted by
its share of the users (both groups), with the interval of that weighted sum, so
a control group that happens to hold more of one segment does not show an
effect where there is none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import Ledger
from lapse.events import validate_events
from lapse.exceptions import LapseError
from lapse.labels import data_span, outcomes

__all__ = ["ImpactResult", "compare", "impact"]

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
    notes: list[str] = []
    if snaps.height:
        snaps, left_out = _delivered_only(trail, snaps)
        if left_out:
            notes.append(
                f"{len(left_out)} run(s) left out: the ledger does not show them delivered "
                f"(cut off, stopped or abandoned; resume them to count them): {', '.join(left_out)}"
            )
    if snaps.height == 0:
        raise LapseError(
            f"no {'delivered ' if notes else ''}score run since {since} in "
            f"{trail.root / 'snapshots'}"
            + (f" ({notes[0]})" if notes else "")
            + "; run `lapse score` first"
        )
    kept, _ = validate_events(events, config)
    lazy = kept.lazy()
    end = data_span(lazy)[1]
    horizon = timedelta(days=config.labels.horizon_days)
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
    table = compare(labelled)
    runs = labelled["score_run_id"].unique().sort().to_list()
    return ImpactResult(table=table, runs=runs, notes=notes)


def _delivered_only(trail: AuditTrail, snaps: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """The snapshot rows of runs the ledger shows delivered, and the runs left out."""
    delivered: set[str] = set()
    if trail.ledger.exists():
        with Ledger(trail.ledger) as ledger:
            delivered = ledger.delivered_runs()
    runs = snaps["score_run_id"].unique().sort().to_list()
    left_out = [r for r in runs if r not in delivered]
    keep = pl.col("score_run_id").is_in(pl.Series(sorted(delivered), dtype=pl.String).implode())
    return snaps.filter(keep), left_out


def compare(rows: pl.DataFrame) -> pl.DataFrame:
    """The impact table of labelled rows (``risk_segment``, ``control``, ``churned``):
    ``all`` (stratified by segment), then one row per segment present."""
    segments = [
        _compare(rows.filter(pl.col("risk_segment") == s), s)
        for s in ("high", "medium", "low")
        if (rows["risk_segment"] == s).any()
    ]
    if not segments:
        return _compare(rows, "all")
    return pl.concat([_stratified(segments), *segments])


def _stratified(segments: list[pl.DataFrame]) -> pl.DataFrame:
    """The ``all`` row: segment retentions and differences weighted by segment size
    (over the segments with both groups), the interval from the weighted variances."""
    every = pl.concat(segments)
    both = every.filter((pl.col("treated") > 0) & (pl.col("control") > 0))
    size = (both["treated"] + both["control"]).cast(pl.Float64)
    w = (size / size.sum()).to_numpy() if both.height else np.zeros(0)

    def weighted(column: str) -> float:
        return float((w * both[column].to_numpy()).sum()) if both.height else float("nan")

    lift = weighted("lift")
    se = (
        math.sqrt(float(((w * (both["ci_high"] - both["lift"]).to_numpy() / _Z95) ** 2).sum()))
        if both.height
        else float("nan")
    )
    return pl.DataFrame(
        {
            "segment": ["all"],
            "treated": [int(every["treated"].sum())],
            "control": [int(every["control"].sum())],
            "treated_retention": [weighted("treated_retention")],
            "control_retention": [weighted("control_retention")],
            "lift": [lift],
            "ci_low": [lift - _Z95 * se],
            "ci_high": [lift + _Z95 * se],
        },
        schema=every.schema,
    )


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
