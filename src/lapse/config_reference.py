"""The configuration reference: every key of :class:`lapse.config.LapseConfig`.

The key reference in ``docs/configuration.md`` is generated from the pydantic models:
each key's type (with its bounds), its default (what an omitted key takes) and
its meaning (the field's ``description``). Fields without a description take
their meaning from ``_MEANINGS`` below; move a meaning into the field's
``Field(description=...)`` when you touch that field, and the test in
``tests/test_readme.py`` tells you to delete it here.

Regenerate that block with ``python tests/test_readme.py``.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lapse.config import LapseConfig

__all__ = ["ConfigKey", "config_keys", "markdown_reference"]

# Meanings of the fields that carry no description of their own (dotted key paths;
# ``[]`` marks the items of a list).
_MEANINGS: dict[str, str] = {
    "source.path": "default events input; the command-line argument wins",
    "source.format": "file format; auto picks by extension and sniffs unknown ones",
    "source.timestamp.format": "strftime pattern (also for integer dates like 20260131), iso, "
    "epoch_s, epoch_ms or epoch_us; null infers it from the values",
    "source.timestamp.timezone": "zone of naive timestamps; everything becomes UTC",
    "source.row_rules": "rules that rename rows' events, run in order before validation; "
    "the first match wins",
    "source.row_rules[].column": "source column tested (else the mapped canonical one)",
    "source.row_rules[].op": "comparison of the column with value",
    "source.row_rules[].value": "what the column is compared with (a list for in; none for "
    "is_null)",
    "source.row_rules[].event": "event name given to matching rows",
    "source.csv_separator": "field separator of CSV files",
    "source.future_tolerance_hours": "events later than the cutoff (or now) plus this are "
    "counted as from the future (and kept)",
    "attributes.path": "the per-user attributes table (Parquet, CSV, NDJSON); null: none",
    "attributes.format": "file format of the attributes table, as source.format",
    "roles.usage": "event names of product use (app opens, device sessions)",
    "roles.purchase": "event names of orders",
    "roles.aha": "event names of the activation (aha) moment",
    "roles.error": "event names of friction: errors, failures",
    "roles.setup_started": "event names of a started onboarding",
    "roles.setup_completed": "event names of a completed onboarding",
    "roles.consumption": "event names of consumption telemetry (quantity = units used)",
    "roles.cancel": "event names of subscription cancellations (contractual churn)",
    "roles.return": "event names of returns and refunds",
    "milestones": "counts of an event worth celebrating (the milestone trigger and features)",
    "milestones[].name": "the milestone's name in feature names (milestone_{name}_count)",
    "milestones[].event": "event name counted",
    "milestones[].every_n": "fires at every multiple of this count (or give at_counts)",
    "milestones[].at_counts": "fires at these counts (or give every_n)",
    "features.windows": "feature windows in days; 7, 14, 28 and 90 are always built too",
    "labels.kind": "non_contractual: churn = no activity in the horizon; contractual: a "
    "cancel event in it",
    "labels.horizon_days": "the label window [T, T + horizon) in days",
    "labels.activity_roles": "roles whose events count as activity (churn labels, eligibility)",
    "labels.eligibility_days": "look-back of eligibility: active",
    "labels.cutoff_every_days": "spacing of the cutoff grid (test = the latest complete "
    "cutoff); lapse train lowers it, with a note, when fewer than 8 training cutoffs fit",
    "labels.train_cutoffs": "training cutoffs before the validation cutoff (fewer when fewer "
    "fit, said in the report)",
    "models.name": "registered model name in MLflow and the bundle's file name",
    "models.random_state": "seed of every model in the race",
    "models.calibration": "calibrator of the selected model, fitted on the validation cutoff",
    "rules.activation_nudge_days": "activation_nudge: purchased this many days ago or more, "
    "no aha yet",
    "rules.friction_window_days": "friction_alert: errors counted over this window (one of "
    "the feature windows)",
    "rules.friction_min_errors": "friction_alert: fires at this many errors in the window",
    "rules.usage_decay_ratio": "usage_decay: usage in the last 14 days <= ratio x the 14 days "
    "before",
    "rules.dropping_activity_ratio": "dropping_activity: this week < ratio x the mean of the "
    "three prior weeks",
    "replenishment.enabled": "build episodes and race the survival models in lapse train",
    "replenishment.min_repeat_buyers": "repeat buyers a SKU needs to count as a consumable "
    "(consumables: auto)",
    "sinks.default": "the sink lapse score uses without --sink",
    "registry.tracking_uri": "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else "
    "sqlite:///mlflow.db beside the config (or in LAPSE_HOME)",
    "registry.experiment": "MLflow experiment of the training and review runs",
}


@dataclass(frozen=True)
class ConfigKey:
    """One leaf key of the configuration."""

    key: str
    type: str
    default: str
    meaning: str


_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    type(None): "null",
}


def _bounds(metadata: list[Any]) -> str:
    parts: list[str] = []
    for m in metadata:
        if isinstance(m, at.Gt):
            parts.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            parts.append(f">= {m.ge}")
        elif isinstance(m, at.Lt):
            parts.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            parts.append(f"<= {m.le}")
        elif isinstance(m, at.MinLen):
            parts.append("not empty")
        elif getattr(m, "pattern", None):
            parts.append(f"matching {m.pattern}")
    return ", ".join(parts)


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        inner = _type_name(args[0])
        extra = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        bounds = _bounds(extra)
        return f"{inner} {bounds}" if bounds else inner
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str | Path):
        return f"`{value}`" if str(value) else '`""`'
    return f"`{json.dumps(value, default=str)}`"


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _dict_value_model(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is dict:
        _, value = get_args(annotation)
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """``Model`` of a ``Model | None`` field (an optional block, e.g. ``source.sql``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        models = [
            a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if len(models) == 1 and type(None) in get_args(annotation):
            return models[0]
    return None


def _walk(model: type[BaseModel], prefix: str) -> list[ConfigKey]:
    keys: list[ConfigKey] = []
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _walk(annotation, key + ".")
            continue
        item = _list_item_model(annotation)
        named = _dict_value_model(annotation)
        optional = _optional_model(annotation)
        if optional:
            type_name = f"{{{', '.join(optional.model_fields)}}} or null"
        elif item:
            type_name = f"list of {{{', '.join(item.model_fields)}}}"
        elif named:
            type_name = f"mapping name -> {{{', '.join(named.model_fields)}}}"
        else:
            type_name = _type_name(annotation)
        bounds = _bounds(info.metadata)
        if bounds:
            type_name = f"{type_name} {bounds}"
        meaning = info.description or _MEANINGS.get(key, "")
        keys.append(ConfigKey(key, type_name, _default(info), meaning))
        if item is not None:
            keys += _walk(item, key + "[].")
        if named is not None:
            keys += _walk(named, key + ".<name>.")
        if optional is not None:
            keys += _walk(optional, key + ".")
    return keys


def config_keys() -> list[ConfigKey]:
    """Every leaf key of the configuration, in the models' order (list items as ``key[].x``)."""
    return _walk(LapseConfig, "")


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in doc.splitlines()).replace("``", "`")


def markdown_reference() -> str:
    """The configuration reference of ``docs/configuration.md``: one table per top-level
    section."""
    by_section: dict[str, list[ConfigKey]] = {}
    for k in config_keys():
        by_section.setdefault(k.key.split(".")[0].split("[")[0], []).append(k)
    lines = [
        "Generated from the pydantic models in `src/lapse/config.py`",
        "(`lapse.config_reference.markdown_reference()`); a test keeps it in step. A default",
        "is what a key takes when your file omits it; `configs/default.yaml` (the embedded",
        "fallback) sets the roles, milestones and a few more for the synthetic generator,",
        "and `lapse config show` prints what is in force. `key[].x` is the key `x` of each",
        "item of the list `key`, `key.<name>.x` the key `x` of each named entry of `key`.",
    ]
    for section, keys in by_section.items():
        info = LapseConfig.model_fields[section]
        model = info.annotation
        sub = model if isinstance(model, type) and issubclass(model, BaseModel) else None
        sub = sub or _list_item_model(model)
        lines += ["", f"### `{section}`", ""]
        if sub is not None and sub.__doc__:
            lines += [_summary(sub), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [
            f"| `{k.key}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.meaning)} |"
            for k in keys
        ]
    return "\n".join(lines)
