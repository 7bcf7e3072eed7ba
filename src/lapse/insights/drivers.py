"""Stickiness drivers: which behaviors go with later retention, at similar earlier activity.

A *behavior* is an event type, or a condition declared in the config's
``drivers.behaviors`` (the trigger language over feature and attribute names,
e.g. ``repeat_buyer: "order_count >= 2"``). A user *adopted* an event type at
a cutoff ``T`` when they did it at least once before ``T``, and a declared
behavior when its condition is true on their point-in-time feature row at
``T`` (:func:`lapse.features.build_many`: events before ``T`` only). For each
cutoff of a grid ending at ``as_of`` (the latest cutoff whose label window is
observed), every eligible user's retention (not churned in ``[T, T +
horizon)``, from :mod:`lapse.labels`) is compared between adopters and
non-adopters of the *same stratum*: tenure bucket x quartile of activity in
the 28 days before ``T``. The per-stratum differences in retention rate are
pooled with Mantel-Haenszel (Cochran) weights ``n1 n0 / (n1 + n0)``; the
confidence interval is the normal one of that weighted mean. Pairs from
several cutoffs are pooled (a user may appear once per cutoff), so the
interval is somewhat narrower than a per-user one. With identity links every
cutoff sees the ids of the links observed before it, and retention follows the
person (as in training, :mod:`lapse.labels.churn`).

This is association, not proof of cause: adopters may differ from non-adopters
in ways the strata do not capture.

:func:`drivers_figure` draws the table as a forest plot (a matplotlib
``Figure``; the backend is never changed), :func:`write_plot` saves it, and
:func:`encourage_snippet` turns the top drivers into ``encourage_<behavior>``
triggers that fire for users who have not adopted them.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from lapse.conditions import compile_condition
from lapse.config import LapseConfig
from lapse.events.identity import resolved
from lapse.exceptions import ConfigError, LapseError
from lapse.features import build_many
from lapse.files import save_figure
from lapse.labels import activity_events, churn_labels, data_span
from lapse.modeling.plots import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CAVEAT",
    "DriversResult",
    "drivers_figure",
    "encourage_snippet",
    "encourage_yaml",
    "stickiness_drivers",
    "write_plot",
]

CAVEAT = (
    "association, not proof of cause: adopters may differ from non-adopters in ways "
    "the strata (tenure, recent activity) do not capture"
)

_TENURE_EDGES = (30, 90, 180)  # days since the first event, bucket edges
_ACTIVITY_WINDOW = timedelta(days=28)
_SCHEMA: dict[str, pl.DataType] = {
    "behavior": pl.String(),
    "kind": pl.String(),
    "adopters": pl.Int64(),
    "non_adopters": pl.Int64(),
    "retained_adopters": pl.Float64(),
    "retained_non_adopters": pl.Float64(),
    "lift": pl.Float64(),
    "ci_low": pl.Float64(),
    "ci_high": pl.Float64(),
}


@dataclass(frozen=True)
class DriversResult:
    """The ranked behaviors (one row each) and what they were measured on.

    ``files`` names what :func:`lapse.jobs.run_drivers` wrote (``table``,
    ``plot``, ``triggers``), empty when nothing was written; ``figures`` the
    figures it drew (``drivers``, the forest plot of :func:`drivers_figure`).
    """

    table: pl.DataFrame
    as_of: datetime
    cutoffs: list[datetime]
    pairs: int
    confidence: float = 0.95
    caveat: str = CAVEAT
    files: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)


def stickiness_drivers(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    as_of: datetime | None = None,
    attributes: pl.DataFrame | None = None,
    n_cutoffs: int = 4,
    every_days: int = 14,
    min_adopters: int = 30,
    confidence: float = 0.95,
    exclude: tuple[str, ...] = (),
    links: pl.DataFrame | None = None,
) -> DriversResult:
    """Rank event types and declared behaviors by the retention lift of adopting them.

    See the module docstring for the method. ``table`` has ``behavior, kind,
    adopters, non_adopters, retained_adopters, retained_non_adopters, lift,
    ci_low, ci_high, driver`` sorted by ``lift`` (highest first); ``kind`` is
    ``event`` or ``condition`` (from ``drivers.behaviors``), ``lift`` is the
    pooled difference in retention rate (adopters minus comparable
    non-adopters) and ``driver`` is true when the interval lies above zero.
    Behaviors with fewer than ``min_adopters`` adopter pairs are left out, as
    are ``exclude`` and the event types of the roles that define activity
    (their use is the outcome, not a behavior). ``attributes`` feeds the
    ``attributes.static_features`` a declared condition may name. With identity
    ``links`` each cutoff sees the ids of the links observed before it (adoption,
    strata and feature rows) and retention follows the person, as in training.

    Raises
    ------
    ExprError
        A declared condition does not compile (the message names
        ``drivers.behaviors.<name>``, the position and the closest names).
    ConfigError
        A declared behavior has the name of an event type.
    LapseError
        ``as_of`` leaves no observed label window, or no user is eligible.
    """
    declared = config.drivers.behaviors
    conditions: dict[str, pl.Expr] = {}
    if declared:
        # the schema of the feature rows, from no events: a bad condition fails before any work
        schema = build_many(
            events.head(0),
            [datetime(2000, 1, 1, tzinfo=UTC)],
            config,
            attributes=None if attributes is None else attributes.head(0),
        ).schema
        for name, text in declared.items():
            expr = compile_condition(text, schema, where=f"drivers.behaviors.{name}")
            conditions[name] = expr.fill_null(False).alias(name)
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
    labels = churn_labels(events, cutoffs, config, data_end=end, links=links).with_columns(
        pl.col("user_id").cast(pl.String)
    )
    if labels.height == 0:
        raise LapseError(f"no user is eligible at {as_of:%Y-%m-%d}; check --as-of")
    skip = set(exclude) | set(_activity_event_names(config))
    bases, adopted = [], []
    for cutoff in cutoffs:
        known = resolved(events, links, cutoff)
        ev = known.select(pl.col("user_id").cast(pl.String), "ts", pl.col("event").cast(pl.String))
        activity = activity_events(known, config).select(pl.col("user_id").cast(pl.String), "ts")
        before = ev.filter(pl.col("ts") < cutoff)
        first = before.group_by("user_id").agg(pl.col("ts").min().alias("_first"))
        recent = (
            activity.filter(pl.col("ts") < cutoff, pl.col("ts") >= cutoff - _ACTIVITY_WINDOW)
            .group_by("user_id")
            .agg(pl.len().alias("_recent"))
        )
        adopted.append(
            before.select(
                "user_id", pl.lit(cutoff).alias("cutoff"), pl.col("event").alias("behavior")
            ).unique()
        )
        bases.append(
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
                pl.lit(cutoff).alias("cutoff"),
                (~pl.col("churned")).alias("retained"),
                pl.concat_str(
                    pl.lit(f"{cutoff:%Y%m%d}"),
                    pl.col("_tb").cast(pl.String),
                    pl.col("_ab").cast(pl.String),
                    separator="|",
                ).alias("stratum"),
            )
        )
    pairs = pl.concat(bases).collect()
    by_event = pl.concat(adopted).collect().filter(~pl.col("behavior").is_in(sorted(skip)))
    clash = sorted(set(declared) & set(by_event["behavior"].unique().to_list()))
    if clash:
        raise ConfigError(
            f"drivers.behaviors.{clash[0]}: an event type has this name; rename the behavior"
        )
    kinds = {"event": by_event}
    if conditions:
        feats = build_many(events, cutoffs, config, attributes=attributes, links=links)
        kinds["condition"] = (
            feats.select(pl.col("user_id").cast(pl.String), "cutoff", *conditions.values())
            .unpivot(index=["user_id", "cutoff"], variable_name="behavior", value_name="_on")
            .filter(pl.col("_on"))
            .select("user_id", pl.col("cutoff").cast(pairs.schema["cutoff"]), "behavior")
        )
    out = []
    z = _z(confidence)
    totals = pairs.group_by("stratum").agg(n=pl.len(), k=pl.col("retained").sum())
    for kind, who in kinds.items():
        counts = (
            pairs.join(who, on=["user_id", "cutoff"])
            .group_by("behavior", "stratum")
            .agg(n1=pl.len(), k1=pl.col("retained").sum())
            .join(totals, on="stratum")
        )
        for (name,), part in sorted(counts.partition_by("behavior", as_dict=True).items()):
            row = _pooled(part, z)
            if row is None or row["adopters"] < min_adopters:
                continue
            out.append({"behavior": name, "kind": kind, **row})
    table = (
        pl.DataFrame(out, schema=_SCHEMA)
        .with_columns((pl.col("ci_low") > 0).alias("driver"))
        .sort("lift", "behavior", descending=[True, False])
    )
    return DriversResult(
        table=table, as_of=as_of, cutoffs=cutoffs, pairs=pairs.height, confidence=confidence
    )


def _pooled(counts: pl.DataFrame, z: float) -> dict[str, float | int] | None:
    """Mantel-Haenszel risk difference of retention, adopters vs non-adopters, over strata.

    ``counts`` has per stratum ``n1``/``k1`` (adopters, retained adopters) and
    ``n``/``k`` (everyone, everyone retained).
    """
    s = (
        counts.with_columns(n0=pl.col("n") - pl.col("n1"), k0=pl.col("k") - pl.col("k1"))
        .filter(pl.col("n1") > 0, pl.col("n0") > 0)
        .with_columns(
            r1=pl.col("k1") / pl.col("n1"),
            r0=pl.col("k0") / pl.col("n0"),
            w=pl.col("n1") * pl.col("n0") / (pl.col("n1") + pl.col("n0")),
        )
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
        "retained_adopters": float(s["k1"].sum()) / n1,
        "retained_non_adopters": float(s["k0"].sum()) / n0,
        "lift": diff,
        "ci_low": diff - z * se,
        "ci_high": diff + z * se,
    }


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _activity_event_names(config: LapseConfig) -> list[str]:
    return [e for role in config.labels.activity_roles for e in config.roles.of(role)]


def drivers_figure(result: DriversResult) -> Figure:
    """The forest plot of ``result`` (a matplotlib ``Figure``; shown inline in a notebook).

    One row per behavior, highest lift on top: the lift (in percentage points)
    with its interval, drivers in green, declared conditions as squares and
    event types as dots, a line at zero, and the caveat in the caption.
    """
    from matplotlib.lines import Line2D

    rows = list(result.table.iter_rows(named=True))
    fig = new_figure((7.5, 1.6 + 0.38 * max(len(rows), 1)))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        color = "tab:green" if r["driver"] else "tab:gray"
        ax.errorbar(
            100 * r["lift"],
            y,
            xerr=[[100 * (r["lift"] - r["ci_low"])], [100 * (r["ci_high"] - r["lift"])]],
            fmt="s" if r["kind"] == "condition" else "o",
            color=color,
            ecolor=color,
            capsize=3,
            ms=6,
        )
    ax.axvline(0.0, color="k", lw=1)
    ax.set_yticks(range(len(rows)), [r["behavior"] for r in reversed(rows)])
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    level = f"{result.confidence:.0%}"
    ax.set(
        xlabel=f"retention lift, percentage points ({level} interval)",
        title=f"Stickiness drivers as of {result.as_of:%Y-%m-%d}",
    )
    ax.legend(
        handles=[
            Line2D([], [], color="tab:green", marker="o", ls="", label="driver (interval above 0)"),
            Line2D([], [], color="tab:gray", marker="o", ls="", label="not a driver"),
            Line2D([], [], color="k", marker="o", ls="", mfc="none", label="event type"),
            Line2D([], [], color="k", marker="s", ls="", mfc="none", label="declared condition"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
    )
    caption = (
        f"Lift: retention of adopters minus non-adopters of the same tenure and recent "
        f"activity, over {len(result.cutoffs)} cutoffs ({result.pairs:,} user-cutoffs). "
        f"Note: {result.caveat}."
    )
    fig.text(0.01, 0.0, textwrap.fill(caption, 120), ha="left", va="top", fontsize=8)
    return fig


def write_plot(result: DriversResult, path: Path) -> Path:
    """Write :func:`drivers_figure` of ``result`` to ``path`` (PNG)."""
    save_figure(drivers_figure(result), path)
    return path


def encourage_snippet(result: DriversResult, config: LapseConfig) -> dict[str, Any]:
    """Config entries for ``encourage_<behavior>`` triggers on the top drivers.

    The top ``drivers.encourage_top`` drivers (interval above zero) each get a
    trigger that fires for users who have not adopted the behavior: for a
    declared condition ``C``, ``not (C) or (C) is null``; for an event type,
    ``milestone_<m>_count == 0`` over a milestone counting that event before the
    cutoff: a configured one when there is one, else a count-only milestone
    (``at_counts: []``, so the ``milestone`` trigger never fires for it) added
    to ``milestones``. Merge both keys into the config (append the milestones).

    Returns
    -------
    dict
        ``{"milestones": [...], "triggers": {name: {"when", "cooldown_days"}}}``.
    """
    settings = config.drivers
    top = result.table.filter(pl.col("driver")).head(settings.encourage_top)
    counted = {m.event: m.name for m in config.milestones}
    taken = {m.name for m in config.milestones}
    milestones: list[dict[str, Any]] = []
    triggers: dict[str, dict[str, Any]] = {}
    for r in top.iter_rows(named=True):
        name = r["behavior"]
        if r["kind"] == "condition":
            cond = settings.behaviors[name]
            when, slug = f"not ({cond}) or ({cond}) is null", name
        else:
            slug = _slug(name)
            if name not in counted:
                counted[name] = _free(slug, taken)
                taken.add(counted[name])
                milestones.append({"name": counted[name], "event": name, "at_counts": []})
            when = f"milestone_{counted[name]}_count == 0"
        trigger = _free(f"encourage_{slug}", set(triggers))
        triggers[trigger] = {"when": when, "cooldown_days": settings.encourage_cooldown_days}
    return {"milestones": milestones, "triggers": triggers}


def encourage_yaml(result: DriversResult, config: LapseConfig) -> str:
    """:func:`encourage_snippet` as commented YAML, ready to merge into a config file."""
    snippet = encourage_snippet(result, config)
    head = [
        f"# encourage_<behavior> triggers from `lapse drivers` as of {result.as_of:%Y-%m-%d}:",
        "# each fires for users who have not adopted one of the top drivers.",
        f"# Note: {result.caveat}.",
        "# Merge into your config: append these milestones to `milestones` (at_counts: [] only",
        "# counts the event; the milestone trigger never fires for it) and add the triggers.",
    ]
    if not snippet["triggers"]:
        head.append("# No behavior's interval lies above zero: there is nothing to encourage.")
    body = yaml.safe_dump(snippet, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(head) + "\n" + body


def _slug(event: str) -> str:
    """An identifier from an event name (``Added Device`` -> ``added_device``)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", event).strip("_").lower()
    return slug if slug[:1].isalpha() else f"e_{slug}"


def _free(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... whichever is not in ``taken``."""
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    return out
