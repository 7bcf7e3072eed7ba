"""``lapse config init``: a commented config skeleton guessed from a sample of events."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final

import polars as pl

from lapse.events.mapping import SEGMENT_DEFAULTS
from lapse.events.readers import collect_frame, is_segment_schema, scan_source
from lapse.events.timestamps import infer_timestamp_format
from lapse.exceptions import ConfigError
from lapse.schema import ROLES

__all__ = ["init_config"]

# Normalised source names (lower case, no "_", "-", " ", ".") per canonical column, best first.
_CANDIDATES: Final[dict[str, tuple[str, ...]]] = {
    "user_id": (
        "userid", "customerid", "anonymousid", "clientid", "accountid", "visitorid", "uid", "user",
        "customer",
    ),
    "ts": (
        "ts", "timestamp", "eventtime", "eventtimestamp", "invoicedate", "datetime", "time",
        "date", "createdat", "occurredat", "orderdate",
    ),
    "event": ("event", "eventname", "eventtype", "action"),
    "sku": ("sku", "stockcode", "productid", "itemid", "product", "item", "productsku"),
    "quantity": ("quantity", "qty", "units"),
    "revenue": ("revenue", "amount", "total", "sales", "value"),
}  # fmt: skip
_PRICE: Final = ("unitprice", "price", "itemprice")
_INVOICE: Final = (
    "invoiceno", "invoice", "invoiceid", "invoicenumber", "orderno", "orderid", "ordernumber",
)  # fmt: skip
_SEGMENT_ORDER: Final = ("propertiesorderid",)
_TOP_EVENTS: Final = 50
_PLAIN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_YAML_WORDS: Final = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"})
_ROLE_HELP: Final[dict[str, str]] = {
    "usage": "everyday activity (app opens, sessions, device use)",
    "purchase": "orders and payments",
    "aha": "the moment a user gets value",
    "error": "failures a user hits",
    "setup_started": "onboarding begun",
    "setup_completed": "onboarding finished",
    "consumption": "use of a consumable (drives replenishment)",
    "cancel": "subscription cancelled (contractual churn)",
    "return": "returns and refunds",
}


def _norm(name: str) -> str:
    return re.sub(r"[_\-\s.]", "", name.lower())


def _q(value: str) -> str:
    """``value`` as a YAML scalar, quoted only when needed."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value)


def _guess(names: list[str], candidates: tuple[str, ...], taken: set[str]) -> str | None:
    by_norm = {_norm(n): n for n in reversed(names) if n not in taken}
    return next((by_norm[c] for c in candidates if c in by_norm), None)


def _timestamp_lines(sample: pl.DataFrame, ts: str | None, where: str) -> list[str]:
    fmt: str | None = None
    note = "null infers it; or a strftime pattern, iso, epoch_s, epoch_ms, epoch_us"
    zone_note = "zone of naive timestamps"
    if ts is not None:
        dtype = sample.schema[ts]
        if isinstance(dtype, pl.Datetime):
            note = "the column is already a datetime"
            if dtype.time_zone is None:
                zone_note = "the stamps are naive: set the zone they were recorded in"
        else:
            try:
                fmt = infer_timestamp_format(sample[ts], where)
                note = f"guessed from values like {sample[ts].drop_nulls()[:1].to_list()!s}"
            except ConfigError as exc:
                note = f"could not guess ({exc}); set it"
    value = "null" if fmt is None else _q(fmt)
    return [
        "  timestamp:",
        f"    format: {value}    # {note}",
        f"    timezone: UTC    # {zone_note}",
    ]


def _event_lines(sample: pl.DataFrame, event: str | None, rows: int) -> list[str]:
    lines = ["", "# Event names per role (a role may be empty).", "roles:"]
    for role in ROLES:
        value = "[purchase]" if event is None and role == "purchase" else "[]"
        lines.append(f"  {role}: {value}    # {_ROLE_HELP[role]}")
    if event is None:
        return lines
    counts = (
        sample.select(pl.col(event).cast(pl.String).alias("event"))
        .drop_nulls()
        .group_by("event")
        .len()
        .sort(["len", "event"], descending=[True, False])
    )
    lines.append(
        f"  # unassigned: move each event name into a role above "
        f"(rows in a sample of {rows}; top {_TOP_EVENTS} of {counts.height} names):"
    )
    lines += [f"  #   - {_q(e)}    # {n}" for e, n in counts.head(_TOP_EVENTS).iter_rows()]
    return lines


def _row_rule_lines(sample: pl.DataFrame, invoice: str | None, quantity: str | None) -> list[str]:
    rules: list[str] = []
    if invoice is not None:
        rules.append(
            f'  #   - {{column: {_q(invoice)}, op: starts_with, value: "C", event: return}}'
            "    # cancelled invoices"
        )
    negative = (
        quantity is not None
        and sample.schema[quantity].is_numeric()
        and bool((sample[quantity] < 0).any())
    )
    if quantity is not None and negative:
        rules.append(
            f"  #   - {{column: {_q(quantity)}, op: lt, value: 0, event: return}}"
            "    # negative quantities (else rejected as negative_quantity)"
        )
    if not rules:
        return ["  row_rules: []"]
    return [
        "  row_rules: []",
        "  # Suggested (uncomment, and list 'return' under roles.return); first match wins:",
        "  # row_rules:",
        *rules,
    ]


