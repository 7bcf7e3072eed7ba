"""init_config on three shapes: an event stream, a transaction table, a Segment export."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from lapse.config import LabelsConfig, LapseConfig, load_config
from lapse.events import init_config, validate_events
from lapse.labels import fit_grid


def _load(tmp_path: Path, text: str) -> LapseConfig:
    path = tmp_path / "lapse.yaml"
    path.write_text(text)
    return load_config(path)


def test_event_stream(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pl.DataFrame(
        {
            "userId": ["a", "a", "b", "b", "b"],
            "event_time": [1_704_103_200_000 + i * 60_000 for i in range(5)],
            "event_name": ["app_open", "app_open", "app_open", "order_completed", "device_used"],
            "platform": ["ios"] * 5,
        }
    ).write_parquet(path)
    text = init_config(path)
    config = _load(tmp_path, text)
    assert config.source.columns == {"user_id": "userId", "ts": "event_time", "event": "event_name"}
    assert config.source.timestamp.format == "epoch_ms"
    assert config.source.event_name is None
    assert config.source.path == path.resolve()
    assert all(config.roles.of(role) == [] for role in ("usage", "purchase", "return"))
    # Event names listed by count for the user to sort, most frequent first.
    assert text.index("#   - app_open    # 3") < text.index("#   - device_used    # 1")
    assert "#   - order_completed    # 1" in text
    assert "platform" in text  # offered as a property

    _, report = validate_events(path, config, now=datetime(2024, 6, 1))
    assert report.rows_kept == 5
    assert report.events_unassigned == 5


UCI = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom
C536379,D,Discount,-1,2010-12-01 09:41:00,27.5,14527.0,United Kingdom
536380,22961,JAM MAKING SET,24,2010-12-01 09:41:00,0.85,,United Kingdom
"""


def test_transaction_table_like_online_retail(tmp_path: Path) -> None:
    path = tmp_path / "online_retail.csv"
    path.write_text(UCI)
    text = init_config(path)
    config = _load(tmp_path, text)
    source = config.source
    assert source.columns == {
        "user_id": "CustomerID",
        "ts": "InvoiceDate",
        "sku": "StockCode",
        "quantity": "Quantity",
    }
    assert source.derive == {"revenue": "Quantity * UnitPrice"}
    assert source.event_name == "purchase"
    assert config.roles.purchase == ["purchase"]
    assert source.timestamp.format == "iso"
    assert source.row_rules == []  # suggested only, as comments:
    assert '#   - {column: InvoiceNo, op: starts_with, value: "C", event: return}' in text
    assert "#   - {column: Quantity, op: lt, value: 0, event: return}" in text

    # Uncommenting the suggestion gives a working rule set.
    data = yaml.safe_load(text)
    data["source"]["row_rules"] = [
        {"column": "InvoiceNo", "op": "starts_with", "value": "C", "event": "return"}
    ]
    data["roles"]["return"] = ["return"]
    kept, report = validate_events(
        path, LapseConfig.model_validate(data), rejects_path=tmp_path / "r.parquet"
    )
    assert source.allow_guest_rows  # the sample has a row without a CustomerID
    assert "allow_guest_rows: true    # 1 of the sample's 4 rows have no CustomerID" in text
    assert report.rejected_by_reason["null_user_id"] == 0 and report.guest_rows == 1
    assert report.rejected_by_reason["negative_quantity"] == 0
    assert kept["user_id"].to_list() == ["17850", "17850", "14527"]
    assert kept["revenue"].to_list() == [6 * 2.55, 6 * 3.39, -27.5]
    assert report.events_per_role["return"] == 1


def test_integer_dates_and_float_ids(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("customer_id,date,amount\n1.0,20240101,3.5\n2.0,20240102,4\n")
    config = _load(tmp_path, init_config(path))
    assert config.source.columns == {"user_id": "customer_id", "ts": "date", "revenue": "amount"}
    assert config.source.timestamp.format == "%Y%m%d"
    assert config.source.derive == {}


def test_segment_export(tmp_path: Path) -> None:
    rows = [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u1",
            "anonymousId": "anon-1",
            "messageId": "m1",
            "timestamp": "2024-01-01T10:00:00.000Z",
            "properties": {"sku": "S1", "quantity": 1, "revenue": 9.5},
        },
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": None,
            "anonymousId": "anon-2",
            "messageId": "m2",
            "timestamp": "2024-01-01T11:00:00+02:00",
            "properties": {"sku": "S2"},
        },
    ]
    path = tmp_path / "track.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = init_config(path)
    config = _load(tmp_path, text)
    assert config.source.format == "segment"
    assert config.source.columns == {}
    assert config.source.message_id == "messageId"
    assert config.source.timestamp.format == "iso"
    assert '#   - "Order Completed"    # 1' in text

    kept, report = validate_events(path, config, now=datetime(2024, 6, 1))
    assert kept["user_id"].to_list() == ["u1", "anon-2"]
    assert kept["revenue"].to_list() == [9.5, None]
    assert report.rows_kept == 2


