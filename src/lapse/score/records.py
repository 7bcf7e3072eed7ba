"""Scoring: events as of a date -> one record per eligible user (before any delivery).

Everything here sees events before ``as_of`` only (features, eligibility and
open replenishment episodes all cut there). The records carry the pinned
columns of :data:`lapse.sinks.base.RECORD_COLUMNS`, with ``reasons`` left empty
until :func:`with_reasons` fills them for the users who are actually sent.

Replenishment columns come from the open consumable episode with the earliest
prompt date: ``next_order_date`` is ``as_of`` plus the survival model's median
days to the next order; ``depletion_date`` is when the supply runs out by the
telemetry rule (units left / consumption rate) where consumption is measured,
else the predicted next order date; ``refill_prompt_date`` is the depletion
date minus ``replenishment.lead_time_days``, never before ``as_of``. The built-in
``replenishment_due`` reads the same estimate (``days_to_depletion``), so it fires
exactly for the records whose ``refill_prompt_date`` is the ``as_of`` day.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeGuard

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.events.readers import EventSource
from lapse.events.validate import canonical_events
from lapse.exceptions import LapseError
from lapse.features import build, build_many
from lapse.features.registry import expand
from lapse.labels import EXCLUSIONS, describe_exclusions, population
from lapse.labels.episodes import ANY_SKU
from lapse.modeling.bundle import ChurnBundle, listing
from lapse.modeling.drift import bin_counts, psi_from_counts
from lapse.parallel import in_order
from lapse.schema import run_day
from lapse.sinks.base import RECORD_COLUMNS, RECORD_SCHEMA
from lapse.triggers import SCORE_COLUMNS, Trigger, apply_cooldowns, for_run, names_read, resolve

__all__ = [
    "RECORDS_SCHEMA",
    "SHARDS_AT_ONCE",
    "SHARD_EVENTS",
    "ScoreResult",
    "Shard",
    "check_event_names",
    "compact_events",
    "control_mask",
    "delta_key",
    "depletion_days",
    "drift_counts",
    "drift_from_counts",
    "drift_warnings",
    "fired_triggers",
    "keep_reasons",
    "load_suppression",
    "model_age_warnings",
    "model_disagreements",
    "nobody_eligible",
    "population_counts",
    "refills",
    "risk_columns",
    "score_shard",
    "score_users",
    "summed_bins",
    "trigger_definitions",
    "trigger_features",
    "trigger_rows",
    "user_records",
    "user_shards",
    "wants_reasons",
    "who_was_scored",
    "with_reasons",
]

#: the records of a run: the pinned columns, ``control`` (holdout member) and
#: ``cooldown_keys`` (the ledger keys of the fired triggers' cooldowns, never sent)
RECORDS_SCHEMA: dict[str, pl.DataType] = {
    **RECORD_SCHEMA,
    "control": pl.Boolean(),
    "cooldown_keys": pl.List(pl.String()),
}


@dataclass
class ScoreResult:
    """Records (pinned columns plus ``control``), their feature rows, drift and warnings.

    ``fired`` holds ``user_id`` and ``triggers`` as evaluated, before cooldowns;
    ``definitions`` the resolved triggers (their cooldowns); ``population`` who
    was scored and who was not (:func:`population_counts`); ``refills`` the
    :func:`refills` of every user of the events (``None`` when a shard had nobody
    eligible, so they were not all found).
    """

    records: pl.DataFrame
    features: pl.DataFrame
    drift: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fired: pl.DataFrame | None = None
    definitions: list[Trigger] = field(default_factory=list)
    population: dict[str, int] = field(default_factory=dict)
    refills: pl.DataFrame | None = None


def refills(bundle: ChurnBundle, events: pl.LazyFrame, as_of: datetime) -> pl.DataFrame:
    """Per user: the open consumable episode with the earliest prompt date (the record's
    refill columns, and ``depletion_ts``, the instant they count from)."""
    empty = pl.DataFrame(
        schema={
            "user_id": pl.String,
            "refill_sku": pl.String,
            "next_order_date": pl.Date,
            "depletion_date": pl.Date,
            "refill_prompt_date": pl.Date,
            "depletion_ts": pl.Datetime("us", "UTC"),
        }
    )
    model = bundle.extras.get("replenishment")
    if model is None:
        return empty
    open_eps: pl.DataFrame = model.predict_open(events, as_of)
    if open_eps.height == 0:
        return empty
    t = as_of.astimezone(UTC)
    lead = timedelta(days=bundle.config.replenishment.lead_time_days)
    days = pl.duration(microseconds=(pl.col("supply_days_left") * 86_400e6).cast(pl.Int64))
    sku = (
        pl.col("sku").cast(pl.String).replace(ANY_SKU, None)  # "next order of anything"
        if "sku" in open_eps.columns
        else pl.lit(None, pl.String)
    )
    frame = open_eps.select(
        pl.col("user_id").cast(pl.String),
        sku.alias("refill_sku"),
        pl.col("depletion_date").alias("next_order_ts"),
        pl.coalesce(pl.lit(t) + days, pl.col("depletion_date")).alias("depletion_ts"),
    ).with_columns(pl.max_horizontal(pl.col("depletion_ts") - lead, pl.lit(t)).alias("prompt_ts"))
    return (
        frame.drop_nulls("prompt_ts")
        .sort("prompt_ts", "refill_sku", nulls_last=True)
        .unique("user_id", keep="first", maintain_order=True)
        .select(
            "user_id",
            "refill_sku",
            pl.col("next_order_ts").dt.date().alias("next_order_date"),
            pl.col("depletion_ts").dt.date().alias("depletion_date"),
            pl.col("prompt_ts").dt.date().alias("refill_prompt_date"),
            pl.col("depletion_ts").cast(pl.Datetime("us", "UTC")),
        )
    )


def depletion_days(rows: pl.DataFrame, refills: pl.DataFrame) -> pl.DataFrame:
    """``rows``' ``user_id, cutoff`` with ``days_to_depletion``: days from the cutoff to the
    record's depletion estimate (``refills``' ``depletion_ts``; null without one).

    The one estimate of depletion the record's dates and ``replenishment_due`` share: due
    when it is at most ``replenishment.lead_time_days`` away, which is exactly when
    ``refill_prompt_date`` is the cutoff's day.
    """
    span = pl.col("depletion_ts") - pl.col("cutoff")
    return (
        rows.select("user_id", "cutoff")
        .join(refills.select("user_id", "depletion_ts"), on="user_id", how="left")
        .select(
            "user_id",
            "cutoff",
            (span.dt.total_microseconds() / 86_400e6).alias("days_to_depletion"),
        )
    )


def control_mask(user_ids: pl.Series, share: float, salt: str) -> npt.NDArray[np.bool_]:
    """Holdout membership: a stable hash of salt and user below ``share``.

    The same user, salt and share always give the same answer, whatever else
    is in the run; raising the share only adds users to the group.

    Examples
    --------
    >>> ids = pl.Series([str(i) for i in range(10_000)])
    >>> round(float(control_mask(ids, 0.1, "s").mean()), 1)
    0.1
    """
    if share <= 0:
        return np.zeros(len(user_ids), dtype=np.bool_)
    scale = float(2**64)
    draws = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{salt}:{u}".encode(), digest_size=8).digest()) / scale
            for u in user_ids.cast(pl.String).to_list()
        ),
        dtype=np.float64,
        count=len(user_ids),
    )
    out: npt.NDArray[np.bool_] = draws < share
    return out


def delta_key() -> pl.Expr:
    """What must change for a delta-sync sink to get a user again.

    The segment, the fired triggers, the churn risk rounded to 0.01 and the
    three replenishment dates; other columns refresh when this changes or with
    ``lapse score --full``.
    """
    return pl.concat_str(
        pl.col("risk_segment"),
        pl.col("triggers").list.join(","),
        pl.col("churn_risk").round(2).cast(pl.String),
        *(
            pl.col(c).cast(pl.String).fill_null("")
            for c in ("refill_sku", "next_order_date", "depletion_date", "refill_prompt_date")
        ),
        separator="|",
        ignore_nulls=False,
    ).alias("delta_key")


def risk_columns(bundle: ChurnBundle, frame: pl.DataFrame) -> pl.DataFrame:
    """``user_id``, ``churn_risk``, ``churn_risk_percentile``, ``risk_segment`` per row.

    Every column depends on its own row and the bundle only, so the rows can be
    scored in any split (the Spark engine scores each partition with this).
    """
    risk = bundle.predict_proba(frame)
    return pl.DataFrame(
        {
            "user_id": frame["user_id"],
            "churn_risk": risk,
            "churn_risk_percentile": bundle.percentile(risk),
            "risk_segment": bundle.segments(risk),
        }
    )


def score_users(
    bundle: ChurnBundle,
    events: EventSource,
    as_of: datetime,
    config: LapseConfig,
    *,
    score_run_id: str,
    model_version: str,
    attributes: pl.DataFrame | None = None,
    last_fired: pl.DataFrame | None = None,
    subset: bool = False,
) -> ScoreResult:
    """Score every eligible user as of ``as_of``: risk, percentile, segment, triggers, refills.

    ``events`` are canonical events, or a path or source-shaped frame (Polars or
    pandas) read through ``config.source``
    (:func:`lapse.events.validate.canonical_events`).

    Features, eligibility, rules and segments follow the bundle's own config
    (what the model was trained with); ``config`` is the run's: its ``score``,
    ``control`` and ``triggers`` sections apply. Triggers see the feature rows,
    the user attributes and ``churn_risk``, ``churn_risk_percentile`` and
    ``risk_segment``. With ``last_fired`` (``trigger``, ``user_id``,
    ``last_fired`` date: what the ledger delivered before) a trigger still in
    its cooldown for a user is left out of that user's ``triggers``.

    Events of :func:`compact_events` are scored in shards of whole users
    (:func:`user_shards`, :func:`score_shard`), which bounds the working memory;
    the records are the same.

    ``subset`` says the events hold some users only (an incremental trigger run):
    no eligible user is then no error, and drift, which compares populations,
    is not measured.

    Raises
    ------
    LapseError
        The feature rows do not match the bundle's schema (a missing role or a
        changed dtype), or no user is eligible at ``as_of`` (the message says
        why, with counts: :func:`nobody_eligible`).
    """
    events = events if _is_compact(events) else canonical_events(events, config)
    warnings = model_age_warnings(bundle, as_of, config) + model_disagreements(bundle, config)
    shards = in_order(
        lambda shard: score_shard(
            bundle,
            shard,
            as_of,
            config,
            score_run_id=score_run_id,
            model_version=model_version,
            attributes=attributes,
            last_fired=last_fired,
            drift=not subset,
        ),
        user_shards(events),
        SHARDS_AT_ONCE,
    )
    counts = _summed_population([s.population for s in shards])
    scored = [s for s in shards if s.features.height]
    if not scored and subset:
        return ScoreResult(
            records=pl.DataFrame(schema=RECORDS_SCHEMA),
            features=shards[0].features,
            warnings=warnings,
            fired=pl.DataFrame(schema={"user_id": pl.String, "triggers": pl.List(pl.String)}),
            population=counts,
        )
    if not scored:
        span = events.lazy().select(pl.col("ts").min().alias("a"), pl.col("ts").max().alias("b"))
        first, last = span.collect().row(0)
        raise nobody_eligible(counts, bundle.config, as_of, first, last)
    drift = {} if subset else drift_from_counts(bundle, summed_bins([s.drift for s in scored]))
    warnings += drift_warnings(drift, config)
    return ScoreResult(
        records=pl.concat([s.records for s in scored]),
        features=pl.concat([s.features for s in scored]),
        drift=drift,
        warnings=warnings,
        fired=pl.concat([s.fired for s in scored if s.fired is not None]),
        definitions=scored[0].definitions,
        population=counts,
        refills=_all_refills(shards),
    )


def _all_refills(shards: Sequence[Shard]) -> pl.DataFrame | None:
    """The shards' :func:`refills` together; ``None`` unless every shard found its own."""
    found = [s.refills for s in shards]
    return None if any(r is None for r in found) else pl.concat([r for r in found if r is not None])


