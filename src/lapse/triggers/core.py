"""Resolved triggers: the built-ins plus the config's ``triggers`` section, compiled
to Polars, evaluated over feature rows, and filtered by cooldowns."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Final

import polars as pl

from lapse.conditions import compile_condition, names_in, parse
from lapse.exceptions import ConfigError
from lapse.features.registry import windows_named
from lapse.triggers.presets import BUILTIN, DEFAULT_COOLDOWN, PRESETS, preset_when

if TYPE_CHECKING:
    from lapse.config import LapseConfig, Milestone

__all__ = [
    "SCORE_COLUMNS",
    "Trigger",
    "apply_cooldowns",
    "conditions",
    "evaluate",
    "for_run",
    "names_read",
    "resolve",
]

#: columns score time adds to the feature rows before triggers run (``days_to_depletion``:
#: days from the cutoff to the record's ``depletion_date`` estimate, the earliest prompt's)
SCORE_COLUMNS: Final[Mapping[str, pl.DataType]] = {
    "churn_risk": pl.Float64(),
    "churn_risk_percentile": pl.Float64(),
    "risk_segment": pl.String(),
    "days_to_depletion": pl.Float64(),
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED: Final = frozenset({"user_id", "cutoff", "triggers"})


@dataclass(frozen=True)
class Trigger:
    """One trigger ready to evaluate: its condition text, audience, cooldown and emitted id.

    ``cooldown_days`` ``None`` means once per user, ever; 0 means every run.
    ``milestones`` (the ``milestone`` preset's): each threshold of each milestone
    is celebrated once per user, ever (its own cooldown key, :func:`evaluate`).
    """

    name: str
    when: str
    cooldown_days: int | None
    priority: int
    audience: str | None
    emit: str
    enabled: bool = True
    milestones: tuple[Milestone, ...] = field(default=(), compare=False)


def for_run(model: LapseConfig, run: LapseConfig) -> LapseConfig:
    """The config a run's triggers resolve with: trigger definitions belong to the run.

    The model's roles, features and labels (what its feature rows are built
    with), with the run's ``rules``, ``triggers`` and ``milestones``, and the
    feature windows those triggers name (``rules.friction_window_days``, a
    ``usage_count_35d`` in a condition) added to the model's windows.
    """
    texts = [
        text
        for spec in run.triggers.values()
        for text in (spec.when, spec.audience)
        if isinstance(text, str)
    ]
    windows = set(model.features.windows) | windows_named(
        n for text in texts for n in names_in(parse(text))
    )
    if model.roles.error:
        windows.add(run.rules.friction_window_days)
    features = model.features.model_copy(update={"windows": sorted(windows)})
    return model.model_copy(
        update={
            "rules": run.rules,
            "triggers": run.triggers,
            "milestones": run.milestones,
            "features": features,
        }
    )


def names_read(trigger: Trigger) -> list[str]:
    """Column names a trigger's condition and audience read."""
    texts = [t for t in (trigger.when, trigger.audience) if t is not None]
    return [n for text in texts for n in names_in(parse(text))]