@pytest.mark.parametrize("name", ["InvoiceNo", "order_id", "OrderNumber"])
def test_an_invoice_like_column_is_proposed_as_the_order_key(tmp_path: Path, name: str) -> None:
    path = tmp_path / "lines.csv"
    path.write_text(UCI.replace("InvoiceNo", name, 1))
    text = init_config(path)
    config = _load(tmp_path, text)
    assert config.source.order_id == name
    assert config.source.message_id is None
    assert "other columns: [Description, Country]" in text
    kept, report = validate_events(path, config, rejects_path=tmp_path / "r.parquet")
    assert kept["order_id"].to_list() == ["536365", "536365"]  # (no row rules yet)
    assert report.purchase_orders == 1


def test_a_repeating_message_id_is_warned_about(tmp_path: Path) -> None:
    row = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "timestamp": "2024-01-01T10:00:00.000Z",
        "properties": {"order_id": "o1", "sku": "S1"},
    }
    ids = ["m1", "m1", "m2"]  # a retried delivery, or lines sharing an id
    path = tmp_path / "track.jsonl"
    path.write_text("\n".join(json.dumps({**row, "messageId": m}) for m in ids) + "\n")
    text = init_config(path)
    assert "WARNING: messageId repeats (1 of 3 sample rows" in text
    config = _load(tmp_path, text)
    assert config.source.message_id == "messageId"  # proposed still: the user decides
    assert config.source.order_id == "properties.order_id"

    unique = tmp_path / "unique.jsonl"
    unique.write_text("\n".join(json.dumps({**row, "messageId": m}) for m in ids[1:]) + "\n")
    assert "WARNING" not in init_config(unique)


def test_cust_and_member_are_user_id_columns(tmp_path: Path) -> None:
    for column in ("cust", "Member", "cust_id", "member-id"):
        path = tmp_path / f"{column}.csv"
        path.write_text(f"{column},order_date,amount\nx1,2024-01-01,3.5\n")
        config = _load(tmp_path, init_config(path))
        assert config.source.columns["user_id"] == column
        assert not config.source.allow_guest_rows


# -- a second order log: other fee names, fitted labels, its own model name ------------


def order_log(path: Path, *, products: int, code: str, seed: int = 0) -> Path:
    """A year of orders by 300 customers (a month apart on average): 1-4 product lines
    with list prices and varied quantities, one popular product on 40% of orders, a
    SHIP line priced per order on 60% of them and a fixed SVC-FEE line on every one."""
    rng = np.random.default_rng(seed)
    names = [
        code.format(p=p, w=["oat", "bean", "cup", "tin", "jar"][p % 5]) for p in range(products)
    ]
    price = rng.uniform(2, 40, products).round(2)
    rows: list[tuple[str, str, str, int, float, datetime]] = []
    start = datetime(2023, 1, 1)
    for c in range(300):
        t = rng.uniform(0, 30)
        while t < 365:
            order, ts = f"O{len(rows)}", start + timedelta(days=float(t))
            lines = {int(p) for p in rng.choice(products, rng.integers(1, 5), replace=False)}
            if rng.random() < 0.4:
                lines.add(0)
            for p in sorted(lines):
                rows.append((order, f"C{c}", names[p], int(rng.integers(1, 13)), price[p], ts))
            if rng.random() < 0.6:
                rows.append((order, f"C{c}", "SHIP", 1, round(rng.uniform(3, 25), 2), ts))
            rows.append((order, f"C{c}", "SVC-FEE", 1, 1.99, ts))
            t += rng.gamma(4.0, 30 / 4)
    cols = ["order_id", "customer", "sku", "qty", "price", "order_date"]
    pl.DataFrame(rows, schema=cols, orient="row").write_parquet(path)
    return path


@pytest.mark.parametrize(
    ("products", "code"),
    [(150, "SKU-{p:04d}"), (30, "{w} blend no {p}")],  # a coded catalogue; a small named one
)
def test_fees_with_other_names_are_found_and_products_are_not(
    tmp_path: Path, products: int, code: str
) -> None:
    path = order_log(tmp_path / "Shop Orders.parquet", products=products, code=code)
    text = init_config(path)
    config = _load(tmp_path, text)
    (rule,) = config.source.row_rules
    assert (rule.column, rule.op, rule.event) == ("sku", "in", "fee")
    assert rule.value == ["SVC-FEE", "SHIP"]  # most orders first; the popular product is not
    assert "#   SHIP: on " in text and "ad-hoc prices" in text

    _, report = validate_events(path, config)
    assert report.events_per_role["purchase"] > 0
    fees = pl.read_parquet(path).filter(pl.col("sku").is_in(["SHIP", "SVC-FEE"])).height
    assert report.events_unassigned == fees  # 'fee' rows are kept, in no role