#: Events a shard of :func:`user_shards` holds at most (about; whole users): the feature
#: build's working memory is about that of the shard's events, times :data:`SHARDS_AT_ONCE`.
SHARD_EVENTS = 2_000_000

#: Shards :func:`score_users` scores at once (:func:`lapse.parallel.in_order`): one
#: shard's single-threaded parts (LightGBM's prediction, Python between Polars queries)
#: run beside the other's Polars work, so both cores stay busy (1M users: scoring 41-43 s
#: to 37-38 s). More would add working memory, not speed, on two cores.
SHARDS_AT_ONCE = 2


#: The columns :func:`compact_events` holds as codes: ``user_id`` as an Enum of the
#: sorted ids, ``event`` and ``sku`` as Categorical (4 bytes a row instead of 16).
_COMPACT = ("user_id", "event", "sku")


def compact_events(events: pl.DataFrame) -> None:
    """Turn canonical ``events`` compact in place: ``user_id``, ``event`` and ``sku`` as
    codes (41M events: 1.5 GB instead of 3 GB); :func:`score_users` scores such a frame
    shard by shard (:func:`user_shards`), each shard's events as canonical strings again.

    A column at a time, each string column freed as its codes replace it (when the caller
    holds the events in this frame only), so the events are held about once.
    """
    users = pl.Enum(events["user_id"].unique().drop_nulls().sort())
    for name in _COMPACT:
        column = events[name].cast(users if name == "user_id" else pl.Categorical())
        events.replace_column(events.get_column_index(name), column)


