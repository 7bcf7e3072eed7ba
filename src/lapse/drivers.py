"""Stickiness drivers: which behaviors go with later retention, at similar earlier activity.

A *behavior* is an event type; a user *adopted* it at a cutoff ``T`` when they
did it at least once before ``T``. For each cutoff of a grid ending at ``as_of``
(the latest cutoff whose label window is observed), every eligible user's
retention (not churned in ``[T, T + horizon)``, from :mod:`lapse.labels`) is
compared between adopters and non-adopters of the *same stratum*: tenure
bucket x quartile of activity in the 28 days before ``T``. The per-stratum
differences in retention rate are pooled with Mantel-Haenszel (Cochran)
weights ``n1 n0 / (n1 + n0)``; the confidence interval is the normal one of
that weighted mean. Pairs from several cutoffs are pooled (a user may appear
once per cutoff), so the interval is somewhat narrower than a per-user one.

This is association, not proof of cause: adopters may differ from non-adopters
in ways the strata do not capture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import LapseError
from lapse.labels import activity_events, churn_labels, data_span

__all__ = ["CAVEAT", "DriversResult", "stickiness_drivers"]

CAVEAT = (
    "association, not proof of cause: adopters may differ from non-adopters in ways "
    "the strata (tenure, recent activity) do not capture"
)

_TENURE_EDGES = (30, 90, 180)  # days since the first event, bucket edges
_ACTIVITY_WINDOW = timedelta(days=28)


@dataclass(frozen=True)
class DriversResult:
    """The ranked behaviors (one row each) and what they were measured on."""

    table: pl.DataFrame
    as_of: datetime
    cutoffs: list[datetime]
    pairs: int
    caveat: str = CAVEAT


def stickiness_drivers(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    as_of: datetime | None = None,
    n_cutoffs: int = 4,
    every_days: int = 14,
    min_adopters: int = 30,
    confidence: float = 0.95,
    exclude: tuple[str, ...] = (),
) -> DriversResult:
    """Rank event types by the retention lift of adopting them; see the module docstring.

    ``table`` has ``behavior, adopters, non_adopters, retained_adopters,
    retained_non_adopters, lift, ci_low, ci_high, driver`` sorted by ``lift``
    (highest first); ``lift`` is the pooled difference in retention rate
    (adopters minus comparable non-adopters) and ``driver`` is true when the
    interval lies above zero. Behaviors with fewer than ``min_adopters``
    adopter pairs are left out, as are ``exclude`` and the roles that define
    activity (their use is the outcome, not a behavior).

    Raises
    ------
    LapseError
        ``as_of`` leaves no observed label window, or no user is eligible.
    """
    horizon = timedelta(days=config.labels.horizon_days)
    start, end = data_span(events)
    latest = (end - horizon).replace(hour=0, minute=0, second=0, microsecond=0)
    as_of = as_of or latest
    if as_of > latest:
        raise LapseError(
            f"--as-of {as_of:%Y-%m-%d}: its {horizon.days}-day label window runs past the end "
            f"of the data ({end:%Y-%m-%d}); use {latest:%Y-%m-%d} or earlier"
        )
    cutoffs = [
        c
        for c in (as_of - timedelta(days=every_days * i) for i in range(n_cutoffs))
        if c - start >= _ACTIVITY_WINDOW
    ]
    if not cutoffs:
        raise LapseError(f"--as-of {as_of:%Y-%m-%d} is less than 28 days after the first event")
    labels = churn_labels(events, cutoffs, config, data_end=end).with_columns(
        pl.col("user_id").cast(pl.String)
    )
    if labels.height == 0:
        raise LapseError(f"no user is eligible at {as_of:%Y-%m-%d}; check --as-of")
    ev = events.select(pl.col("user_id").cast(pl.String), "ts", pl.col("event").cast(pl.String))
    activity = activity_events(events, config).select(pl.col("user_id").cast(pl.String), "ts")
    skip = set(exclude) | set(_activity_event_names(config))
    rows = []
    for cutoff in cutoffs:
        before = ev.filter(pl.col("ts") < cutoff)
        first = before.group_by("user_id").agg(pl.col("ts").min().alias("_first"))
        recent = (
            activity.filter(pl.col("ts") < cutoff, pl.col("ts") >= cutoff - _ACTIVITY_WINDOW)
            .group_by("user_id")
            .agg(pl.len().alias("_recent"))
        )
        adopted = before.select("user_id", "event").unique()
        base = (
            labels.lazy()
            .filter(pl.col("cutoff") == cutoff)
            .join(first, on="user_id", how="left")
            .join(recent, on="user_id", how="left")
            .with_columns(
                pl.col("_recent").fill_null(0),
                ((pl.lit(cutoff) - pl.col("_first")).dt.total_days()).alias("_tenure"),
            )
            .with_columns(
                pl.sum_horizontal(pl.col("_tenure") >= e for e in _TENURE_EDGES).alias("_tb"),
                # quartile of recent activity (ties share the lower quartile)
                ((pl.col("_recent").rank("min") - 1) * 4 // pl.len()).alias("_ab"),
            )
            .select(
                "user_id",
                (~pl.col("churned")).alias("retained"),
                pl.concat_str(
                    pl.lit(f"{cutoff:%Y%m%d}"),
                    pl.col("_tb").cast(pl.String),
                    pl.col("_ab").cast(pl.String),
                    separator="|",
                ).alias("stratum"),
            )
        )
        rows.append((base, adopted))
    pairs = pl.concat([b for b, _ in rows]).collect()
    behaviors = (
        pl.concat(
            [
                b.select("user_id", "stratum")
                .join(a, on="user_id")
                .select("stratum", "user_id", "event")
                for b, a in rows
            ]
        )
        .collect()
        .filter(~pl.col("event").is_in(sorted(skip)))
    )
    z = _z(confidence)
    out = []
    for name in sorted(behaviors["event"].unique().to_list()):
        who = behaviors.filter(pl.col("event") == name).select("stratum", "user_id")
        marked = pairs.join(
            who.with_columns(pl.lit(True).alias("adopted")),
            on=["stratum", "user_id"],
            how="left",
        ).with_columns(pl.col("adopted").fill_null(False))
        row = _pooled(marked, z)
        if row is None or row["adopters"] < min_adopters:
            continue
        out.append({"behavior": name, **row})
    schema = {
        "behavior": pl.String,
        "adopters": pl.Int64,
        "non_adopters": pl.Int64,
        "retained_adopters": pl.Float64,
        "retained_non_adopters": pl.Float64,
        "lift": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
    }
    table = (
        pl.DataFrame(out, schema=schema)
        .with_columns((pl.col("ci_low") > 0).alias("driver"))
        .sort("lift", descending=True)
    )
    return DriversResult(table=table, as_of=as_of, cutoffs=cutoffs, pairs=pairs.height)


def _pooled(marked: pl.DataFrame, z: float) -> dict[str, float | int] | None:
    """Mantel-Haenszel risk difference of retention, adopters vs non-adopters, over strata."""
    s = (
        marked.group_by("stratum")
        .agg(
            n1=pl.col("adopted").sum(),
            n0=(~pl.col("adopted")).sum(),
            r1=pl.col("retained").filter(pl.col("adopted")).mean(),
            r0=pl.col("retained").filter(~pl.col("adopted")).mean(),
        )
        .filter(pl.col("n1") > 0, pl.col("n0") > 0)
        .with_columns(w=pl.col("n1") * pl.col("n0") / (pl.col("n1") + pl.col("n0")))
    )
    if s.height == 0:
        return None
    wsum = float(s["w"].sum())
    diff = float((s["w"] * (s["r1"] - s["r0"])).sum()) / wsum
    var = (
        float(
            (
                s["w"] ** 2
                * (s["r1"] * (1 - s["r1"]) / s["n1"] + s["r0"] * (1 - s["r0"]) / s["n0"])
            ).sum()
        )
        / wsum**2
    )
    # a floor on the variance: a stratum with 0% or 100% retention is not certain
    se = math.sqrt(max(var, 0.25 / float(s["n1"].sum())))
    n1, n0 = int(s["n1"].sum()), int(s["n0"].sum())
    return {
        "adopters": n1,
        "non_adopters": n0,
        "retained_adopters": float((s["n1"] * s["r1"]).sum()) / n1,
        "retained_non_adopters": float((s["n0"] * s["r0"]).sum()) / n0,
        "lift": diff,
        "ci_low": diff - z * se,
        "ci_high": diff + z * se,
    }


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _activity_event_names(config: LapseConfig) -> list[str]:
    return [e for role in config.labels.activity_roles for e in config.roles.of(role)]