def test_labels_are_fitted_to_the_log_and_train_keeps_them(tmp_path: Path) -> None:
    path = order_log(tmp_path / "Shop Orders.parquet", products=150, code="SKU-{p:04d}")
    text = init_config(path)
    config = _load(tmp_path, text)
    labels = config.labels
    # monthly customers (gamma gaps, mean 30 days): 80% of gaps are under ~6 weeks
    assert 35 <= labels.horizon_days <= 56 and labels.horizon_days % 7 == 0
    assert labels.eligibility == "any_history" and labels.activity_roles == ["purchase"]
    assert labels.train_cutoffs == 12
    assert "repeat customers' gaps between orders" in text
    # the rule `lapse train` applies finds nothing to change in what config init proposed
    assert fit_grid(labels, 365).note is None
    assert config.models.name == "shop_orders"


def test_short_event_stream_keeps_default_labels_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user_id,ts,event\na,2024-01-01T10:00:00Z,open\nb,2024-01-03T10:00:00Z,open\n")
    text = init_config(path)
    config = _load(tmp_path, text)
    assert "# labels: not fitted to the data (only " in text
    assert config.labels == LabelsConfig()
    assert config.models.name == "events"


def _reference_data() -> Path:
    where = os.environ.get("LAPSE_REFERENCE_DATA")
    if not where:
        pytest.skip("set LAPSE_REFERENCE_DATA to the folder of online_retail.parquet")
    path = Path(where)
    return path / "online_retail.parquet" if path.is_dir() else path


def test_online_retail_fees_guests_and_labels() -> None:
    path = _reference_data()
    text = init_config(path)
    config = LapseConfig.model_validate(yaml.safe_load(text))
    cancel, rule = config.source.row_rules  # C invoices are returns; then the fees
    assert (cancel.column, cancel.op, cancel.value, cancel.event) == (
        "InvoiceNo",
        "starts_with",
        "C",
        "return",
    )
    assert config.roles.of("return") == ["return"]
    assert isinstance(rule.value, list)
    assert {"POST", "M", "DOT", "BANK CHARGES", "AMAZONFEE"} <= set(map(str, rule.value))
    codes = pl.read_parquet(path, columns=["StockCode"])["StockCode"]
    products = codes.filter(codes.str.contains(r"^\d{5}[A-Za-z]*$")).unique()
    assert not set(products) & set(map(str, rule.value))  # no regular product flagged
    assert config.source.allow_guest_rows
    assert config.labels.eligibility == "any_history"
    assert config.labels.horizon_days > 28 and config.labels.train_cutoffs >= 8
    assert config.models.name == "online_retail"


def _lines(rows: list[tuple[str, int]]) -> str:
    head = "OrderNumber,sku,quantity,order_date,price,customer_id\n"
    return head + "".join(
        f"{order},S{i % 3},{q},2024-01-{1 + i % 28:02d} 10:00:00,2.5,c{i % 7}\n"
        for i, (order, q) in enumerate(rows)
    )


def test_a_cancellation_prefix_on_negative_quantities_becomes_a_return_rule(
    tmp_path: Path,
) -> None:
    # eight cancellations "R..." with negative quantities, two stock adjustments with plain
    # numbers (also negative: they stay rejects), forty orders
    rows = [(f"{1000 + i}", 2) for i in range(40)]
    rows += [(f"R{1000 + i}", -1) for i in range(8)] + [("2000", -3), ("2001", -3)]
    path = tmp_path / "lines.csv"
    path.write_text(_lines(rows))
    text = init_config(path)
    config = _load(tmp_path, text)
    (rule,) = [r for r in config.source.row_rules if r.event == "return"]
    assert (rule.column, rule.op, rule.value) == ("OrderNumber", "starts_with", "R")
    assert config.roles.of("return") == ["return"]
    kept, report = validate_events(path, config, rejects_path=tmp_path / "r.parquet")
    assert kept.filter(pl.col("event") == "return").height == 8
    assert report.rejected_by_reason["negative_quantity"] == 2


def test_no_return_rule_without_a_clear_cancellation_prefix(tmp_path: Path) -> None:
    # negative quantities under plain numbers, and a prefix shared with positive orders
    rows = [(f"{1000 + i}", 2) for i in range(30)] + [(f"R{i}", 2) for i in range(10)]
    rows += [(f"R{100 + i}", -1) for i in range(6)] + [(f"{3000 + i}", -1) for i in range(6)]
    path = tmp_path / "lines.csv"
    path.write_text(_lines(rows))
    config = _load(tmp_path, init_config(path))
    assert not [r for r in config.source.row_rules if r.event == "return"]
    assert config.roles.of("return") == []
