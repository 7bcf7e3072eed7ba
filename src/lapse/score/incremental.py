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
  (the triggers that fire, before cooldowns) and a *next due* instant: no later
  than the first instant within ``incremental.horizon_days`` at which the fired
  set would differ if no new event arrived. It is found by evaluating the same
  triggers on the user's own events at future cutoffs (one roll-up, every
  cutoff): one a day finds the day; a change within the first day is placed in
  its :data:`SLOT` (the user is due at the slot's start, and a run before the
  change looks again), a later one makes the user due the day before it, so
  time-driven triggers (usage decay, dropping activity, activation nudge,
  replenishment due) and event-driven ones (friction, milestones, streaks) need
  no classification. When no trigger reads a churn score, the look-ahead builds
  only the features the triggers read (no model). A user with no change in the
  horizon is due at its end and looks ahead again then. A trigger held back by
  its cooldown makes the user due on the day the cooldown ends.
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
from typing import Final

import polars as pl

from lapse.config import LapseConfig
from lapse.delivery.ledger import Ledger, TriggerState
from lapse.events import new_event_users
from lapse.exceptions import LapseError
from lapse.features.registry import expand
from lapse.labels import eligible
from lapse.modeling.bundle import ChurnBundle
from lapse.score.records import (
    depletion_days,
    refills,
    risk_columns,
    trigger_definitions,
    trigger_features,
    trigger_rows,
)
from lapse.triggers import Trigger, conditions, for_run, names_read, resolve

__all__ = ["Plan", "cooldown_due", "fingerprint", "next_due", "plan", "states"]


@dataclass(frozen=True)
class Plan:
    """Which users a trigger run evaluates, and why.

    ``full`` evaluates everyone (``reason`` says why); otherwise ``new_event_users``
    (events in ``new_files``) and ``due_users`` (next due at or before ``as_of``),
    whose stored events are in the event store's ``parts``.
    """

    full: bool
    reason: str
    files: list[tuple[Path, int, int]]
    new_files: list[Path] = field(default_factory=list)
    new_event_users: frozenset[str] = frozenset()
    due_users: frozenset[str] = frozenset()
    parts: tuple[str, ...] = ()

    @property
    def users(self) -> list[str]:
        """The touched users (incremental runs), sorted."""
        return sorted(self.new_event_users | self.due_users)