def _is_compact(events: EventSource) -> TypeGuard[pl.DataFrame]:
    return isinstance(events, pl.DataFrame) and isinstance(events.schema.get("user_id"), pl.Enum)


def user_shards(
    events: pl.DataFrame | pl.LazyFrame, *, rows: int | None = None
) -> Iterator[pl.LazyFrame]:
    """Canonical events in shards of whole users, in ``user_id`` order.

    Events of :func:`compact_events` come in shards of consecutive user ids of about
    ``rows`` (default :data:`SHARD_EVENTS`) events each (a slice when the events are
    sorted by user, else a filter);
    canonical events are one shard.
    Every record depends on its user's events only, so the shards' records are the
    records of all (the Spark engine scores its partitions the same way).
    """
    if not _is_compact(events):
        yield events.lazy()
        return
    code = events["user_id"].to_physical()
    top = code.max()
    users = int(top) + 1 if isinstance(top, int) else 0
    count = max(1, -(-events.height // (rows or SHARD_EVENTS)))
    edges = [users * i // count for i in range(count + 1)]
    ordered = code.is_sorted()
    at = (
        code.search_sorted(pl.Series(edges, dtype=code.dtype), side="left").to_list()
        if ordered
        else []
    )
    strings = [pl.col(c).cast(pl.String) for c in _COMPACT if c in events.columns]
    for i in range(count):
        if ordered:
            shard = events.slice(at[i], at[i + 1] - at[i])
        else:
            shard = events.filter(code.is_between(edges[i], edges[i + 1], closed="left"))
        yield shard.with_columns(strings).lazy()


@dataclass
class Shard:
    """:func:`score_shard` of one shard of users: :class:`ScoreResult`'s parts, with the
    population and drift bin counts, which add up across shards."""

    records: pl.DataFrame
    features: pl.DataFrame
    fired: pl.DataFrame | None
    definitions: list[Trigger]
    population: dict[str, int]
    drift: dict[str, list[int]]
    refills: pl.DataFrame | None = None


def score_shard(
    bundle: ChurnBundle,
    events: pl.LazyFrame,
    as_of: datetime,
    config: LapseConfig,
    *,
    score_run_id: str,
    model_version: str,
    attributes: pl.DataFrame | None = None,
    last_fired: pl.DataFrame | None = None,
    drift: bool = True,
) -> Shard:
    """The records of the eligible users of canonical ``events`` holding whole users (a
    shard of :func:`user_shards`, or a Spark partition), before reasons.

    An empty ``features`` frame says nobody here is eligible (``population`` says why).
    ``drift=False`` (a run of some users only) leaves the drift bin counts empty.

    Raises
    ------
    LapseError
        The feature rows do not match the bundle's schema.
    """
    people = population(events, [as_of], bundle.config)
    counts = population_counts(people)
    keep = people.filter(pl.col("excluded").is_null()).drop("excluded")
    frame = bundle.prepare(events, as_of, attributes=attributes, keep=keep)
    if frame.height == 0:
        return Shard(pl.DataFrame(schema=RECORDS_SCHEMA), frame, None, [], counts, {})
    bundle.check_schema(frame)
    frame = frame.with_columns(pl.col("user_id").cast(pl.String)).sort("user_id")
    refill = refills(bundle, events, as_of)
    records, fired, definitions = user_records(
        bundle,
        frame,
        events,
        as_of,
        config,
        score_run_id=score_run_id,
        model_version=model_version,
        attributes=attributes,
        last_fired=last_fired,
        refill=refill,
    )
    bins = drift_counts(bundle, frame, records["churn_risk"].to_numpy()) if drift else {}
    return Shard(records, frame, fired, definitions, counts, bins, refill)


def _summed_population(parts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """:func:`population_counts` of all shards from each shard's."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    out = {"customers": total["customers"], "eligible": total["eligible"]}
    return out | {r: total[r] for r in EXCLUSIONS if total[r]}


def summed_bins(parts: Sequence[Mapping[str, list[int]]]) -> dict[str, list[int]]:
    """:func:`drift_counts` of all shards (or Spark partitions) from each one's."""
    out: dict[str, list[int]] = {}
    for part in parts:
        for name, bins in part.items():
            have = out.setdefault(name, [0] * len(bins))
            out[name] = [a + b for a, b in zip(have, bins, strict=True)]
    return out


def population_counts(people: pl.DataFrame) -> dict[str, int]:
    """``customers`` (users with an event before the cutoff), ``eligible`` and one count
    per reason the others were left out, from :func:`lapse.labels.population` rows."""
    why = dict(people["excluded"].value_counts().iter_rows())
    out = {"customers": people.height, "eligible": int(why.pop(None, 0))}
    return out | {r: int(why[r]) for r in EXCLUSIONS if why.get(r)}


def who_was_scored(
    counts: Mapping[str, int], config: LapseConfig, as_of: datetime, rejected_rows: int = 0
) -> str:
    """``1,528 of 4,372 customers scored; 2,844 had no event of the activity roles ...``.

    ``counts`` are :func:`population_counts` (summed over shards), ``config`` the
    bundle's (its eligibility and roles decided), ``rejected_rows`` the event rows
    validation rejected (their users may be missing from the customers).
    """
    parts = [f"{counts.get('eligible', 0):,} of {counts.get('customers', 0):,} customers scored"]
    why = describe_exclusions(counts, config, as_of)
    if why:
        parts.append(why)
    if rejected_rows:
        rows = "row was" if rejected_rows == 1 else "rows were"
        parts.append(f"{rejected_rows:,} event {rows} rejected by validation")
    return "; ".join(parts)


def nobody_eligible(
    counts: Mapping[str, int],
    config: LapseConfig,
    as_of: datetime,
    first: datetime | None,
    last: datetime | None,
) -> LapseError:
    """The error of a run with no one to score, with the real cause and its counts."""
    day = f"{as_of:%Y-%m-%d}"
    span = (
        f"the events run from {first:%Y-%m-%d} to {last:%Y-%m-%d}"
        if first is not None and last is not None
        else "there are no events"
    )
    if not counts.get("customers"):
        return LapseError(f"no customer has an event before {day} ({span}); check --as-of")
    why = describe_exclusions(counts, config, as_of)
    return LapseError(
        f"0 of {counts['customers']:,} customers are eligible at {day} (labels.eligibility "
        f"{config.labels.eligibility!r}): {why}; {span}, check --as-of"
    )


def check_event_names(bundle: ChurnBundle, seen: Mapping[str, int], model: str) -> None:
    """Refuse a run whose events share no event name with the model's (another source's model).

    ``seen``: the run's kept rows per event name (``ValidationReport.events_per_name``).
    """
    names = bundle.event_names()
    if not seen or not names or set(names) & set(seen):
        return
    theirs = sorted(seen, key=lambda e: (-seen[e], e))
    raise LapseError(
        f"these events share no event name with {model}: it was trained on {listing(names)}; "
        f"these events have {listing(theirs)}; score events of the source it was trained on "
        "(or map their names onto its roles), or train a model on these"
    )


def model_age_warnings(bundle: ChurnBundle, as_of: datetime, config: LapseConfig) -> list[str]:
    """A warning when the bundle's data ends more than ``score.max_model_age_days`` before as_of."""
    age = (as_of - bundle.training_end).days
    if age <= config.score.max_model_age_days:
        return []
    return [
        f"model {bundle.name!r} was trained on data up to {bundle.training_end:%Y-%m-%d}, "
        f"{age} days before as_of (score.max_model_age_days is "
        f"{config.score.max_model_age_days}); retrain and promote a fresher model"
    ]


def drift_warnings(drift: dict[str, float], config: LapseConfig) -> list[str]:
    """A warning naming the columns whose PSI is above ``score.drift_threshold``."""
    high = {k: v for k, v in drift.items() if v > config.score.drift_threshold}
    if not high:
        return []
    return [
        "drift: population stability index above "
        f"{config.score.drift_threshold} for "
        + ", ".join(f"{k} ({v:.2f})" for k, v in sorted(high.items(), key=lambda kv: -kv[1]))
        + "; the population moved since training: check the data, then retrain"
    ]


def user_records(
    bundle: ChurnBundle,
    frame: pl.DataFrame,
    events: pl.LazyFrame,
    as_of: datetime,
    config: LapseConfig,
    *,
    score_run_id: str,
    model_version: str,
    attributes: pl.DataFrame | None = None,
    last_fired: pl.DataFrame | None = None,
    refill: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, list[Trigger]]:
    """The records (pinned columns plus ``control``) of prepared feature rows, the
    fired triggers before cooldowns (``user_id``, ``triggers``) and their definitions.

    ``frame`` is :meth:`ChurnBundle.prepare` of ``events``, schema-checked,
    ``user_id`` as strings, sorted by it. Every column of a record depends on
    its user's own rows, the bundle and the config only, so any split of the
    users by ``user_id`` (the Spark engine's partitions) gives the same records.
    ``refill``: :func:`refills` of ``events`` when the caller has it.
    """
    scores = risk_columns(bundle, frame)
    refill = refills(bundle, events, as_of) if refill is None else refill
    extra = depletion_days(frame, refill)
    built = trigger_features(bundle, config, events, [as_of], frame.schema)
    if built is not None:
        extra = extra.join(built, on=["user_id", "cutoff"], how="left", maintain_order="left")
    fired, definitions = fired_triggers(bundle, frame, scores, config, attributes, extra)
    records = (
        scores.join(fired, on="user_id", how="left", maintain_order="left")
        .join(refill, on="user_id", how="left", maintain_order="left")
        .with_columns(
            pl.lit(run_day(as_of)).alias("as_of"),
            pl.lit(score_run_id).alias("score_run_id"),
            pl.lit([], dtype=pl.List(pl.String)).alias("reasons"),
            pl.col("triggers").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.lit(bundle.name).alias("model_name"),
            pl.lit(model_version).alias("model_version"),
        )
        .select(
            *(pl.col(c).cast(RECORD_SCHEMA[c]) for c in RECORD_COLUMNS),
            pl.Series(
                "control",
                control_mask(frame["user_id"], config.control.share, config.control.salt),
            ),
            pl.col("cooldown_keys").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        )
    )
    if last_fired is not None:
        records = records.with_columns(
            apply_cooldowns(records, last_fired, definitions, run_day(as_of))
        )
    return records, fired, definitions


def trigger_definitions(
    bundle: ChurnBundle, config: LapseConfig, schema: Mapping[str, pl.DataType]
) -> list[Trigger]:
    """The run's trigger definitions (:func:`lapse.triggers.for_run`: the run config's
    ``rules``, ``triggers`` and ``milestones``) over rows of ``schema`` plus the
    features :func:`trigger_features` adds."""
    run = for_run(bundle.config, config)
    return resolve(run, {**expand(run), **SCORE_COLUMNS, **schema})


def trigger_features(
    bundle: ChurnBundle,
    config: LapseConfig,
    events: pl.LazyFrame,
    cutoffs: Sequence[datetime],
    have: Mapping[str, pl.DataType],
) -> pl.DataFrame | None:
    """``user_id``, ``cutoff`` and the features the run's triggers read that the model's
    rows (``have``) lack, or that the run defines otherwise (a milestone with other
    thresholds); ``None`` when the model's rows hold them all.

    Built from the feature registry with the run's milestones and windows, so a
    run's trigger never needs a retrain.
    """
    run = for_run(bundle.config, config)
    live = [t for t in trigger_definitions(bundle, config, have) if t.enabled]
    read = {n for t in live for n in names_read(t)}
    read |= {f"milestone_{m.name}_{s}" for t in live for m in t.milestones for s in _MS}
    theirs = {m.name: m for m in bundle.config.milestones}
    redefined = {
        f"milestone_{m.name}_{s}" for m in run.milestones if theirs.get(m.name) != m for s in _MS
    }
    registry = expand(run)
    want = sorted(n for n in read if n in registry and (n not in have or n in redefined))
    if not want:
        return None
    utc = pl.Datetime("us", "UTC")
    if len(cutoffs) == 1:
        rows = build(events, cutoffs[0], run).with_columns(pl.lit(cutoffs[0]).alias("cutoff"))
    else:
        rows = build_many(events, cutoffs, run, names=want)
    return rows.select(pl.col("user_id").cast(pl.String), pl.col("cutoff").cast(utc), *want)


_MS = ("count", "crossed_7d")


def model_disagreements(bundle: ChurnBundle, config: LapseConfig) -> list[str]:
    """One warning when the run config's model sections differ from the bundle's.

    Roles, features, labels and segments are the model's (its feature rows and
    scores follow the config it was trained with); triggers are the run's.
    """
    differ = [
        name
        for name in ("roles", "features", "labels", "segments")
        if getattr(config, name) != getattr(bundle.config, name)
    ]
    if not differ:
        return []
    return [
        f"the run config's {', '.join(differ)} differ from model {bundle.name!r}'s; the model "
        "scores with the ones it was trained with (triggers follow the run config): retrain "
        "to use the run's"
    ]


def fired_triggers(
    bundle: ChurnBundle,
    frame: pl.DataFrame,
    scores: pl.DataFrame,
    config: LapseConfig,
    attributes: pl.DataFrame | None,
    extra: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, list[Trigger]]:
    """Fired triggers per row (the run config's definitions), and the definitions.

    ``frame`` are feature rows (:meth:`ChurnBundle.prepare` or ``prepare_many``),
    ``scores`` their :func:`risk_columns`, row for row, ``extra`` the
    :func:`trigger_features` of the same rows. Returns ``user_id`` (and ``cutoff``
    when ``frame`` has it), ``triggers`` and ``cooldown_keys``, before any cooldown.
    """
    rows = trigger_rows(frame, scores, attributes, extra)
    definitions = trigger_definitions(bundle, config, rows.schema)
    keys: list[pl.Expr] = [pl.col("user_id").cast(pl.String)]
    if "cutoff" in rows.columns:
        keys.append(pl.col("cutoff"))
    fired = bundle.triggers(rows, config).select(*keys, "triggers", "cooldown_keys")
    return fired, definitions


def trigger_rows(
    frame: pl.DataFrame,
    scores: pl.DataFrame,
    attributes: pl.DataFrame | None,
    extra: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """What the triggers of :func:`fired_triggers` see: feature rows, their scores, the
    trigger features and depletion (``extra``, theirs win) and the user attributes."""
    rows = frame.with_columns(scores.drop("user_id"))
    if extra is not None:
        on = ["user_id", "cutoff"]
        rows = rows.drop([c for c in extra.columns if c not in on and c in rows.columns])
        rows = rows.join(extra, on=on, how="left", maintain_order="left")
    if attributes is not None:
        more = [c for c in attributes.columns if c not in rows.columns]
        if more:
            attrs = attributes.select(pl.col("user_id").cast(pl.String), *more)
            rows = rows.join(attrs, on="user_id", how="left", maintain_order="left")
    return rows


def drift_counts(
    bundle: ChurnBundle, frame: pl.DataFrame, risk: npt.NDArray[np.float64]
) -> dict[str, list[int]]:
    """Per drift column, the PSI bin counts of these rows (they add up across shards)."""
    out = {"churn_risk": bin_counts(bundle.score_reference, risk).tolist()}
    for name, ref in bundle.feature_reference.items():
        if name in frame.columns:
            values = frame[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()
            out[name] = bin_counts(ref, values).tolist()
    return out


def drift_from_counts(bundle: ChurnBundle, counts: dict[str, list[int]]) -> dict[str, float]:
    """The run's ``drift`` (PSI per column, rounded) from summed :func:`drift_counts`."""
    refs = {"churn_risk": bundle.score_reference, **bundle.feature_reference}
    out = {k: psi_from_counts(refs[k], v) for k, v in counts.items() if k in refs}
    return {k: round(v, 4) for k, v in out.items() if np.isfinite(v)}


def with_reasons(
    bundle: ChurnBundle,
    result: ScoreResult,
    rows: pl.Series | npt.NDArray[np.bool_],
    *,
    top: int = 3,
) -> pl.DataFrame:
    """The records with ``reasons`` filled for ``rows`` (a mask) that are not ``low`` or fired.

    Reasons come from the shipped model (:mod:`lapse.modeling.reasons`; for
    LightGBM, TreeSHAP values, costly), so only the users who are sent with
    something to say get them.
    """
    records = result.records
    want = wants_reasons(records, rows)
    if top == 0 or not want.any():
        return records
    idx = np.flatnonzero(want.to_numpy())
    explained = bundle.reasons(result.features[idx], top=top)["reasons"]
    at = pl.Series("_at", idx, dtype=pl.UInt32)
    filled = (
        records.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_at"), "reasons")
        .join(pl.DataFrame([at, explained.alias("_new")]), on="_at", how="left")
        .sort("_at")
        .select(pl.coalesce("_new", "reasons").alias("reasons"))
    )
    return records.with_columns(filled)


def wants_reasons(records: pl.DataFrame, rows: pl.Series | npt.NDArray[np.bool_]) -> pl.Series:
    """Which of ``rows`` (a mask over ``records``) get reasons: those not ``low`` or that
    fired a trigger (the others have nothing a message would say)."""
    return (
        pl.Series(rows, dtype=pl.Boolean)
        & ((records["risk_segment"] != "low") | (records["triggers"].list.len() > 0))
    ).fill_null(False)


def keep_reasons(records: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    """``records`` whose ``reasons``, computed ahead for more users (the Spark engine's
    executors explain everyone :func:`wants_reasons` could pick), stay for the ``rows``
    :func:`with_reasons` would explain and are emptied for the others."""
    empty = pl.lit([], dtype=pl.List(pl.String))
    keep = wants_reasons(records, rows)
    return records.with_columns(pl.when(keep).then("reasons").otherwise(empty).alias("reasons"))


def load_suppression(config: LapseConfig, attributes: pl.DataFrame | None) -> set[str]:
    """Users never sent: flagged ``score.do_not_contact`` in attributes, or in the suppression file."""
    out: set[str] = set()
    flag = config.score.do_not_contact
    if attributes is not None and flag and flag in attributes.columns:
        col = attributes[flag]
        if col.dtype == pl.String:
            col = col.str.to_lowercase().is_in(["true", "1", "yes", "y", "t"])
        ids = attributes.filter(col.cast(pl.Boolean).fill_null(False))["user_id"]
        out.update(ids.cast(pl.String).to_list())
    path = config.score.suppression_file
    if path is not None:
        out.update(_read_ids(config.resolve(path)))
    return out


def _read_ids(path: Path) -> list[str]:
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            frame = pl.read_csv(path, infer_schema=False)
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            return [s.strip() for s in lines if s.strip() and not s.startswith("#")]
    except FileNotFoundError:
        raise LapseError(f"score.suppression_file {path}: file not found") from None
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise LapseError(f"score.suppression_file {path}: cannot read it: {exc}") from None
    if "user_id" not in frame.columns:
        raise LapseError(
            f"score.suppression_file {path}: needs a user_id column, found {frame.columns}"
        )
    return frame["user_id"].drop_nulls().cast(pl.String).to_list()