def _message_id_lines(sample: pl.DataFrame, column: str | None) -> list[str]:
    """The ``message_id`` line, with a warning when the proposed column repeats."""
    lines = [
        f"  message_id: {_q(column) if column else 'null'}    # unique message id, drops duplicates"
    ]
    if column is None:
        return lines
    values = sample[column].drop_nulls()
    repeats = values.len() - values.n_unique()
    if repeats:
        lines.append(
            f"  # WARNING: {column} repeats ({repeats} of {sample.height} sample rows repeat an "
            "earlier value): message_id keeps the first row of each value and drops the rest; "
            "set it to null unless those are duplicates (an order's lines go under order_id)"
        )
    return lines


def init_config(path: str | Path, *, sample_rows: int = 10000) -> str:
    """A commented YAML config for the events at ``path``, guessed from a sample.

    Columns are matched by name (``CustomerID`` -> ``user_id``,
    ``InvoiceDate`` -> ``ts``, ``StockCode`` -> ``sku``, ...), revenue is
    derived as ``quantity * price`` when there is a price but no revenue
    column, the timestamp format is inferred from the values, and the most
    frequent event names are listed for the user to sort into roles. A table
    without an event column gets ``event_name: purchase``. The text loads with
    :func:`lapse.config.load_config`.

    Raises
    ------
    ReadError
        The file cannot be read.
    """
    name = str(path)
    raw = scan_source(path)
    sample = collect_frame(raw.head(sample_rows), name)
    names = sample.columns
    segment = is_segment_schema(sample.schema)

    found: dict[str, str] = {}
    if not segment:
        for canonical, candidates in _CANDIDATES.items():
            column = _guess(names, candidates, set(found.values()))
            if column is not None:
                found[canonical] = column
    price = None if segment else _guess(names, _PRICE, set(found.values()))
    invoice = None if segment else _guess(names, _INVOICE, set(found.values()))
    order = _guess(names, _SEGMENT_ORDER, set()) if segment else invoice
    event = SEGMENT_DEFAULTS["event"][0] if segment else found.get("event")
    ts = SEGMENT_DEFAULTS["ts"][0] if segment else found.get("ts")

    lines = [
        f"# lapse config for {name}, guessed from its first {sample.height} rows.",
        "# Check every line, then run `lapse validate` on the events.",
        "# Omitted sections take the built-in defaults.",
        "",
        "source:",
        f"  path: {json.dumps(str(Path(name).expanduser().resolve()))}",
        f"  format: {'segment' if segment else 'auto'}",
    ]
    if segment:
        lines.append(
            "  columns: {}    # Segment defaults: user_id <- userId|anonymousId, ts <- timestamp, "
            "event <- event, sku/quantity/revenue <- properties.*"
        )
    else:
        lines.append("  columns:    # canonical: source column")
        lines += [f"    {key}: {_q(value)}" for key, value in found.items()]
        if not found:
            lines[-1] = "  columns: {}    # no column names recognised: map them here"
        missing = [c for c in ("user_id", "ts") if c not in found]
        if missing:
            lines.append(f"    # TODO map {', '.join(missing)} (required)")
    derive = "  derive: {}"
    quantity = found.get("quantity")
    if "revenue" not in found and quantity is not None and price is not None:
        if _PLAIN.fullmatch(quantity) and _PLAIN.fullmatch(price):
            derive = f"  derive:\n    revenue: {json.dumps(f'{quantity} * {price}')}"
        else:
            derive = f"  derive: {{}}    # revenue = {quantity} * {price} (rename to plain names to derive)"
    lines.append(derive)
    lines += _timestamp_lines(sample, ts, name)
    if event is None:
        lines.append("  event_name: purchase    # no event column: every row is a purchase")
    else:
        lines.append("  event_name: null")
    message_id = "messageId" if segment and "messageId" in names else None
    lines += _message_id_lines(sample, message_id)
    order_help = "order (invoice) number: the lines of one order count as one purchase"
    lines.append(f"  order_id: {_q(order) if order else 'null'}    # {order_help}")
    used = {*found.values(), *(c for cols in SEGMENT_DEFAULTS.values() for c in cols)}
    extra = [c for c in names if c not in used and c not in (price, message_id, order)]
    lines.append("  properties: []    # extra source columns to keep on every event")
    if extra:
        shown = ", ".join(_q(c) for c in extra[:30])
        lines.append(f"  # other columns: [{shown}{', ...' if len(extra) > 30 else ''}]")
    lines += _row_rule_lines(sample, invoice, quantity)
    lines += _event_lines(sample, event, sample.height)
    return "\n".join(lines) + "\n"
