"""Typed configuration: one YAML file, validated once at the edge, passed down.

``load_config(None)`` returns the embedded default (``lapse/default.yaml``,
identical to ``configs/default.yaml``). A user's file is complete in itself:
sections it omits take the model defaults below, which are generic (no event
names), so a transaction table never inherits the synthetic generator's roles.

Relative paths resolve against the config file's folder, or against
``LAPSE_HOME`` when that is set, never against the current directory.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from lapse.conditions import parse
from lapse.exceptions import ConfigError, ExprError
from lapse.schema import EVENT_COLUMNS, ORDER_ID, ROLES

__all__ = [
    "ENGINES",
    "AttributesConfig",
    "AuditConfig",
    "BrazeConfig",
    "ControlConfig",
    "CustomerioConfig",
    "DeliveryConfig",
    "DriversConfig",
    "Engine",
    "FeaturesConfig",
    "FileSinkConfig",
    "FrequencyCap",
    "IdentitiesConfig",
    "IncrementalConfig",
    "IterableConfig",
    "KlaviyoConfig",
    "LabelsConfig",
    "LapseConfig",
    "Milestone",
    "ModelsConfig",
    "RegistryConfig",
    "ReplenishmentConfig",
    "Roles",
    "RowRule",
    "RulesConfig",
    "ScoreConfig",
    "SegmentConfig",
    "SegmentsConfig",
    "SinksConfig",
    "SourceConfig",
    "SqlSinkConfig",
    "SqlSourceConfig",
    "TimestampSpec",
    "TriggerSpec",
    "WebhookConfig",
    "dump_config",
    "load_config",
]

DEFAULT_CONFIG_NAME = "default.yaml"

#: Where a job computes: ``local`` (Polars, this machine) or ``spark`` (:mod:`lapse.spark`).
Engine = Literal["local", "spark"]
ENGINES: tuple[Engine, ...] = ("local", "spark")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TimestampSpec(_Section):
    """How the source's timestamp column is parsed.

    ``format`` is a strftime pattern (``"%Y%m%d"``, also for integer dates),
    ``"iso"`` (ISO 8601, offsets honoured), ``"epoch_s"``, ``"epoch_ms"`` or
    ``"epoch_us"``; ``None`` infers it from the column's dtype and values.
    ``timezone`` is the zone of naive stamps; everything ends up in UTC.
    """

    format: str | None = None
    timezone: str = "UTC"


RuleOp = Literal["starts_with", "eq", "ne", "lt", "le", "gt", "ge", "is_null", "in"]


class RowRule(_Section):
    """Rows where ``column <op> value`` holds get the event name ``event``.

    Example: ``{column: InvoiceNo, op: starts_with, value: "C", event: return}``.
    Rules run in order before validation; the first matching rule wins.
    """

    column: str
    op: RuleOp
    value: str | float | list[str | float] | None = None
    event: str

    @model_validator(mode="after")
    def _value_fits_op(self) -> RowRule:
        if self.op == "is_null":
            if self.value is not None:
                raise ValueError("op 'is_null' takes no value")
        elif self.op == "in":
            if not isinstance(self.value, list):
                raise ValueError("op 'in' needs a list value")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a single value")
        if self.op == "starts_with" and not isinstance(self.value, str):
            raise ValueError("op 'starts_with' needs a string value")
        return self


FileFormat = Literal["auto", "parquet", "csv", "ndjson", "segment"]
SourceFormat = Literal["auto", "parquet", "csv", "ndjson", "segment", "sql", "duckdb", "delta"]

#: Formats read through a database or table library (``lapse.events.database``), not files.
DATABASE_FORMATS: tuple[str, ...] = ("sql", "duckdb", "delta")


class SqlSourceConfig(_Section):
    """A table or query in PostgreSQL (``format: sql``) or a DuckDB file (``format: duckdb``).

    The connection URI of ``format: sql`` is read from the environment variable
    named by ``uri_env``; it is never written in the config and never logged.
    """

    uri_env: str = Field(
        default="LAPSE_EVENTS_DB_URI",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the connection URI (format sql), e.g. "
        "postgresql://user:password@host:5432/db",
    )
    table: str | None = Field(
        default=None, min_length=1, description="table to read, optionally schema.table"
    )
    query: str | None = Field(
        default=None,
        min_length=1,
        description="a SELECT to read instead of a table; the time window is applied around it",
    )
    max_window_days: int | None = Field(
        default=None,
        gt=0,
        description="with a cutoff, read only ts >= as_of - this many days; null reads all "
        "history before the cutoff (tenure and first-purchase features need it)",
    )
    chunk_rows: int = Field(
        default=50_000, gt=0, description="rows fetched per round trip (bounds memory)"
    )

    @model_validator(mode="after")
    def _one_relation(self) -> SqlSourceConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of 'table' and 'query'")
        return self


class SourceConfig(_Section):
    """Where events come from and how source columns map onto the canonical ones."""

    path: Path | None = None
    format: SourceFormat = "auto"
    sql: SqlSourceConfig | None = Field(
        default=None,
        description="the table or query of format sql or duckdb (a sql block alone means "
        "format sql); null: a file source",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical column -> source column (user_id, ts, event, sku, quantity, revenue)",
    )
    derive: dict[str, str] = Field(
        default_factory=dict,
        description="column -> arithmetic over source columns, e.g. revenue: quantity * unit_price",
    )
    timestamp: TimestampSpec = Field(default_factory=TimestampSpec)
    event_name: str | None = Field(
        default=None, description="constant event name for tables without an event column"
    )
    message_id: str | None = Field(
        default=None, description="source column with a unique message id, used to drop duplicates"
    )
    order_id: str | None = Field(
        default=None,
        description="source column with the order (invoice) number: a user's purchase lines "
        "sharing it are one order; null: every purchase row is an order",
    )
    identity: str | None = Field(
        default=None,
        description="source column with the anonymous (device, cookie) id: a row carrying it "
        "and a user id links the two from its timestamp on; a row without a user id belongs "
        "to it (Segment exports use anonymousId without this)",
    )
    properties: list[str] = Field(
        default_factory=list, description="extra source columns kept on every event"
    )
    row_rules: list[RowRule] = Field(default_factory=list)
    allow_guest_rows: bool = Field(
        default=False,
        description="true: rows without a user id (guest orders) are counted as guest rows and "
        "set aside, not rejected; they never become users. false: they are rejected as "
        "null_user_id",
    )
    csv_separator: str = ","
    future_tolerance_hours: float = Field(default=24.0, ge=0)

    @model_validator(mode="after")
    def _canonical_targets(self) -> SourceConfig:
        unknown = sorted(set(self.columns) - set(EVENT_COLUMNS))
        if unknown:
            raise ValueError(
                f"columns maps unknown canonical names {unknown}; "
                f"use {sorted(EVENT_COLUMNS)} (extra columns go under 'properties')"
            )
        if self.order_id is not None and ORDER_ID in self.properties:
            raise ValueError(
                f"properties lists {ORDER_ID!r}, the name of the canonical order column that "
                "order_id fills; rename or drop that property"
            )
        both = sorted(set(self.columns) & set(self.derive))
        if both:
            raise ValueError(f"{both} appear in both 'columns' and 'derive'; keep one")
        if self.format in ("sql", "duckdb") and self.sql is None:
            raise ValueError(
                f"format {self.format!r} needs a 'sql' block with a table or a query, "
                "e.g. sql: {table: events}"
            )
        return self

    @property
    def kind(self) -> SourceFormat:
        """The effective format: a ``sql`` block with ``format: auto`` means ``sql``."""
        return "sql" if self.format == "auto" and self.sql is not None else self.format


class AttributesConfig(_Section):
    """The optional per-user attributes table (plan, email, consent, platform ids...)."""

    path: Path | None = None
    format: FileFormat = "auto"
    user_id: str = Field(default="user_id", description="source column holding the user id")
    columns: dict[str, str] = Field(
        default_factory=dict, description="attribute name -> source column (renames)"
    )
    static_features: list[str] = Field(
        default_factory=list, description="attributes the feature builders copy onto feature rows"
    )


class IdentitiesConfig(_Section):
    """An optional table of id pairs linking anonymous (or old) ids to user ids."""

    path: Path | None = Field(
        default=None, description="table of id pairs, read like the attributes table; null: none"
    )
    format: FileFormat = Field(
        default="auto", description="file format of the identities table, as source.format"
    )
    anonymous_id: str = Field(
        default="anonymous_id", description="column with the anonymous (or previous) id"
    )
    user_id: str = Field(default="user_id", description="column with the user id it belongs to")
    ts: str | None = Field(
        default=None,
        description="column with when each pair was observed (it links from then on); "
        "null: every pair is known at every cutoff",
    )


class Roles(_Section):
    """Event names per role; a role may be empty. The shape is pinned."""

    usage: list[str] = Field(default_factory=list)
    purchase: list[str] = Field(default_factory=list)
    aha: list[str] = Field(default_factory=list)
    error: list[str] = Field(default_factory=list)
    setup_started: list[str] = Field(default_factory=list)
    setup_completed: list[str] = Field(default_factory=list)
    consumption: list[str] = Field(default_factory=list)
    cancel: list[str] = Field(default_factory=list)
    return_: list[str] = Field(default_factory=list, alias="return")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def of(self, role: str) -> list[str]:
        """Event names of ``role`` (``"return"`` included)."""
        names: list[str] = getattr(self, "return_" if role == "return" else role)
        return names

    def role_of(self, event: str) -> list[str]:
        """Every role that lists ``event``."""
        return [role for role in ROLES if event in self.of(role)]


class Milestone(_Section):
    """A count of ``event`` worth celebrating: every ``every_n`` or at ``at_counts``."""

    name: str
    event: str
    every_n: int | None = Field(default=None, gt=0)
    at_counts: list[int] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> Milestone:
        if (self.every_n is None) == (self.at_counts is None):
            raise ValueError("give exactly one of 'every_n' or 'at_counts'")
        return self


class FeaturesConfig(_Section):
    """Feature windows (days, added to the always-built 7/14/28/90) and units per pack."""

    windows: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [7, 14, 28, 56, 90, 180, 365]
    )
    units_per_pack: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="SKU -> units in one `quantity`; SKUs not listed count quantity as units",
    )


class LabelsConfig(_Section):
    """Churn labels, the eligible population and the cutoff grid."""

    kind: Literal["non_contractual", "contractual"] = "non_contractual"
    horizon_days: int = Field(default=28, gt=0)
    activity_roles: list[str] = Field(default_factory=lambda: ["usage", "purchase"])
    eligibility: Literal["active", "any_history", "subscribed"] = Field(
        default="active",
        description="active: qualifying activity in the last eligibility_days; any_history: any "
        "event before the cutoff; subscribed: any event and no cancel since the last purchase",
    )
    eligibility_days: int = Field(default=28, gt=0)
    cutoff_every_days: int = Field(default=7, gt=0)
    train_cutoffs: int = Field(default=12, gt=0)
    min_history_days: int = Field(
        default=28, ge=0, description="cutoffs earlier than this after the first event are unused"
    )


class ModelsConfig(_Section):
    name: str = "lapse"
    random_state: int = 0
    calibration: Literal["platt", "isotonic"] = "platt"
    lightgbm_search: bool = Field(
        default=False, description="random hyperparameter search on an internal holdout"
    )
    stacked_lightgbm: bool = Field(
        default=True, description="also race a LightGBM that takes BG/NBD and recency scores"
    )
    hazard_lightgbm: bool = Field(
        default=True,
        description="also race a LightGBM on the horizon's two halves (non-contractual labels), "
        "whose first half learns from cutoffs half a horizon fresher",
    )
    n_jobs: int | None = Field(
        default=None,
        description="LightGBM threads; null = one per 500k training rows, up to the cores",
    )


class RulesConfig(_Section):
    """Parameters of the built-in deterministic triggers."""

    activation_nudge_days: int = Field(default=7, ge=0)
    friction_window_days: int = Field(default=7, gt=0)
    friction_min_errors: int = Field(default=3, gt=0)
    usage_decay_ratio: float = Field(default=0.5, gt=0, le=1)
    dropping_activity_ratio: float = Field(default=0.5, gt=0, le=1)
    heavy_usage_28d: int = Field(
        default=60,
        gt=0,
        description="upsell and vip presets: usage events in 28 days that count as heavy use",
    )
    streak_days: int = Field(
        default=14, gt=0, description="streak preset: consecutive active days worth celebrating"
    )
    nth_order: int = Field(
        default=5, gt=0, description="nth_order preset: the order number worth celebrating"
    )


class TriggerSpec(_Section):
    """One named trigger: a condition, who it applies to, how often and what it sends.

    A trigger named like a preset (``activation_nudge``, ``milestone``,
    ``friction_alert``, ``usage_decay``, ``dropping_activity``,
    ``replenishment_due``, ``upsell``, ``vip``, ``win_back``, ``nth_order``,
    ``streak``) may omit ``when`` to take the preset's condition.
    """

    when: str | None = Field(
        default=None,
        description="condition over feature and attribute names, e.g. usage_count_28d >= 50 "
        'and plan == "basic"; null: the preset of this name',
    )
    cooldown_days: int | Literal["forever"] | None = Field(
        default=None,
        description="days before it may fire again for a user (0: every run; forever: once); "
        "null: the preset's (0 for the built-ins)",
    )
    priority: int = Field(
        default=0, description="order in a record's triggers list: higher first, then config order"
    )
    audience: str | list[str] | None = Field(
        default=None,
        description="who it applies to: a condition, or a list of risk segments; null: everyone",
    )
    emit: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="the trigger id in records and the event name sinks send (after "
        "sinks.prefix); null: the trigger's name",
    )
    enabled: bool = Field(default=True, description="false switches a trigger (or a built-in) off")

    @model_validator(mode="after")
    def _parse(self) -> TriggerSpec:
        if isinstance(self.cooldown_days, int) and self.cooldown_days < 0:
            raise ValueError("cooldown_days must be >= 0 or 'forever'")
        try:
            if self.when is not None:
                parse(self.when, "when")
            if isinstance(self.audience, str):
                parse(self.audience, "audience")
        except ExprError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(self.audience, list):
            bad = sorted(set(self.audience) - {"high", "medium", "low"})
            if bad:
                raise ValueError(f"audience segments {bad} are not high, medium or low")
        return self


def _parsed_condition(text: str) -> str:
    """A condition of the trigger language, checked for syntax (names are checked at run time)."""
    try:
        parse(text)
    except ExprError as exc:
        raise ValueError(str(exc)) from None
    return text


def _behavior_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(
            "a behavior name is a letter then letters, digits or '_' (it names the "
            "encourage_<name> trigger)"
        )
    return name


class DriversConfig(_Section):
    """`lapse drivers`: declared behaviors and the ``encourage_<behavior>`` triggers it writes."""

    behaviors: dict[
        Annotated[str, AfterValidator(_behavior_name)],
        Annotated[str, AfterValidator(_parsed_condition)],
    ] = Field(
        default_factory=dict,
        description="behavior name -> condition over feature and attribute names (the trigger "
        "language), true for users who adopted it at a cutoff, e.g. `{repeat_buyer: "
        '"order_count >= 2"}`; ranked with the event types',
    )
    encourage_top: int = Field(
        default=3,
        ge=0,
        description="`lapse drivers --triggers` writes `encourage_<behavior>` triggers for at "
        "most this many top drivers whose interval lies above zero",
    )
    encourage_cooldown_days: int = Field(
        default=30, ge=0, description="cooldown of each `encourage_<behavior>` trigger"
    )


class SegmentsConfig(_Section):
    """Churn-risk segments: by rank in the training scores (default) or by probability.

    ``quantile`` compares ``churn_risk_percentile`` (the share of the training
    scores at or below a user's) with ``high`` and ``medium``: above 0.9 is the
    top 10% of the training distribution, whatever the base rate. ``probability``
    compares the calibrated churn probability itself (inclusive cut-offs, 0.6 and
    0.3 by default). Because the two numbers mean different things, a section
    that sets ``high`` or ``medium`` must name its ``method``.
    """

    method: Literal["probability", "quantile"] = Field(
        default="quantile",
        description="quantile: rank in the training score distribution (high = churn_risk_"
        "percentile above high); probability: the calibrated churn probability (at or above)",
    )
    high: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="quantile: percentile above which a user is high (0.9: the top 10%); "
        "probability: churn probability at or above which a user is high (default 0.6)",
    )
    medium: float = Field(
        default=0.7,
        ge=0,
        le=1,
        description="quantile: percentile above which a user is at least medium (0.7: the next "
        "20%); probability: churn probability (default 0.3); below it: low",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if {"high", "medium"} & data.keys() and "method" not in data:
            raise ValueError(
                "'high'/'medium' mean a percentile (method: quantile, the default) or a churn "
                "probability (method: probability); name the method next to them"
            )
        if data.get("method") == "probability":
            data = {"high": 0.6, "medium": 0.3, **data}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> SegmentsConfig:
        if self.medium > self.high:
            raise ValueError("'medium' must not exceed 'high'")
        return self


class ReplenishmentConfig(_Section):
    """Replenishment episodes, their survival models and the evaluation windows."""

    enabled: bool = True
    target: Literal["sku", "any"] = Field(
        default="sku",
        description="sku: next order of the same consumable SKU; any: next order of anything "
        "(falls back to it when no SKU qualifies as a consumable)",
    )
    consumables: Literal["auto"] | dict[str, Annotated[float, Field(gt=0)]] = Field(
        default="auto",
        description="auto: SKUs with at least min_repeat_buyers repeat buyers; or SKU -> units "
        "per pack",
    )
    min_repeat_buyers: int = Field(default=20, gt=0)
    lead_time_days: float = Field(default=3.0, ge=0, description="prompt = depletion - lead time")
    penalizer: float = Field(default=0.01, ge=0, description="L2 penalty of every survival model")
    follow_up_days: int = Field(
        default=60,
        ge=31,
        description="window after the validation and test cutoffs: episodes starting in it are "
        "scored, censored at its end; also the horizon H of the survival models' point estimate "
        "(the median days to reorder among those who reorder within H)",
    )
    max_open_days: int = Field(
        default=180, gt=0, description="open episodes older than this count as lapsed, unscored"
    )


class BrazeConfig(_Section):
    """Braze ``/users/track``: the profile is matched on ``external_id``."""

    identifier_column: str = Field(
        default="user_id",
        min_length=1,
        description="record column (user_id) or attributes-table column sent as external_id",
    )
    max_objects_per_request: int = Field(
        default=75,
        ge=1,
        description="attribute and event objects per /users/track request, counted together "
        "(Braze's current limit is 75; some Monthly Active Users contracts: 50)",
    )
    in_doubt: Literal["resend", "skip"] = Field(
        default="skip",
        description="events of a batch whose delivery is in doubt (killed in flight, connection "
        "dropped after sending): skip resends the attributes only (no event twice, one may be "
        "missing), resend sends the events again (none missing, some may arrive twice)",
    )


class KlaviyoConfig(_Section):
    """Klaviyo profile bulk import jobs (lists per segment) and bulk event create."""

    identifier: Literal["external_id", "email"] = Field(
        default="external_id", description="the profile identifier Klaviyo matches on"
    )
    identifier_column: str = Field(
        default="user_id", min_length=1, description="column holding that identifier"
    )
    lists: dict[str, str] = Field(
        default_factory=dict,
        description="risk segment -> Klaviyo list id the profile is added to (add only)",
    )
    revision: str = Field(
        default="2025-01-15", min_length=1, description="the API revision header sent"
    )
    poll_seconds: float = Field(
        default=2.0, ge=0, description="wait between polls of an import job's status"
    )
    poll_timeout_seconds: float = Field(
        default=600.0, gt=0, description="an import job not finished by then is retried"
    )


class CustomerioConfig(_Section):
    """Customer.io Track API v2 ``/api/v2/batch`` and manual segments."""

    identifier: Literal["id", "email"] = Field(
        default="id", description="the person identifier Customer.io matches on"
    )
    identifier_column: str = Field(
        default="user_id", min_length=1, description="column holding that identifier"
    )
    segments: dict[str, int | str] = Field(
        default_factory=dict,
        description="risk segment -> manual segment id (people move between them)",
    )


class SegmentConfig(_Section):
    """Segment HTTP Tracking API ``/v1/batch`` (identify + track), matched on ``userId``."""

    identifier_column: str = Field(
        default="user_id", min_length=1, description="column sent as userId"
    )


class IterableConfig(_Section):
    """Iterable ``/api/users/bulkUpdate`` and ``/api/events/trackBulk``."""

    identifier: Literal["userId", "email"] = Field(
        default="userId", description="the user identifier Iterable matches on"
    )
    identifier_column: str = Field(
        default="user_id", min_length=1, description="column holding that identifier"
    )


class WebhookConfig(_Section):
    """A generic JSON webhook (``LAPSE_WEBHOOK_URL``), signed with ``LAPSE_WEBHOOK_SECRET``."""

    max_items: int = Field(default=500, gt=0, description="records per request")
    max_bytes: int = Field(default=1_000_000, gt=0, description="bytes per request body")
    requests_per_second: float | None = Field(
        default=None, gt=0, description="client-side throttle; null: none"
    )


class SqlSinkConfig(_Section):
    """PostgreSQL tables ``lapse_scores_latest`` and ``lapse_scores_history`` (``--sink sql``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uri_env: str = Field(
        default="LAPSE_SQL_SINK_URI",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the target's connection URI",
    )
    schema_name: str | None = Field(
        default=None,
        alias="schema",
        min_length=1,
        description="schema of the two tables (created if absent); null: the search path",
    )
    label: str = Field(
        default="sql",
        min_length=1,
        description="value of the tables' sink column (the upsert key is user_id, sink)",
    )
    batch_rows: int = Field(default=1000, gt=0, description="records per transaction")


class FileSinkConfig(_Section):
    """The file sink (``--sink file --out PATH``): Parquet or CSV."""

    spreadsheet_safe: bool = Field(
        default=False,
        description="CSV only: prefix text cells starting with = + - @ tab or CR with an "
        "apostrophe, so a spreadsheet shows them instead of running them as formulas "
        "(ids then differ from the source's)",
    )


class SinksConfig(_Section):
    """Where ``lapse score`` delivers, and how each messaging platform gets the records."""

    default: str = "file"
    prefix: str = Field(
        default="lapse_",
        pattern=r"^[A-Za-z0-9_]*$",
        description="start of every attribute and event name lapse writes",
    )
    file: FileSinkConfig = Field(default_factory=FileSinkConfig)
    braze: BrazeConfig = Field(default_factory=BrazeConfig)
    klaviyo: KlaviyoConfig = Field(default_factory=KlaviyoConfig)
    customerio: CustomerioConfig = Field(default_factory=CustomerioConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    iterable: IterableConfig = Field(default_factory=IterableConfig)
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    sql: SqlSinkConfig = Field(default_factory=SqlSinkConfig)


class ScoreConfig(_Section):
    """The nightly ``lapse score``: model age, drift, reasons and who is never contacted."""

    max_model_age_days: int = Field(
        default=30, gt=0, description="warn when as_of is this many days past the training data"
    )
    drift_threshold: float = Field(
        default=0.2, gt=0, description="warn when a population stability index exceeds it"
    )
    drift_features: int = Field(
        default=10, ge=0, description="the most important features whose drift is reported"
    )
    reasons: int = Field(default=3, ge=0, le=10, description="reasons per record (at most)")
    do_not_contact: str | None = Field(
        default="do_not_contact",
        description="boolean column of the attributes table; users with true are never sent",
    )
    suppression_file: Path | None = Field(
        default=None,
        description="CSV/Parquet with a user_id column (or a text file, one per "
        "line): users never sent",
    )


class ControlConfig(_Section):
    """The holdout control group: a stable share of every segment that is not messaged."""

    share: float = Field(default=0.0, ge=0, lt=1, description="share of users held out")
    salt: str = Field(default="lapse-control", min_length=1, description="change it to redraw")
    send: bool = Field(
        default=False, description="send control users too, flagged control=true (not the file)"
    )


class FrequencyCap(_Section):
    """At most ``messages`` messages to a user within any ``days`` consecutive days.

    A message is a record a sink acknowledged that carries at least one trigger
    (control-group records excluded); attribute-only refreshes never count.
    """

    messages: int = Field(ge=1, description="messages allowed per user in the window")
    days: int = Field(ge=1, description="the window in days, ending on the run's as_of day")


class DeliveryConfig(_Section):
    """Retries, pacing and the frequency cap of the shared delivery layer (every sink)."""

    max_attempts: int = Field(default=6, ge=1, description="tries per batch before dead-letter")
    backoff_seconds: float = Field(default=1.0, ge=0, description="first wait, doubled each try")
    max_backoff_seconds: float = Field(
        default=60.0, ge=0, description="longest wait, also caps a destination's Retry-After"
    )
    max_retry_seconds: float = Field(
        default=300.0,
        ge=0,
        description="retry budget of a whole run: seconds of waits and failed tries; once "
        "spent nothing is retried (a failing batch is dead-lettered, an unreachable "
        "destination stops the run)",
    )
    batch_size: int | None = Field(
        default=None, gt=0, description="records per batch; null: the destination's limit"
    )
    frequency_cap: FrequencyCap | None = Field(
        default=None,
        description="at most `messages` triggered records per user in `days` days, per sink; "
        "over it the triggers are withheld (sent as an attribute update, counted as capped); "
        "null: no cap",
    )


class IncrementalConfig(_Section):
    """Incremental trigger runs: ``lapse triggers run --incremental`` (new events, due users)."""

    horizon_days: int = Field(
        default=28,
        gt=0,
        le=366,
        description="days a run looks ahead (one cutoff a day) for when a user's fired triggers "
        "would change without new events; a user with no change in them is re-checked after",
    )
    chunk_users: int = Field(
        default=20_000, gt=0, description="users per chunk of that look-ahead (bounds memory)"
    )


class AuditConfig(_Section):
    """Audit snapshots, the run ledger, dead letters (all under ``path``)."""

    path: Path = Field(default=Path("lapse-runs"), description="relative to the config folder")
    retention_days: int | None = Field(
        default=365, gt=0, description="snapshots older than this are deleted; null keeps all"
    )


class RegistryConfig(_Section):
    """MLflow tracking and the model registry (the registered name is ``models.name``).

    ``tracking_uri`` null means ``MLFLOW_TRACKING_URI`` when set, else
    ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/``, both in the config's
    folder (or ``LAPSE_HOME``); a relative ``sqlite:///`` path resolves the same way.
    """

    tracking_uri: str | None = None
    artifact_location: str | None = Field(
        default=None,
        description="artifact root of new experiments; null: mlartifacts/ beside a local "
        "SQLite store, the server's default otherwise",
    )
    experiment: str = "lapse"
    primary_metrics: dict[str, str] = Field(
        default_factory=lambda: {"churn": "roc_auc", "replenishment": "concordance"},
        description="task -> metric that decides a promotion",
    )
    tolerance: float = Field(
        default=0.005,
        ge=0,
        description="how much worse than the champion a primary metric may be at the worse "
        "bound of its 95% review interval for a promotion",
    )
    review_cutoffs: int = Field(
        default=4,
        gt=0,
        description="`lapse review` pools up to this many latest complete cutoffs (every "
        "labels.cutoff_every_days) after both models' label windows",
    )


class LapseConfig(_Section):
    """The whole configuration. Build it with :func:`load_config`."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    attributes: AttributesConfig = Field(default_factory=AttributesConfig)
    identities: IdentitiesConfig = Field(default_factory=IdentitiesConfig)
    roles: Roles = Field(default_factory=Roles)
    milestones: list[Milestone] = Field(default_factory=list)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    triggers: dict[str, TriggerSpec] = Field(
        default_factory=dict,
        description="named triggers added to the built-ins, or settings of a built-in or preset "
        "(see lapse.triggers)",
    )
    replenishment: ReplenishmentConfig = Field(default_factory=ReplenishmentConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    drivers: DriversConfig = Field(default_factory=DriversConfig)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _origin: str = PrivateAttr(default="<defaults>")

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths resolve against."""
        return self._base_dir

    @property
    def origin(self) -> str:
        """Where the config came from (a path, or ``<embedded default>``)."""
        return self._origin

    def resolve(self, path: str | Path) -> Path:
        """Resolve ``path`` against :attr:`base_dir` unless it is absolute."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self._base_dir / p


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(
            f"{origin}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


_EXPECTED = {
    "list_type": "a list",
    "dict_type": "a mapping",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "literal_error": None,
}


def _describe(err: Any, model: type[BaseModel]) -> str:
    loc = ".".join("return" if p == "return_" else str(p) for p in err["loc"]) or "<top>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; check its spelling or remove it"
    if kind == "missing":
        return f"{loc}: required key is missing"
    expected = _EXPECTED.get(kind)
    if expected:
        return f"{loc}: expected {expected}, got {value!r} ({type(value).__name__})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg} (got {value!r})"


def _base_dir(config_path: Path | None) -> Path:
    home = os.environ.get("LAPSE_HOME")
    if home:
        return Path(home).expanduser().resolve()
    if config_path is not None:
        return config_path.resolve().parent
    return Path.cwd()


def load_config(path: str | Path | None = None) -> LapseConfig:
    """Load and validate a config file; ``None`` means the embedded default.

    Raises
    ------
    ConfigError
        The file is missing or unparsable, or a key is unknown or has a wrong
        type; the message names the key path, the bad value and what is expected.
    """
    if path is None:
        text = resources.files("lapse").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")
        origin, config_path = "<embedded default>", None
    else:
        config_path = Path(path).expanduser()
        origin = str(config_path)
        try:
            text = config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{origin}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{origin}: cannot read config file: {exc}") from None
    raw = _read_yaml(text, origin)
    try:
        config = LapseConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, LapseConfig) for e in exc.errors()]
        raise ConfigError(f"{origin}: invalid config\n  " + "\n  ".join(lines)) from None
    config._base_dir = _base_dir(config_path)
    config._origin = origin
    return config


def dump_config(config: LapseConfig) -> str:
    """The resolved configuration as YAML, every default filled in."""
    data = config.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