def resolve(config: LapseConfig, schema: Mapping[str, pl.DataType]) -> list[Trigger]:
    """The built-ins (in their order), then the config's other triggers, highest priority first.

    Disabled triggers are included (``enabled=False``) so the rules churn score
    keeps every built-in.

    Raises
    ------
    ConfigError
        A trigger name is not an identifier or is reserved, a trigger without
        ``when`` is no preset, or two triggers emit the same id.
    """
    specs = config.triggers
    names = list(BUILTIN) + [n for n in specs if n not in BUILTIN]
    out: list[Trigger] = []
    for name in names:
        spec = specs.get(name)
        where = f"triggers.{name}"
        if not _NAME.match(name) or name in _RESERVED:
            raise ConfigError(
                f"{where}: a trigger name is a letter then letters, digits or '_', and not "
                f"{', '.join(sorted(_RESERVED))}"
            )
        if spec is not None and spec.when is not None:
            when = spec.when
        elif name in PRESETS:
            when = preset_when(name, config, schema)
        else:
            raise ConfigError(
                f"{where}: give a condition in 'when' (it is not a preset; presets: "
                f"{', '.join(PRESETS)})"
            )
        cooldown: int | None = DEFAULT_COOLDOWN.get(name, 0)
        audience: str | None = None
        if spec is not None:
            if spec.cooldown_days == "forever":
                cooldown = None
            elif spec.cooldown_days is not None:
                cooldown = spec.cooldown_days
            if isinstance(spec.audience, list):
                audience = "risk_segment in [" + ", ".join(f'"{s}"' for s in spec.audience) + "]"
            else:
                audience = spec.audience
        out.append(
            Trigger(
                name=name,
                when=when,
                cooldown_days=cooldown,
                priority=spec.priority if spec else 0,
                audience=audience,
                emit=(spec.emit if spec and spec.emit else name),
                enabled=spec.enabled if spec else True,
                milestones=(
                    tuple(config.milestones)
                    if name == "milestone" and (spec is None or spec.when is None)
                    else ()
                ),
            )
        )
    emits: dict[str, str] = {}
    for t in out:
        if t.enabled and t.emit in emits:
            raise ConfigError(
                f"triggers.{t.name}: emits {t.emit!r} like triggers.{emits[t.emit]}; "
                "give each trigger its own emit"
            )
        emits[t.emit] = t.name
    return sorted(out, key=lambda t: -t.priority)


def conditions(
    triggers: Sequence[Trigger], schema: Mapping[str, pl.DataType], *, audience: bool = True
) -> dict[str, pl.Expr]:
    """Trigger name -> its compiled boolean expression (null counts as not fired).

    With ``audience`` the audience condition is joined to ``when``.
    """
    out: dict[str, pl.Expr] = {}
    for t in triggers:
        expr = compile_condition(t.when, schema, where=f"triggers.{t.name}.when")
        if audience and t.audience is not None:
            expr = expr & compile_condition(t.audience, schema, where=f"triggers.{t.name}.audience")
        out[t.name] = expr.fill_null(False).alias(t.name)
    return out


def evaluate(frame: pl.DataFrame, triggers: Sequence[Trigger]) -> pl.DataFrame:
    """Key columns, a boolean column per enabled trigger, ``triggers`` (fired ids in order)
    and ``cooldown_keys``: the ledger keys the fired triggers' cooldowns run on.

    A trigger's key is its emitted id; the ``milestone`` preset's also has one key
    per milestone crossed, ``<emit>:<milestone>:<threshold reached>`` (cooldown
    forever), so each threshold is celebrated once and the next one again.
    """
    keys = [c for c in ("user_id", "cutoff") if c in frame.columns]
    live = [t for t in triggers if t.enabled]
    exprs = conditions(live, frame.schema)
    none = pl.lit(None, pl.String)
    crossed = [
        pl.when(exprs[t.name] & pl.col(f"milestone_{m.name}_crossed_7d").fill_null(False))
        .then(pl.format(f"{t.emit}:{m.name}:{{}}", _threshold(m)))
        .otherwise(none)
        .alias(f"_crossed{i}")
        for i, (t, m) in enumerate((t, m) for t in live for m in t.milestones)
        if f"milestone_{m.name}_count" in frame.columns  # else its emitted id's cooldown only
    ]
    out = frame.select(*keys, *exprs.values(), *crossed).with_row_index("_row")
    # the fired ids: one list per distinct combination of conditions, not per row
    names = list(exprs)
    if names:
        fired = [pl.when(pl.col(t.name)).then(pl.lit(t.emit)).otherwise(none) for t in live]
        ids = pl.concat_list(fired).list.drop_nulls().alias("triggers")
        combos = out.select(names).unique().select(*names, ids)
        out = out.join(combos, on=names, how="left", maintain_order="left")
    else:
        out = out.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("triggers"))
    # the milestones' threshold keys join them, on the rows that crossed one
    keyed = [c.meta.output_name() for c in crossed]
    if not keyed:
        return out.select(*keys, *names, "triggers", pl.col("triggers").alias("cooldown_keys"))
    thresholds = out.filter(pl.any_horizontal(pl.col(keyed).is_not_null())).select(
        "_row", pl.concat_list("triggers", *keyed).list.drop_nulls().alias("_keys")
    )
    return out.join(thresholds, on="_row", how="left", maintain_order="left").select(
        *keys,
        *names,
        "triggers",
        pl.coalesce("_keys", "triggers").alias("cooldown_keys"),
    )


