"""Map a raw source onto the canonical event columns (``config.source``).

Order of resolution for each canonical column: ``source.columns``, then
``source.derive``, then the Segment defaults (for Segment-shaped sources),
then a source column of the same name. Row rules run on the result and set
the event name of the rows they claim.

With ``source.order_id`` the mapped frame also carries the canonical
:data:`~lapse.schema.ORDER_ID` column (after ``EVENT_COLUMNS``). Besides the
canonical columns and ``source.properties`` it keeps helper columns for validation: :data:`TS_RAW` (the source timestamp as
text, null when absent or already typed as a date or datetime),
:data:`BY_RULE` (a row rule claimed the row) and, when ``source.message_id``
is set, :data:`MESSAGE_ID`.
"""

from __future__ import annotations

import re
from typing import Final

import polars as pl

from lapse.config import LapseConfig, RowRule, SourceConfig
from lapse.events.derive import derive_expr
from lapse.events.readers import collect_frame, is_segment_schema, one_line
from lapse.events.timestamps import check_timezone, infer_timestamp_format, parse_timestamp
from lapse.exceptions import MissingColumnsError, ReadError
from lapse.schema import EVENT_COLUMNS, ORDER_ID, REQUIRED_EVENT_COLUMNS

__all__ = [
    "ANONYMOUS_ID",
    "BY_RULE",
    "CALL",
    "HELPER_COLUMNS",
    "MESSAGE_ID",
    "PREVIOUS_ID",
    "TS_RAW",
    "has_identity",
    "id_as_string",
    "id_columns",
    "map_events",
    "present_columns",
    "timestamp_format",
]

TS_RAW: Final = "_ts_raw"
BY_RULE: Final = "_by_rule"
MESSAGE_ID: Final = "_message_id"
ANONYMOUS_ID: Final = "_anonymous_id"
"""The row's anonymous id (Segment ``anonymousId``, else ``source.identity``), when any."""
PREVIOUS_ID: Final = "_previous_id"
"""A Segment ``alias`` call's ``previousId``."""
CALL: Final = "_call"
"""The Segment call type (``track``, ``page``, ``screen``, ``identify``, ``alias``, ``group``)."""
HELPER_COLUMNS: Final = (TS_RAW, BY_RULE, MESSAGE_ID, ANONYMOUS_ID, PREVIOUS_ID, CALL)
# Segment calls named by these columns become events called by their name or their type.
_NAMED_CALLS: Final = ("page", "screen")

# canonical column -> Segment source columns, first non-null wins
SEGMENT_DEFAULTS: Final[dict[str, tuple[str, ...]]] = {
    "user_id": ("userId", "anonymousId"),
    "ts": ("timestamp",),
    "event": ("event",),
    "sku": ("properties.sku",),
    "quantity": ("properties.quantity",),
    "revenue": ("properties.revenue",),
}
_TS_SAMPLE_ROWS: Final = 1000
_LISTED_COLUMNS: Final = 40
# What a column name looks like (letters, digits, _ . - and spaces; at most 64 characters).
_COLUMN_NAME: Final = re.compile(r"[^\W\d][\w .\-]{0,63}")


