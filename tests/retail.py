"""The UCI Online Retail reference file (env ``LAPSE_REFERENCE_DATA``): its config with
``source.order_id``, and per-customer orders recomputed with plain Polars."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

NON_PRODUCT = ["POST", "DOT", "M", "D", "S", "B", "C2", "CRUK", "PADS", "AMAZONFEE", "BANK CHARGES"]
AS_OF = datetime(2011, 12, 10, tzinfo=UTC)  # after the last invoice


def reference_file() -> Path:
    """The file, or a skip when ``LAPSE_REFERENCE_DATA`` does not name one."""
    path = Path(os.environ.get("LAPSE_REFERENCE_DATA", ""))
    if not path.is_file():
        pytest.skip("set LAPSE_REFERENCE_DATA to the Online Retail Parquet file")
    return path


def write_config(folder: Path) -> Path:
    """The notebook's mapping of the file, with ``order_id: InvoiceNo``."""
    spec = {
        "source": {
            "columns": {
                "user_id": "CustomerID",
                "ts": "InvoiceDate",
                "sku": "StockCode",
                "quantity": "Quantity",
            },
            "derive": {"revenue": "Quantity * UnitPrice"},
            "timestamp": {"timezone": "Europe/London"},
            "event_name": "purchase",
            "order_id": "InvoiceNo",
            "row_rules": [
                {"column": "InvoiceNo", "op": "starts_with", "value": "C", "event": "return"},
                {"column": "StockCode", "op": "in", "value": NON_PRODUCT, "event": "fee"},
            ],
        },
        "attributes": {"static_features": []},
        "roles": {"purchase": ["purchase"], "return": ["return"]},
    }
    path = folder / "online_retail.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def expected_orders(path: Path) -> pl.DataFrame:
    """Per customer from the distinct non-cancellation invoices of product lines:
    ``user_id, order_count, days_since_last_purchase, mean_order_gap_days,
    std_order_gap_days`` as of :data:`AS_OF` (an invoice at its first line's time)."""
    stamp = (
        pl.col("InvoiceDate")
        .dt.replace_time_zone("Europe/London", ambiguous="earliest")
        .dt.convert_time_zone("UTC")
    )
    invoices = (
        pl.scan_parquet(path)
        .filter(
            pl.col("CustomerID").is_not_null(),
            ~pl.col("InvoiceNo").str.starts_with("C"),
            ~pl.col("StockCode").is_in(NON_PRODUCT),
            pl.col("Quantity") >= 0,  # a negative purchase line is rejected
        )
        .group_by("CustomerID", "InvoiceNo")
        .agg(stamp.min().alias("ts"))
    )
    day_us = 86_400_000_000
    gap = pl.col("ts").sort().diff().dt.total_microseconds() / day_us
    return (
        invoices.group_by("CustomerID")
        .agg(
            pl.len().cast(pl.Int64).alias("order_count"),
            pl.col("ts").max().alias("last"),
            gap.mean().alias("mean_order_gap_days"),
            gap.std().alias("std_order_gap_days"),
        )
        .select(
            pl.col("CustomerID").cast(pl.Int64).cast(pl.String).alias("user_id"),
            "order_count",
            ((pl.lit(AS_OF) - pl.col("last")).dt.total_microseconds() // day_us).alias(
                "days_since_last_purchase"
            ),
            "mean_order_gap_days",
            "std_order_gap_days",
        )
        .sort("user_id")
        .collect()
    )


def check_orders(features: pl.DataFrame, path: Path) -> None:
    """``features`` (lapse's rows as of :data:`AS_OF`) agree with :func:`expected_orders`."""
    from polars.testing import assert_frame_equal

    want = expected_orders(path)
    got = features.filter(pl.col("order_count") > 0).select(want.columns).sort("user_id")
    assert got.height == want.height > 4000
    assert_frame_equal(got, want, check_dtypes=False, rel_tol=1e-9, abs_tol=1e-9)
    assert got.filter(pl.col("user_id") == "12347")["order_count"].item() == 7