def _threshold(m: Milestone) -> pl.Expr:
    """The highest threshold of ``m`` its count has reached (null: none)."""
    count = pl.col(f"milestone_{m.name}_count")
    if m.every_n is not None:
        return (count // m.every_n) * m.every_n
    return pl.max_horizontal(
        pl.lit(None, pl.Int64), *(pl.when(count >= n).then(pl.lit(n)) for n in m.at_counts or [])
    )


def apply_cooldowns(
    records: pl.DataFrame,
    last_fired: pl.DataFrame,
    triggers: Sequence[Trigger],
    as_of: date,
) -> list[pl.Series]:
    """``records``' ``triggers`` and ``cooldown_keys`` without what is still in its cooldown.

    ``last_fired`` has ``trigger`` (a cooldown key: the emitted id, or a
    milestone threshold's key), ``user_id`` and ``last_fired`` (a date). A key
    last fired on day D with a cooldown of C days may fire again from D + C on;
    one with no end (a milestone threshold's, always) fires once. A trigger with
    milestone keys fires while one of them is new.
    """
    empty = pl.lit([], dtype=pl.List(pl.String))
    if records.height == 0 or last_fired.height == 0:
        return [records["triggers"], records["cooldown_keys"]]
    forever = 10**9
    days = {t.emit: (forever if t.cooldown_days is None else t.cooldown_days) for t in triggers}
    emit = pl.col("key").str.split(":").list.first()
    threshold = pl.col("key").str.contains(":", literal=True)
    cooldown = (
        pl.when(threshold)
        .then(pl.lit(forever, pl.Int64))
        .otherwise(emit.replace_strict(days, default=0, return_dtype=pl.Int64))
    )
    since = (pl.lit(as_of) - pl.col("last_fired")).dt.total_days()
    keys = (
        records.select(pl.int_range(pl.len()).alias("_row"), "user_id", "cooldown_keys")
        .explode("cooldown_keys")
        .drop_nulls("cooldown_keys")
        .rename({"cooldown_keys": "key"})
        .join(
            last_fired.select(
                pl.col("user_id").cast(pl.String),
                pl.col("trigger").alias("key"),
                pl.col("last_fired").cast(pl.Date),
            ),
            on=["user_id", "key"],
            how="left",
            maintain_order="left",
        )
        .with_columns(
            emit.alias("emit"),
            threshold.alias("threshold"),
            (pl.col("last_fired").is_null() | (since >= cooldown)).alias("ok"),
        )
    )
    kept = (
        keys.group_by("_row", "emit")
        .agg(
            (
                pl.col("ok").filter(~pl.col("threshold")).all()
                & (~pl.col("threshold").any() | (pl.col("ok") & pl.col("threshold")).any())
            ).alias("kept")
        )
        .filter("kept")
        .drop("kept")
    )
    rows = pl.DataFrame({"_row": pl.int_range(records.height, eager=True)})

    def listed(frame: pl.DataFrame, column: str) -> pl.Series:
        grouped = frame.group_by("_row", maintain_order=True).agg(column)
        out = rows.join(grouped, on="_row", how="left", maintain_order="left")
        return out.select(pl.col(column).fill_null(empty)).to_series()

    fired = (
        records.select(pl.int_range(pl.len()).alias("_row"), pl.col("triggers").alias("emit"))
        .explode("emit")
        .drop_nulls("emit")
        .join(kept, on=["_row", "emit"], how="semi", maintain_order="left")
    )
    sent_keys = keys.filter("ok").join(kept, on=["_row", "emit"], how="semi", maintain_order="left")
    return [
        listed(fired, "emit").alias("triggers"),
        listed(sent_keys, "key").alias("cooldown_keys"),
    ]
