"""Resolved triggers: the built-ins plus the config's ``triggers`` section, compiled
to Polars, evaluated over feature rows, and filtered by cooldowns."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Final

import polars as pl

from lapse.exceptions import ConfigError
from lapse.triggers.expr import compile_condition
from lapse.triggers.presets import BUILTIN, DEFAULT_COOLDOWN, PRESETS, preset_when

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = [
    "SCORE_COLUMNS",
    "Trigger",
    "apply_cooldowns",
    "conditions",
    "evaluate",
    "resolve",
]

#: columns score time adds to the feature rows before triggers run
SCORE_COLUMNS: Final[Mapping[str, pl.DataType]] = {
    "churn_risk": pl.Float64(),
    "churn_risk_percentile": pl.Float64(),
    "risk_segment": pl.String(),
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED: Final = frozenset({"user_id", "cutoff", "triggers"})


@dataclass(frozen=True)
class Trigger:
    """One trigger ready to evaluate: its condition text, audience, cooldown and emitted id.

    ``cooldown_days`` ``None`` means once per user, ever; 0 means every run.
    """

    name: str
    when: str
    cooldown_days: int | None
    priority: int
    audience: str | None
    emit: str
    enabled: bool = True


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
    """Key columns, a boolean column per enabled trigger, and ``triggers``: fired ids in order."""
    keys = [c for c in ("user_id", "cutoff") if c in frame.columns]
    live = [t for t in triggers if t.enabled]
    exprs = conditions(live, frame.schema)
    flags = frame.select(*keys, *exprs.values())
    fired = pl.concat_list(
        [
            pl.when(pl.col(t.name)).then(pl.lit(t.emit)).otherwise(pl.lit(None, pl.String))
            for t in live
        ]
        or [pl.lit(None, pl.String)]
    ).list.drop_nulls()
    return flags.with_columns(fired.alias("triggers"))


def apply_cooldowns(
    records: pl.DataFrame,
    last_fired: pl.DataFrame,
    triggers: Sequence[Trigger],
    as_of: date,
) -> pl.Series:
    """``records["triggers"]`` without the ids still in their cooldown for that user.

    ``last_fired`` has ``trigger`` (the emitted id), ``user_id`` and ``last_fired``
    (a date). A trigger last fired on day D with a cooldown of C days may fire
    again from D + C on; one with no end fires once.
    """
    empty = pl.lit([], dtype=pl.List(pl.String))
    if records.height == 0 or last_fired.height == 0:
        return records["triggers"]
    forever = 10**9
    days = {t.emit: (forever if t.cooldown_days is None else t.cooldown_days) for t in triggers}
    exploded = (
        records.select(pl.int_range(pl.len()).alias("_row"), "user_id", "triggers")
        .explode("triggers")
        .drop_nulls("triggers")
        .join(
            last_fired.select(
                pl.col("user_id").cast(pl.String),
                pl.col("trigger").alias("triggers"),
                pl.col("last_fired").cast(pl.Date),
            ),
            on=["user_id", "triggers"],
            how="left",
            maintain_order="left",
        )
    )
    cooldown = pl.col("triggers").replace_strict(days, default=0, return_dtype=pl.Int64)
    since = (pl.lit(as_of) - pl.col("last_fired")).dt.total_days()
    kept = (
        exploded.filter(pl.col("last_fired").is_null() | (since >= cooldown))
        .group_by("_row", maintain_order=True)
        .agg("triggers")
    )
    out = (
        pl.DataFrame({"_row": pl.int_range(records.height, eager=True)})
        .join(kept, on="_row", how="left", maintain_order="left")
        .select(pl.col("triggers").fill_null(empty))
    )
    return out.to_series().alias("triggers")