def fingerprint(model: str, version: str, config: LapseConfig) -> str:
    """What the stored fired sets and events depend on besides the files: the model, the
    trigger definitions (the run's ``triggers``, ``rules`` and ``milestones``) and how
    the source maps onto events (``source``)."""
    text = json.dumps(
        {
            "model": model,
            "version": version,
            "triggers": {k: v.model_dump(mode="json") for k, v in sorted(config.triggers.items())},
            "rules": config.rules.model_dump(mode="json"),
            "milestones": [m.model_dump(mode="json") for m in config.milestones],
            "horizon_days": config.incremental.horizon_days,
            "source": config.source.model_dump(mode="json"),
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
        return Plan(
            True, "the model version, the trigger definitions or the source mapping changed", files
        )
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
    return Plan(False, "incremental", files, new, users, due, mark.parts)


def _flags(fired: Sequence[pl.Expr]) -> pl.Expr:
    """A fired set as one comparable string: a ``0`` or ``1`` per live trigger, in order."""
    one, zero = pl.lit("1"), pl.lit("0")
    return pl.concat_str([pl.when(f).then(one).otherwise(zero) for f in fired] or [pl.lit("")])


#: Within the first day a user's triggers are looked at every ``SLOT``: one whose fired set
#: changes in it is due at the start of the slot of the change (just after the run when
#: that is the first slot), so it is looked at again no later than the change.
SLOT: Final = timedelta(minutes=15)
#: Days of the look-ahead's first pass (the rest only for users with no change in them).
_WEEK: Final = 7
#: The columns only the churn model gives; a look-ahead whose triggers read none of them
#: (and no model input) builds just the features the triggers read.
_MODEL_COLUMNS: Final = frozenset({"churn_risk", "churn_risk_percentile", "risk_segment"})


def next_due(
    bundle: ChurnBundle,
    events: pl.DataFrame,
    fired: pl.DataFrame,
    users: Sequence[str],
    as_of: datetime,
    config: LapseConfig,
    *,
    attributes: pl.DataFrame | None = None,
    refilled: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """``user_id, next_due`` for each of ``users``, given ``fired`` (``user_id``, ``triggers``
    at ``as_of``; a user without a row, not eligible, fires nothing) and, when the run has
    them, the users' :func:`lapse.score.records.refills` as of ``as_of`` (``refilled``,
    the scoring's; else found here).

    When, within ``incremental.horizon_days`` after ``as_of``, the triggers that fire
    would first differ from ``fired``, judged on ``events`` alone (the users' events,
    including any already at or after ``as_of``); ``as_of + horizon`` when never.
    The days ``as_of + k`` find the first day with a change (the first week for every
    user, the rest for those with no change in it); a change on a later day
    ``k`` makes the user due at ``as_of + k - 1`` days, when that run looks ahead again;
    within the first day the :data:`SLOT` steps find the slot of the change, and the
    user is due at its start (never at or before ``as_of``). So no change is ever seen
    late; a user due early is evaluated again by the runs until the change happens.
    Users are looked at in chunks of ``incremental.chunk_users``.
    """
    horizon = config.incremental.horizon_days
    days = [as_of + timedelta(days=k) for k in range(1, horizon + 1)]
    slots = [as_of + k * SLOT for k in range(1, timedelta(days=1) // SLOT + 1)]
    end = as_of + timedelta(days=horizon)
    due_type = pl.Datetime("us", "UTC")
    schema: dict[str, pl.DataType] = {"user_id": pl.String(), "next_due": due_type}
    emits = [t.emit for t in trigger_definitions(bundle, config, {}) if t.enabled]
    model = _needs_model(bundle, config, attributes)
    listed = [pl.col("triggers").list.contains(pl.lit(e)).fill_null(False) for e in emits]
    now = fired.select(pl.col("user_id").cast(pl.String), _flags(listed).alias("now"))

    everyone = pl.Series("user_id", sorted(set(users)), dtype=pl.String)
    just_after = pl.lit(as_of + timedelta(microseconds=1)).dt.cast_time_unit("us")
    out = []
    size = config.incremental.chunk_users
    for start in range(0, len(everyone), size):
        chunk = everyone.slice(start, size)
        ev = events.filter(pl.col("user_id").cast(pl.String).is_in(chunk.implode()))
        # the depletion instant as of now (the telemetry rule's does not move with time)
        depleted = (
            refills(bundle, ev.lazy(), as_of)
            if refilled is None
            else refilled.filter(pl.col("user_id").is_in(chunk.implode()))
        )
        # the first week for everyone, the rest of the horizon for those without a change
        # in it (most change within days: the same first day, a fraction of the rows)
        changed = _first_change(
            bundle, ev, chunk, days[:_WEEK], now, emits, depleted, config, attributes, model
        )
        if len(days) > _WEEK:
            quiet = chunk.filter(~chunk.is_in(changed["user_id"].implode()))
            later = _first_change(
                bundle, ev, quiet, days[_WEEK:], now, emits, depleted, config, attributes, model
            )
            changed = pl.concat([changed, later])
        near = changed.filter(pl.col("hi") == days[0])["user_id"]
        # the same users over the first day's slots: as many rows as the days at most
        step = max(1, size * len(days) // len(slots))
        soon = [
            _first_change(
                bundle,
                ev,
                near.slice(i, step),
                slots,
                now,
                emits,
                depleted,
                config,
                attributes,
                model,
            )
            for i in range(0, len(near), step)
        ]
        exact = pl.concat(
            [
                *(
                    part.select(
                        "user_id", pl.max_horizontal(pl.col("hi") - SLOT, just_after).alias("due")
                    )
                    for part in soon
                ),
                changed.filter(pl.col("hi") > days[0]).select(
                    "user_id", (pl.col("hi") - pl.duration(days=1)).alias("due")
                ),
            ]
        )
        out.append(
            pl.DataFrame({"user_id": chunk})
            .join(exact, on="user_id", how="left")
            .select(
                "user_id", pl.col("due").fill_null(pl.lit(end)).cast(due_type).alias("next_due")
            )
        )
    if not out:
        return pl.DataFrame(schema=schema)
    return pl.concat(out)


def _first_change(
    bundle: ChurnBundle,
    events: pl.DataFrame,
    users: pl.Series,
    cutoffs: list[datetime],
    now: pl.DataFrame,
    emits: list[str],
    depleted: pl.DataFrame,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
    model: bool,
) -> pl.DataFrame:
    """``user_id, hi``: the first of ``cutoffs`` at which each of ``users`` fires other
    triggers than ``now`` says (:func:`_flags` of the live triggers ``emits``; users with
    no change left out; ``model``: :func:`_needs_model`)."""
    schema = {"user_id": pl.String(), "hi": pl.Datetime("us", "UTC")}
    if users.is_empty():
        return pl.DataFrame(schema=schema)
    grid = pl.DataFrame({"cutoff": cutoffs}).with_columns(
        pl.col("cutoff").cast(pl.Datetime("us", "UTC"))
    )
    pairs = pl.DataFrame({"user_id": users}).join(grid, how="cross")
    mine = events.filter(pl.col("user_id").cast(pl.String).is_in(users.implode())).lazy()
    later = _fired_at(bundle, mine, pairs, depleted, config, attributes, emits, model)
    nothing = "0" * len(emits)  # not eligible: fires nothing
    return (
        later.join(now, on="user_id", how="left")
        .filter(pl.col("then") != pl.col("now").fill_null(nothing))
        .group_by("user_id")
        .agg(pl.col("cutoff").min().alias("hi"))
        .cast(schema)  # type: ignore[arg-type]
    )


def _needs_model(bundle: ChurnBundle, config: LapseConfig, attributes: pl.DataFrame | None) -> bool:
    """Whether a live trigger reads the churn scores or a model input the feature
    registry does not build (then the look-ahead scores the users as ``score`` does)."""
    live = [t for t in trigger_definitions(bundle, config, {}) if t.enabled]
    have = set(expand(for_run(bundle.config, config))) | {"days_to_depletion"}
    have |= set(attributes.columns) if attributes is not None else set()
    read = {n for t in live for n in names_read(t)}
    return bool(read & _MODEL_COLUMNS) or not read <= have


def _fired_at(
    bundle: ChurnBundle,
    events: pl.LazyFrame,
    pairs: pl.DataFrame,
    depleted: pl.DataFrame,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
    emits: list[str],
    model: bool,
) -> pl.DataFrame:
    """``pairs`` (``user_id, cutoff``) with ``then``: the fired set at that cutoff as
    :func:`_flags` of the live triggers ``emits`` (all ``0`` when the user is not
    eligible there); ``depleted``: the users' :func:`lapse.score.records.refills`;
    ``model``: whether the triggers need the churn model's scores (:func:`_needs_model`).

    The triggers see what ``score`` gives them; when none reads a churn score (or a
    model input), the eligible rows get just the features the triggers read."""
    cutoffs = pairs["cutoff"].unique().sort().to_list()
    if model:
        frame = bundle.prepare_many(events, cutoffs, attributes=attributes)
        frame = frame.with_columns(pl.col("user_id").cast(pl.String))
    else:
        frame = eligible(events, cutoffs, bundle.config).with_columns(
            pl.col("user_id").cast(pl.String), pl.col("cutoff").cast(pl.Datetime("us", "UTC"))
        )
    frame = frame.join(pairs, on=["user_id", "cutoff"], how="semi")
    if frame.height:
        extra = depletion_days(frame, depleted)
        built = trigger_features(bundle, config, events, cutoffs, frame.schema)
        if built is not None:
            extra = extra.join(built, on=["user_id", "cutoff"], how="left")
        scores = risk_columns(bundle, frame) if model else frame.select("user_id")
        rows = trigger_rows(frame, scores, attributes, extra)
        # the conditions of bundle.triggers, without the lists of fired ids
        live = [t for t in resolve(for_run(bundle.config, config), rows.schema) if t.enabled]
        assert [t.emit for t in live] == emits, "the live triggers depend on the rows"
        exprs = conditions(live, rows.schema)
        got = rows.select("user_id", "cutoff", _flags(list(exprs.values())).alias("then"))
    else:
        got = pl.DataFrame(
            schema={"user_id": pl.String, "cutoff": pairs["cutoff"].dtype, "then": pl.String}
        )
    return pairs.join(got, on=["user_id", "cutoff"], how="left").with_columns(
        pl.col("then").fill_null("0" * len(emits))
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
