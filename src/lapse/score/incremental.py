"""Incremental trigger runs: only the users with new events or whose triggers came due.

``lapse triggers run EVENTS --incremental`` evaluates the same triggers as the
nightly ``lapse score`` (the same bundle, features, churn scores, definitions
and cooldowns) for a few users only, so it can run every few minutes:

* **Watermark.** ``EVENTS`` is an append-only folder (or glob) of event files.
  The ledger (:class:`lapse.delivery.ledger.Ledger`) remembers, per sink and folder,
  every file processed with its size and mtime, the last ``as_of``, and a
  fingerprint of the model version and the trigger definitions. Files not in
  the watermark, or whose size or mtime changed (rewritten in place), are new;
  only their ``user_id`` column is read.
* **Next due.** For every user it evaluates, a run also stores the fired set
  (the triggers that fire, before cooldowns) and a *next due* instant: the
  first instant within ``incremental.horizon_days`` at which the fired set
  would differ if no new event arrived. It is found by evaluating the same
  triggers on the user's own events at future cutoffs
  (:meth:`ChurnBundle.prepare_many`: one roll-up, every cutoff): one a day
  finds the day; for a change within the first day, bisection over the
  instants where a fired set can step (an event's time plus whole days,
  midnight, the depletion estimate minus the lead time) and, should a
  continuous score move between them, over the microseconds left, finds the
  instant (a later change makes the user due the day before it), so
  time-driven triggers (usage decay, dropping activity, activation nudge,
  replenishment due) and event-driven ones (friction, milestones, streaks)
  need no classification. A user with no change in the horizon is due at its
  end and looks ahead again then. A trigger held back by its cooldown makes
  the user due on the day the cooldown ends.
* **A run** at ``as_of`` touches the users with events in new files plus the
  users whose next due is at or before ``as_of``, reads those users' history
  only (a ``user_id`` filter pushed into the scan), scores and evaluates them
  like ``score`` and delivers through the same path (suppression, control,
  frequency cap, delta sync, audit snapshot, ledger batches, dead letters,
  ``lapse score --resume``). The watermark and the states advance in one
  transaction after delivery; a run killed before that is simply done again.
* **Full runs.** Without ``--incremental``, on the first run, when the model
  version or the trigger definitions changed (the fingerprint), or when a
  processed file disappeared, every user is evaluated and the state rebuilt.

The stored fired sets therefore equal a full evaluation at the same ``as_of``,
whatever the runs' times of day (a change that steps and steps back within one
day of the daily look-ahead is not seen).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.ledger import Ledger, TriggerState
from lapse.events import new_event_users
from lapse.exceptions import LapseError
from lapse.modeling.bundle import ChurnBundle
from lapse.score.records import (
    depletion_days,
    fired_triggers,
    refills,
    risk_columns,
    trigger_features,
)
from lapse.triggers import Trigger

__all__ = ["Plan", "cooldown_due", "fingerprint", "next_due", "plan", "states"]

_SEP = "\x1f"


@dataclass(frozen=True)
class Plan:
    """Which users a trigger run evaluates, and why.

    ``full`` evaluates everyone (``reason`` says why); otherwise ``new_event_users``
    (events in ``new_files``) and ``due_users`` (next due at or before ``as_of``).
    """

    full: bool
    reason: str
    files: list[tuple[Path, int, int]]
    new_files: list[Path] = field(default_factory=list)
    new_event_users: frozenset[str] = frozenset()
    due_users: frozenset[str] = frozenset()

    @property
    def users(self) -> list[str]:
        """The touched users (incremental runs), sorted."""
        return sorted(self.new_event_users | self.due_users)


def fingerprint(model: str, version: str, config: LapseConfig) -> str:
    """What the stored fired sets depend on besides the events: the model and the trigger
    definitions (the run's ``triggers``, ``rules`` and ``milestones``)."""
    text = json.dumps(
        {
            "model": model,
            "version": version,
            "triggers": {k: v.model_dump(mode="json") for k, v in sorted(config.triggers.items())},
            "rules": config.rules.model_dump(mode="json"),
            "milestones": [m.model_dump(mode="json") for m in config.milestones],
            "horizon_days": config.incremental.horizon_days,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(
    ledger: Ledger,
    sink: str,
    source: str,
    files: list[tuple[Path, int, int]],
    as_of: datetime,
    fingerprint: str,
    config: LapseConfig,
    *,
    incremental: bool,
) -> Plan:
    """Compare the folder's files with the watermark and pick the users to evaluate.

    Raises
    ------
    LapseError
        ``as_of`` is before the watermark's (incremental runs move forward).
    """
    mark = ledger.watermark(sink, source)
    if not incremental:
        return Plan(True, "full evaluation asked for", files)
    if mark is None:
        return Plan(True, "first run for this folder and sink", files)
    if mark.fingerprint != fingerprint:
        return Plan(True, "the model version or the trigger definitions changed", files)
    if as_of < mark.as_of:
        raise LapseError(
            f"{source}: --as-of {as_of.isoformat()} is before the last run's "
            f"{mark.as_of.isoformat()}; incremental runs move forward, run without "
            "--incremental to evaluate everyone at an earlier date"
        )
    present = {str(f) for f, _, _ in files}
    if set(mark.files) - present:
        return Plan(True, "files processed before are gone (the folder is not append-only)", files)
    new = [f for f, size, mtime in files if mark.files.get(str(f)) != (size, mtime)]
    users = frozenset(new_event_users(new, config)) if new else frozenset()
    due = frozenset(ledger.due(sink, source, as_of))
    return Plan(False, "incremental", files, new, users, due)


def _key(column: str = "triggers") -> pl.Expr:
    """A fired set as one comparable string (order-free)."""
    return pl.col(column).list.sort().list.join(_SEP)


def next_due(
    bundle: ChurnBundle,
    events: pl.DataFrame,
    fired: pl.DataFrame,
    users: Sequence[str],
    as_of: datetime,
    config: LapseConfig,
    *,
    attributes: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """``user_id, next_due`` for each of ``users``, given ``fired`` (``user_id``, ``triggers``
    at ``as_of``; a user without a row, not eligible, fires nothing).

    The first instant after ``as_of`` within ``incremental.horizon_days`` at which the
    triggers that fire differ from ``fired``, judged on ``events`` alone (the users'
    events, including any already at or after ``as_of``); ``as_of + horizon`` when none.
    The days ``as_of + k`` find the first day with a change; within the first day the
    instant is found by bisection to the microsecond (windows are half-open, so the
    fired set is a step function of the cutoff and each step has an exact instant); a
    change on a later day ``k`` makes the user due at ``as_of + k - 1`` days, when
    that run looks ahead again, so no change is ever seen late.
    Users are looked at in chunks of ``incremental.chunk_users``.
    """
    horizon = config.incremental.horizon_days
    cutoffs = [as_of + timedelta(days=k) for k in range(1, horizon + 1)]
    end = as_of + timedelta(days=horizon)
    due_type = pl.Datetime("us", "UTC")
    schema: dict[str, pl.DataType] = {"user_id": pl.String(), "next_due": due_type}
    now = fired.select(pl.col("user_id").cast(pl.String), _key().alias("now"))
    everyone = pl.Series("user_id", sorted(set(users)), dtype=pl.String)
    grid = pl.DataFrame({"cutoff": cutoffs}).with_columns(pl.col("cutoff").cast(due_type))
    out = []
    size = config.incremental.chunk_users
    for start in range(0, len(everyone), size):
        chunk = everyone.slice(start, size)
        ev = events.lazy().filter(pl.col("user_id").cast(pl.String).is_in(chunk.implode()))
        pairs = pl.DataFrame({"user_id": chunk}).join(grid, how="cross")
        # the depletion instant as of now (the telemetry rule's does not move with time)
        depleted = refills(bundle, ev, as_of)
        later = _fired_at(bundle, ev, pairs, depleted, config, attributes)
        changed = (
            later.join(now, on="user_id", how="left")
            .filter(pl.col("then") != pl.col("now").fill_null(""))
            .group_by("user_id")
            .agg(pl.col("cutoff").min().alias("hi"))
        )
        # the instant only for a change within the first day; a later one makes the user
        # due the day before it, when that run looks ahead again (never late, less work)
        near = changed.filter(pl.col("hi") == cutoffs[0])
        exact = pl.concat(
            [
                _bisect(bundle, ev, near, now, as_of, depleted, config, attributes),
                changed.filter(pl.col("hi") > cutoffs[0]).select(
                    "user_id", (pl.col("hi") - pl.duration(days=1)).alias("next_due")
                ),
            ]
        )
        out.append(
            pl.DataFrame({"user_id": chunk})
            .join(exact, on="user_id", how="left")
            .select("user_id", pl.col("next_due").fill_null(pl.lit(end)).cast(due_type))
        )
    if not out:
        return pl.DataFrame(schema=schema)
    return pl.concat(out)


def _fired_at(
    bundle: ChurnBundle,
    events: pl.LazyFrame,
    pairs: pl.DataFrame,
    depleted: pl.DataFrame,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
) -> pl.DataFrame:
    """``pairs`` (``user_id, cutoff``) with ``then``: the fired set at that cutoff as one
    string (empty when the user is not eligible there); ``depleted``: the users'
    :func:`lapse.score.records.refills`."""
    cutoffs = pairs["cutoff"].unique().sort().to_list()
    frame = bundle.prepare_many(events, cutoffs, attributes=attributes)
    frame = frame.with_columns(pl.col("user_id").cast(pl.String)).join(
        pairs, on=["user_id", "cutoff"], how="semi"
    )
    if frame.height:
        extra = depletion_days(frame, depleted)
        built = trigger_features(bundle, config, events, cutoffs, frame.schema)
        if built is not None:
            extra = extra.join(built, on=["user_id", "cutoff"], how="left")
        got, _ = fired_triggers(
            bundle, frame, risk_columns(bundle, frame), config, attributes, extra
        )
        got = got.select("user_id", "cutoff", _key().alias("then"))
    else:
        got = pl.DataFrame(
            schema={"user_id": pl.String, "cutoff": pairs["cutoff"].dtype, "then": pl.String}
        )
    return pairs.join(got, on=["user_id", "cutoff"], how="left").with_columns(
        pl.col("then").fill_null("")
    )


def _bisect(
    bundle: ChurnBundle,
    events: pl.LazyFrame,
    changed: pl.DataFrame,
    now: pl.DataFrame,
    as_of: datetime,
    depleted: pl.DataFrame,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
) -> pl.DataFrame:
    """``user_id, next_due``: for each ``changed`` user (``hi``: the first day its fired
    set differs from ``now``), the first microsecond after the day before at which it does.

    A fired set moves at an event's time plus whole days (a window's edge, a day
    count), at midnight (calendar days) or when the depletion estimate comes within
    the lead time: bisection over those instants first, then, should a continuous
    score have moved it in between, over the microseconds left.
    """

    def probe(rows: pl.DataFrame) -> pl.DataFrame:
        then = _fired_at(
            bundle, events, rows.select("user_id", "cutoff"), depleted, config, attributes
        )
        return then.join(now, on="user_id", how="left").select(
            "user_id", (pl.col("then") != pl.col("now").fill_null("")).alias("moved")
        )

    lo = pl.max_horizontal(
        pl.col("hi") - pl.duration(days=1), pl.lit(as_of).dt.cast_time_unit("us")
    )
    state = changed.with_columns(lo.alias("lo"))
    steps = _instants(events, state, depleted, config)
    # bisection over each user's instants: i (-1: lo) has not moved, j has
    state = state.join(steps, on="user_id").with_columns(
        pl.lit(-1).alias("i"), (pl.col("at").list.len() - 1).alias("j")
    )
    while (open_ := state.filter(pl.col("j") - pl.col("i") > 1)).height:
        mid = open_.with_columns(((pl.col("i") + pl.col("j")) // 2).alias("m"))
        mid = mid.with_columns(pl.col("at").list.get(pl.col("m")).alias("cutoff"))
        moved = probe(mid).join(mid.select("user_id", "m"), on="user_id")
        state = (
            state.join(moved, on="user_id", how="left")
            .with_columns(
                pl.when(pl.col("moved").not_()).then("m").otherwise("i").alias("i"),
                pl.when(pl.col("moved")).then("m").otherwise("j").alias("j"),
            )
            .drop("moved", "m")
        )
    state = state.select(
        "user_id",
        pl.when(pl.col("i") >= 0)
        .then(pl.col("at").list.get(pl.col("i"), null_on_oob=True))
        .otherwise("lo")
        .alias("lo"),
        pl.col("at").list.get(pl.col("j")).alias("hi"),
    )
    # the step is at hi unless something continuous moved it between lo and hi
    us = pl.duration(microseconds=1)
    gap = state.filter(pl.col("hi") - pl.col("lo") > us).with_columns(
        (pl.col("hi") - us).alias("cutoff")
    )
    if gap.height:
        early = probe(gap).filter("moved").select("user_id")
        state = state.join(
            gap.join(early, on="user_id", how="semi").select(
                "user_id", pl.col("cutoff").alias("new_hi")
            ),
            on="user_id",
            how="left",
        ).select("user_id", "lo", pl.coalesce("new_hi", "hi").alias("hi"))
        state = state.with_columns(
            pl.when(pl.col("user_id").is_in(early["user_id"].implode()))
            .then("lo")
            .otherwise(pl.col("hi") - us)
            .alias("lo")
        )
    while (open_ := state.filter(pl.col("hi") - pl.col("lo") > us)).height:
        mid = open_.select(
            "user_id",
            (pl.col("lo") + (pl.col("hi") - pl.col("lo")) / 2).dt.truncate("1us").alias("cutoff"),
        )
        moved = probe(mid).join(mid, on="user_id")
        state = state.join(moved, on="user_id", how="left").select(
            "user_id",
            pl.when(pl.col("moved").not_()).then("cutoff").otherwise("lo").alias("lo"),
            pl.when(pl.col("moved")).then("cutoff").otherwise("hi").alias("hi"),
        )
    return state.select("user_id", pl.col("hi").alias("next_due"))


def _instants(
    events: pl.LazyFrame, state: pl.DataFrame, depleted: pl.DataFrame, config: LapseConfig
) -> pl.DataFrame:
    """``user_id, at``: the sorted instants in ``(lo, hi]`` where a user's fired set can
    step, and just after them (``ts < T`` and ``[T - W, T)`` move right after an edge)."""
    day = 86_400_000_000
    us = pl.duration(microseconds=1)
    bounds = state.select("user_id", "lo", "hi")
    ev = (
        events.select(pl.col("user_id").cast(pl.String), pl.col("ts").dt.cast_time_unit("us"))
        .collect()
        .join(bounds, on="user_id")
    )
    behind = (pl.col("lo") - pl.col("ts")).dt.total_microseconds()
    whole = pl.when(behind > 0).then(-(-behind // day)).otherwise(0)
    edge = pl.col("ts") + pl.duration(microseconds=whole * day)
    lead = timedelta(days=config.replenishment.lead_time_days)
    parts = [
        ev.select("user_id", edge.alias("at")),
        ev.select("user_id", (edge + pl.duration(days=1)).alias("at")),
        bounds.select(
            "user_id", (pl.col("lo").dt.truncate("1d") + pl.duration(days=1)).alias("at")
        ),
        depleted.select(
            pl.col("user_id").cast(pl.String), (pl.col("depletion_ts") - lead).alias("at")
        ),
    ]
    base = pl.concat([p.with_columns(pl.col("at").cast(pl.Datetime("us", "UTC"))) for p in parts])
    both = pl.concat([base, base.with_columns(pl.col("at") + us)])
    return (
        pl.concat([both, bounds.select("user_id", pl.col("hi").alias("at"))])
        .join(bounds, on="user_id")
        .filter((pl.col("at") > pl.col("lo")) & (pl.col("at") <= pl.col("hi")))
        .group_by("user_id")
        .agg(pl.col("at").unique().sort())
    )


def cooldown_due(
    fired: pl.DataFrame,
    sent: pl.DataFrame,
    last_fired: pl.DataFrame,
    definitions: Sequence[Trigger],
) -> pl.DataFrame:
    """``user_id, next_due``: 00:00 UTC of the day a trigger held back by its cooldown may go.

    ``fired`` is ``user_id, triggers`` before cooldowns, ``sent`` after them;
    ``last_fired`` is the ledger's ``trigger, user_id, last_fired``. Triggers that
    fire once ever never come due.
    """
    days = {t.emit: t.cooldown_days for t in definitions if t.cooldown_days}
    schema: dict[str, pl.DataType] = {"user_id": pl.String(), "next_due": pl.Datetime("us", "UTC")}
    if not days or fired.height == 0:
        return pl.DataFrame(schema=schema)
    held = (
        fired.select(pl.col("user_id").cast(pl.String), "triggers")
        .explode("triggers")
        .drop_nulls("triggers")
        .join(
            sent.select(pl.col("user_id").cast(pl.String), "triggers")
            .explode("triggers")
            .drop_nulls("triggers"),
            on=["user_id", "triggers"],
            how="anti",
        )
        .filter(pl.col("triggers").is_in(list(days)))
        .join(
            last_fired.select(
                pl.col("user_id").cast(pl.String),
                pl.col("trigger").alias("triggers"),
                pl.col("last_fired").cast(pl.Date),
            ),
            on=["user_id", "triggers"],
        )
    )
    ends = held.select(
        "user_id",
        (
            pl.col("last_fired")
            + pl.duration(days=pl.col("triggers").replace_strict(days, return_dtype=pl.Int64))
        ).alias("day"),
    )
    return (
        ends.group_by("user_id")
        .agg(pl.col("day").min())
        .select(
            "user_id",
            pl.col("day").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("next_due"),
        )
    )


def states(
    fired: pl.DataFrame, due: pl.DataFrame, users: Sequence[str], as_of: datetime
) -> list[TriggerState]:
    """One :class:`TriggerState` per user in ``users``: its fired set (empty when not
    eligible) and the earliest of its ``due`` rows (``as_of`` plus a day when none)."""
    fallback = as_of + timedelta(days=1)
    sets = fired.select(pl.col("user_id").cast(pl.String), "triggers")
    soonest = due.group_by("user_id").agg(pl.col("next_due").min())
    frame = (
        pl.DataFrame({"user_id": list(users)}, schema={"user_id": pl.String})
        .join(sets, on="user_id", how="left")
        .join(soonest, on="user_id", how="left")
    )
    return [
        TriggerState(
            user_id=u,
            fired=tuple(t or ()),
            evaluated_at=as_of,
            next_due=d if d is not None else fallback,
        )
        for u, t, d in frame.select("user_id", "triggers", "next_due").iter_rows()
    ]