def id_as_string(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """An id column as trimmed strings; integral floats lose their ``.0``; empty -> null.

    ``17850.0`` becomes ``"17850"``, ``"17850.0"`` too; ``1.5`` stays ``"1.5"``.
    """
    if dtype.is_float():
        number = expr.fill_nan(None)
        whole = number == number.floor()
        text = (
            pl.when(whole)
            .then(number.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(number.cast(pl.String))
        )
    else:
        text = expr.cast(pl.String).str.strip_chars()
        # the regex only where it can match: ids without a "." skip it (2x faster on 17M ids)
        dotted = text.str.contains(".", literal=True)
        text = pl.when(dotted).then(text.str.replace(r"^(-?\d+)\.0+$", "${1}")).otherwise(text)
    return text.replace("", None)  # (when/then would compute ``text`` twice)


def id_columns(source: SourceConfig) -> list[str]:
    """The source columns holding ids, for :func:`~lapse.events.scan_source` to read as text.

    What ``user_id`` and ``sku`` resolve to (a ``source.columns`` entry, else a
    column of the same name or the Segment default), ``source.message_id``,
    ``source.identity`` and Segment's ``previousId``.
    """
    names: list[str] = []
    for name in ("user_id", "sku"):
        if name in source.columns:
            names.append(source.columns[name])
        elif name not in source.derive:
            names += [name, *SEGMENT_DEFAULTS[name]]
    extra = [c for c in (source.message_id, source.identity) if c]
    return [*names, "previousId", *extra]


def present_columns(schema: pl.Schema) -> str:
    """The source's column names for an error message (long lists shortened).

    A lone column whose name is no column name is not shown: it is the first line
    of a file that is no table (a system file, or a CSV with another separator),
    and an error message must not echo a file's content.
    """
    names = list(schema.names())
    if _not_a_table(schema):
        return (
            "one column whose name is no column name (a file with another separator: "
            "set source.csv_separator)"
        )
    shown = ", ".join(names[:_LISTED_COLUMNS])
    more = f", ... ({len(names) - _LISTED_COLUMNS} more)" if len(names) > _LISTED_COLUMNS else ""
    return f"[{shown}{more}]"


def _not_a_table(schema: pl.Schema) -> bool:
    names = schema.names()
    return len(names) == 1 and not _COLUMN_NAME.fullmatch(names[0])


def _source_exprs(
    schema: pl.Schema, source: SourceConfig, segment: bool
) -> tuple[dict[str, pl.Expr], list[str]]:
    """Raw expression per resolvable canonical column, and problems with explicit config."""
    found: dict[str, pl.Expr] = {}
    problems: list[str] = []
    for name in EVENT_COLUMNS:
        if name in source.columns:
            column = source.columns[name]
            if column in schema:
                found[name] = pl.col(column)
            else:
                problems.append(f"{name} (source.columns maps it to {column!r}, not in the source)")
        elif name in source.derive:
            expr, used = derive_expr(name, source.derive[name])
            absent = [c for c in used if c not in schema]
            if absent:
                problems.append(f"{name} (source.derive reads {absent}, not in the source)")
            else:
                found[name] = expr
        elif segment and any(c in schema for c in SEGMENT_DEFAULTS[name]):
            present = [c for c in SEGMENT_DEFAULTS[name] if c in schema]
            if name == "user_id":
                # userId, falling back to anonymousId (also when userId is "").
                found[name] = pl.coalesce(*(id_as_string(pl.col(c), schema[c]) for c in present))
            else:
                found[name] = pl.col(present[0])
        elif name in schema:
            found[name] = pl.col(name)
    return found, problems


def _missing_message(
    source_name: str, schema: pl.Schema, missing: list[str], problems: list[str]
) -> str:
    parts = [*problems, *(f"{m} (no source column of that name)" for m in missing)]
    if _not_a_table(schema):
        return (
            f"{source_name}: not a table of events: it has {present_columns(schema)}; "
            f"expected the columns {', '.join(missing) or 'named in the source section'}"
        )
    return (
        f"{source_name}: missing columns: {'; '.join(parts)}. "
        f"The source has {present_columns(schema)}. "
        "Fix: map them under source.columns (canonical: source column), e.g. "
        "columns: {user_id: CustomerID, ts: InvoiceDate}, or set source.event_name "
        "for a table without an event column"
    )


def _rule_condition(rule: RowRule, expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    values = rule.value if isinstance(rule.value, list) else [rule.value]
    as_text = any(isinstance(v, str) for v in values) or rule.op == "starts_with"
    if as_text and dtype != pl.String:
        expr = expr.cast(pl.String)
    elif not as_text and not dtype.is_numeric():
        expr = expr.cast(pl.Float64, strict=False)
    if rule.op == "is_null":
        return expr.is_null()
    if rule.op == "in":
        if as_text:
            return expr.is_in(pl.Series([str(v) for v in values], dtype=pl.String).implode())
        return expr.cast(pl.Float64).is_in(pl.Series(values, dtype=pl.Float64).implode())
    value = rule.value
    match rule.op:
        case "starts_with":
            return expr.str.starts_with(str(value))
        case "eq":
            return expr == value
        case "ne":
            return expr != value
        case "lt":
            return expr < value
        case "le":
            return expr <= value
        case "gt":
            return expr > value
        case _:
            return expr >= value


def _identity_exprs(
    schema: pl.Schema, source: SourceConfig, segment: bool
) -> dict[str, pl.Expr | None]:
    """The anonymous id, alias ``previousId`` and Segment call type of each row, where known."""
    anonymous = source.identity or ("anonymousId" if segment else None)

    def text(column: str | None) -> pl.Expr | None:
        if column is None or column not in schema:
            return None
        return id_as_string(pl.col(column), schema[column])

    call = (
        pl.col("type").cast(pl.String).str.to_lowercase() if segment and "type" in schema else None
    )
    return {
        ANONYMOUS_ID: text(anonymous),
        PREVIOUS_ID: text("previousId") if segment else None,
        CALL: call,
    }


def has_identity(raw: pl.LazyFrame, config: LapseConfig) -> bool:
    """Whether ``raw`` has a column identity links come from (an anonymous or previous id)."""
    schema = raw.collect_schema()
    source = config.source
    segment = source.format == "segment" or (source.format == "auto" and is_segment_schema(schema))
    found = _identity_exprs(schema, source, segment)
    return found[ANONYMOUS_ID] is not None or found[PREVIOUS_ID] is not None


def _timestamp_format(
    raw: pl.LazyFrame, ts: pl.Expr, dtype: pl.DataType, config: LapseConfig, source_name: str
) -> str | None:
    fmt = config.source.timestamp.format
    if fmt is not None or dtype.is_temporal() or dtype == pl.Null:
        return fmt
    sample = collect_frame(
        raw.select(ts.alias("ts")).drop_nulls().head(_TS_SAMPLE_ROWS), source_name
    )
    return infer_timestamp_format(sample.to_series(), f"{source_name}: column ts")


def timestamp_format(raw: pl.LazyFrame, config: LapseConfig, *, source_name: str) -> str | None:
    """The ``ts`` format :func:`map_events` would use on ``raw`` (configured or inferred).

    A sharded reader infers it once from a sample and pins it in every shard's
    config, so all shards parse timestamps alike.
    """
    source = config.source
    schema = raw.collect_schema()
    segment = source.format == "segment" or (source.format == "auto" and is_segment_schema(schema))
    found, _ = _source_exprs(schema, source, segment)
    if "ts" not in found:
        return source.timestamp.format
    dtype = raw.select(found["ts"].alias("ts")).collect_schema()["ts"]
    return _timestamp_format(raw, found["ts"], dtype, config, source_name)


def map_events(raw: pl.LazyFrame, config: LapseConfig, *, source_name: str) -> pl.LazyFrame:
    """Rename, derive, parse and type ``raw`` into the canonical event columns.

    Parameters
    ----------
    raw
        A frame from :func:`~lapse.events.scan_source`.
    config
        Its ``source`` section drives the mapping.
    source_name
        The file, for messages.

    Returns
    -------
    pl.LazyFrame
        ``EVENT_COLUMNS`` in order, ``order_id`` when ``source.order_id`` is
        set, then ``source.properties``, then the
        helper columns (:data:`TS_RAW`, :data:`BY_RULE`, :data:`MESSAGE_ID`
        when ``source.message_id`` is set, then :data:`ANONYMOUS_ID`,
        :data:`PREVIOUS_ID` and :data:`CALL`, null where the source has no
        such column). Nothing is rejected here.

    Raises
    ------
    MissingColumnsError
        A required canonical column (``user_id``, ``ts``, ``event`` unless
        ``event_name`` is set), or a column the config names, is absent.
    ConfigError
        A ``derive`` expression, time zone or timestamp format is unusable.
    """
    source = config.source
    check_timezone(source.timestamp.timezone)
    try:
        schema = raw.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise ReadError(f"{source_name}: cannot read: {one_line(exc)}") from None
    segment = source.format == "segment" or (source.format == "auto" and is_segment_schema(schema))
    found, problems = _source_exprs(schema, source, segment)
    required = [c for c in REQUIRED_EVENT_COLUMNS if not (c == "event" and source.event_name)]
    missing = [
        c for c in required if c not in found and c not in source.columns and c not in source.derive
    ]
    named = [*source.properties, *(c for c in (source.message_id, source.order_id) if c)]
    named += [r.column for r in source.row_rules if r.column not in found]
    absent = sorted({c for c in named if c not in schema})
    problems += [f"{c} (named in the source section, not in the source)" for c in absent]
    if missing or problems:
        raise MissingColumnsError(_missing_message(source_name, schema, missing, problems))

    dtypes = raw.select(**found).collect_schema()
    ts_format = _timestamp_format(raw, found["ts"], dtypes["ts"], config, source_name)

    columns: dict[str, pl.Expr] = {}
    for name, dtype in EVENT_COLUMNS.items():
        if name not in found:
            columns[name] = pl.lit(None, dtype=dtype)
        elif name in ("user_id", "sku"):
            columns[name] = id_as_string(found[name], dtypes[name])
        elif name == "ts":
            columns[name] = parse_timestamp(
                found[name], dtypes[name], ts_format, source.timestamp.timezone
            )
        elif name == "event":
            columns[name] = found[name].cast(pl.String).replace("", None)
        else:
            columns[name] = found[name].cast(pl.Float64, strict=False)
    if "event" not in found and source.event_name:
        columns["event"] = pl.lit(source.event_name, dtype=pl.String)
    identity = _identity_exprs(schema, source, segment)
    if source.identity and identity[ANONYMOUS_ID] is not None:
        # a row without a user id belongs to its anonymous id
        columns["user_id"] = pl.coalesce(columns["user_id"], identity[ANONYMOUS_ID])
    call = identity[CALL]
    if call is not None:  # page and screen calls are events named by their name, else type
        title = pl.coalesce(pl.col("name").cast(pl.String), call) if "name" in schema else call
        columns["event"] = pl.when(call.is_in(_NAMED_CALLS)).then(title).otherwise(columns["event"])

    # Rules read source columns first, else the mapped canonical column.
    event = columns["event"]
    claimed: pl.Expr = pl.lit(False)
    for rule in reversed(source.row_rules):
        if rule.column in schema:
            cond = _rule_condition(rule, pl.col(rule.column), schema[rule.column])
        else:
            cond = _rule_condition(rule, columns[rule.column], EVENT_COLUMNS[rule.column])
        cond = cond.fill_null(False)
        event = pl.when(cond).then(pl.lit(rule.event)).otherwise(event)
        claimed = cond | claimed

    raw_ts = (  # the text of a timestamp that may fail to parse; a typed one cannot
        pl.lit(None, pl.String) if dtypes["ts"].is_temporal() else found["ts"].cast(pl.String)
    )
    helpers = [
        raw_ts.alias(TS_RAW),
        claimed.alias(BY_RULE),
    ]
    if source.message_id:
        helpers.append(
            id_as_string(pl.col(source.message_id), schema[source.message_id]).alias(MESSAGE_ID)
        )
    helpers += [
        (expr if expr is not None else pl.lit(None, pl.String)).alias(name)
        for name, expr in identity.items()
    ]
    if source.order_id:
        columns[ORDER_ID] = id_as_string(pl.col(source.order_id), schema[source.order_id])
    return raw.select(
        *(expr.alias(name) for name, expr in {**columns, "event": event}.items()),
        *(pl.col(p) for p in source.properties),
        *helpers,
    )
