"""``lapse config init``: a commented config skeleton guessed from a sample of events."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Final

import polars as pl
import yaml

from lapse.config import LapseConfig
from lapse.events.mapping import SEGMENT_DEFAULTS, map_events
from lapse.events.readers import collect_frame, is_segment_schema, scan_source
from lapse.events.timestamps import infer_timestamp_format
from lapse.exceptions import ConfigError, LapseError
from lapse.labels.cutoffs import GridFit, data_span, propose_labels, repeat_gaps
from lapse.schema import ROLES

__all__ = ["init_config"]

# Normalised source names (lower case, no "_", "-", " ", ".") per canonical column, best first.
_CANDIDATES: Final[dict[str, tuple[str, ...]]] = {
    "user_id": (
        "userid", "customerid", "anonymousid", "clientid", "accountid", "visitorid", "uid", "user",
        "customer", "custid", "cust", "memberid", "member",
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


def _event_lines(
    sample: pl.DataFrame, event: str | None, rows: int, *, returns: bool = False
) -> list[str]:
    lines = ["", "# Event names per role (a role may be empty).", "roles:"]
    for role in ROLES:
        value = "[purchase]" if event is None and role == "purchase" else "[]"
        value = "[return]" if returns and role == "return" else value
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


def cancel_prefix(sample: pl.DataFrame, invoice: str, quantity: str) -> str | None:
    """The order-number prefix that marks cancellations, when the sample shows one.

    The most common leading non-digit character of the negative-quantity rows'
    order numbers, when it starts at least half of them and at least 95% of the
    rows it starts have a negative quantity (UCI's ``C536379``); else ``None``.
    """
    if not sample.schema[quantity].is_numeric():
        return None
    first = pl.col(invoice).cast(pl.String).str.strip_chars().str.slice(0, 1)
    rows = sample.select(first.alias("p"), (pl.col(quantity) < 0).alias("neg")).drop_nulls()
    neg = rows.filter(pl.col("neg") & ~pl.col("p").str.contains(r"^\d?$"))
    if neg.height < 5:
        return None
    prefix, n = neg.group_by("p").len().sort(["len", "p"], descending=[True, False]).row(0)
    marked = rows.filter(pl.col("p") == prefix)
    if n < 0.5 * int(rows["neg"].sum()) or n < 0.95 * marked.height:
        return None
    return str(prefix)


def _row_rule_lines(
    sample: pl.DataFrame,
    invoice: str | None,
    quantity: str | None,
    fee_rule: list[str],
    cancel: str | None,
) -> list[str]:
    rules: list[str] = []
    if cancel is not None and invoice is not None:
        fee_rule = [
            f"    - {{column: {_q(invoice)}, op: starts_with, value: {_q(cancel)}, event: return}}"
            f"    # cancellations: {invoice} starting {cancel!r} on the negative quantities",
            *fee_rule,
        ]
    elif invoice is not None:
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
    active = any(line.startswith("    - ") for line in fee_rule)  # else only comments
    head = ["  row_rules:    # first match wins" if active else "  row_rules: []", *fee_rule]
    if not rules:
        return head
    return [
        *head,
        "  # Suggested (uncomment, and list 'return' under roles.return); first match wins:",
        *([] if active else ["  # row_rules:"]),
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
    without an event column gets ``event_name: purchase``. Read from every
    row: a ``row_rules`` entry turning fee-like codes into ``fee`` events
    (:func:`fee_codes`), and a ``labels`` section fitted to the span and the
    customers' repeat gaps (:func:`lapse.labels.propose_labels`). Rows without
    a user id in the sample set ``allow_guest_rows``; ``models.name`` comes
    from the file's name. The text loads with :func:`lapse.config.load_config`.

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
    fees = _fee_rule_lines(raw, found, price, invoice) if not segment else []
    cancel = (
        cancel_prefix(sample, invoice, quantity)
        if invoice is not None and quantity is not None and not segment
        else None
    )
    lines += _row_rule_lines(sample, invoice, quantity, fees, cancel)
    lines.append(_guest_line(sample, None if segment else found.get("user_id")))
    lines += _event_lines(sample, event, sample.height, returns=cancel is not None)
    lines += _label_lines(raw, "\n".join(lines), name, purchase_only=event is None)
    lines += _model_lines(name)
    return "\n".join(lines) + "\n"


# -- fees: codes that are not products ---------------------------------------------------

#: A code is fee-like when at least this many of the signals in :func:`fee_codes` hold.
_FEE_SIGNALS: Final = 2
_FEES_LISTED: Final = 20


def _code_shape(code: pl.Expr) -> pl.Expr:
    """``85123A`` -> ``9A``, ``POST`` -> ``A``, ``SVC-FEE`` -> ``A-A``: runs of digits and letters."""
    return code.str.replace_all(r"[0-9]+", "9").str.replace_all(r"\p{L}+", "A")


def fee_codes(
    raw: pl.LazyFrame,
    *,
    sku: str,
    order: list[str],
    price: pl.Expr | None,
    quantity: str | None,
) -> pl.DataFrame:
    """Product codes that look like fees, postage or adjustments, not products.

    Signals, each judged against the log's own catalogue (no list of names):

    - *unusual code*: the code's shape (runs of digits and letters) is shared by
      under 2% of the codes while a few shapes cover 90% of them;
    - *ad-hoc prices*: more distinct unit prices than 3x the 90th percentile
      of codes (and at least 10): a price typed per order, not a list price;
    - *no units*: quantity is 1 (or empty) on 95% of its lines while it
      varies across the log;
    - *on many orders*: on 20% or more of all orders (``order``: the order id
      column, or user and time).

    Returns ``code, lines, orders, signals`` of the codes with at least two
    signals, most orders first.
    """
    code = pl.col(sku).cast(pl.String).str.strip_chars()
    key = pl.col(order[0]) if len(order) == 1 else pl.struct(order)
    qty = pl.col(quantity).cast(pl.Float64, strict=False) if quantity else pl.lit(None, pl.Float64)
    one = (qty.abs() == 1) | qty.is_null()
    unit = (price if price is not None else pl.lit(None, pl.Float64)).cast(pl.Float64, strict=False)
    rows = raw.select(
        code.alias("code"), key.alias("order"), unit.alias("price"), one.alias("one")
    ).filter(pl.col("code").is_not_null())
    per, total = pl.collect_all(
        [
            rows.group_by("code").agg(
                pl.len().alias("lines"),
                pl.col("order").n_unique().alias("orders"),
                pl.col("price").drop_nulls().n_unique().alias("prices"),
                pl.col("one").mean().alias("ones"),
            ),
            rows.select(pl.col("order").n_unique().alias("orders"), pl.col("one").mean()),
        ]
    )
    n_codes = per.height
    if n_codes < 10:  # no catalogue to compare with
        return (
            per.select("code", "lines", "orders")
            .clear()
            .with_columns(pl.lit(None, pl.List(pl.String)).alias("signals"))
        )
    per = per.with_columns(_code_shape(pl.col("code")).alias("shape"))
    share = pl.len().over("shape") / n_codes
    common = per.group_by("shape").len().filter(pl.col("len") >= 0.02 * n_codes)["len"].sum()
    dominant = n_codes >= 50 and common >= 0.9 * n_codes
    ref = float(per["prices"].quantile(0.9) or 0.0)
    varied = quantity is not None and float(total.item(0, "one") or 0.0) <= 0.8
    signals = {
        "unusual code": pl.lit(dominant) & (share < 0.02),
        "ad-hoc prices": pl.col("prices") >= max(10.0, 3 * ref),
        "no units": pl.lit(varied) & (pl.col("lines") >= 5) & (pl.col("ones") >= 0.95),
        "on many orders": (pl.col("lines") >= 20)
        & (pl.col("orders") >= 0.2 * int(total.item(0, "orders"))),
    }
    listed = pl.concat_list(
        [pl.when(cond).then(pl.lit(name)) for name, cond in signals.items()]
    ).list.drop_nulls()
    return (
        per.with_columns(listed.alias("signals"))
        .filter(pl.col("signals").list.len() >= _FEE_SIGNALS)
        .sort(["orders", "code"], descending=[True, False])
        .select("code", "lines", "orders", "signals")
    )


def _fee_rule_lines(
    raw: pl.LazyFrame, found: dict[str, str], price: str | None, invoice: str | None
) -> list[str]:
    """The ``row_rules`` entry that makes fee-like codes ``fee`` events, with why each."""
    sku, quantity, revenue = found.get("sku"), found.get("quantity"), found.get("revenue")
    order = [invoice] if invoice else [c for c in (found.get("user_id"), found.get("ts")) if c]
    if sku is None or not order:
        return []
    unit: pl.Expr | None = None
    if price is not None:
        unit = pl.col(price)
    elif revenue is not None and quantity is not None:
        unit = pl.col(revenue).cast(pl.Float64, strict=False) / pl.col(quantity).cast(
            pl.Float64, strict=False
        )
    elif revenue is not None:
        unit = pl.col(revenue)
    try:
        fees = fee_codes(raw, sku=sku, order=order, price=unit, quantity=quantity)
    except pl.exceptions.PolarsError as exc:
        return [f"  # fee-like {sku} codes: not checked ({str(exc).splitlines()[0]})"]
    if fees.is_empty():
        return []
    values = ", ".join(_q(c) for c in fees["code"])
    lines = [
        f"    - {{column: {_q(sku)}, op: in, value: [{values}], event: fee}}",
        f"  # fee-like {sku} codes (their rows become 'fee' events, in no role: never products "
        "or refills); remove any that is a product:",
    ]
    for code, _, orders, why in fees.head(_FEES_LISTED).iter_rows():
        lines.append(f"  #   {_q(code)}: on {orders:,} orders; {', '.join(why)}")
    if fees.height > _FEES_LISTED:
        lines.append(f"  #   ... and {fees.height - _FEES_LISTED} more")
    return lines


# -- guest rows, labels and the model name -----------------------------------------------


def _guest_line(sample: pl.DataFrame, user: str | None) -> str:
    if user is not None:
        ids = sample[user].cast(pl.String).str.strip_chars()
        missing = int((ids.is_null() | (ids == "")).sum())
        if missing:
            return (
                f"  allow_guest_rows: true    # {missing:,} of the sample's {sample.height:,} rows "
                f"have no {user}: guest rows, counted and set aside, never users"
            )
    return "  allow_guest_rows: false    # true: rows without a user id are guest rows, not rejects"


_ELIGIBILITY_HELP: Final = {
    "any_history": "every customer with an order before the cutoff",
    "active": "activity in the eligibility_days before the cutoff",
}


def _label_lines(raw: pl.LazyFrame, draft: str, name: str, *, purchase_only: bool) -> list[str]:
    """The ``labels`` section fitted to the events' span and repeat gaps (the rule of
    :func:`lapse.labels.cutoffs.propose_labels`, which ``lapse train`` also applies)."""
    try:
        config = LapseConfig.model_validate(yaml.safe_load(draft))
        events = map_events(raw, config, source_name=name)
        if purchase_only:  # orders, not the fee lines or returns among them
            events = events.filter(
                pl.col("event").is_in(config.roles.purchase) & ~(pl.col("quantity") < 0)
            )
        events = events.select("user_id", "ts")
        start, end = data_span(events)
        fit = propose_labels((end - start).days, repeat_gaps(events), purchase_only=purchase_only)
    except (LapseError, ValueError, pl.exceptions.PolarsError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [
            "",
            f"# labels: not fitted to the data ({reason}); the defaults apply. Map user_id and ts,",
            "# then rerun `lapse config init` to fit the horizon and the cutoff grid.",
        ]
    last = end - timedelta(days=1)
    head = [
        "",
        f"# Churn labels and the cutoff grid, fitted to {(end - start).days} days of events "
        f"({start:%Y-%m-%d} to {last:%Y-%m-%d}); `lapse train` checks the same rule.",
    ]
    head += [f"# {part}." for part in (fit.note or "").split("; ") if part]
    return head + _labels_yaml(fit)


def _labels_yaml(fit: GridFit) -> list[str]:
    lab = fit.labels
    return [
        "labels:",
        f"  horizon_days: {lab.horizon_days}    # churned: no activity in the "
        f"{lab.horizon_days} days after a cutoff",
        f"  activity_roles: [{', '.join(lab.activity_roles)}]",
        f"  eligibility: {lab.eligibility}    # scored: {_ELIGIBILITY_HELP[lab.eligibility]}",
        f"  eligibility_days: {lab.eligibility_days}",
        f"  cutoff_every_days: {lab.cutoff_every_days}",
        f"  train_cutoffs: {lab.train_cutoffs}    # {fit.fits} fit the span at this step",
        f"  min_history_days: {lab.min_history_days}",
    ]


def model_name(path: str | Path) -> str:
    """A registered-model name from a data file's name: ``data/Online Retail.parquet`` ->
    ``online_retail``; a folder or glob names it after the folder."""
    p = Path(str(path).rstrip("/"))
    if set("*?[") & set(str(p)):
        p = next((q for q in p.parents if not set("*?[") & set(str(q))), Path("events"))
    stem = p.name.split(".")[0]
    return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "lapse"


def _model_lines(name: str) -> list[str]:
    return [
        "",
        "models:",
        f"  name: {_q(model_name(name))}    # registered model name: this data's own lineage "
        "(its first model becomes champion)",
    ]
