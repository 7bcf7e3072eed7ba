"""map_events: renames, derive, timestamps, ids, row rules and missing-column messages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from lapse.config import LapseConfig
from lapse.events import map_events, scan_source
from lapse.events.derive import derive_expr
from lapse.events.mapping import (
    ANONYMOUS_ID,
    BY_RULE,
    CALL,
    PREVIOUS_ID,
    TS_RAW,
    id_as_string,
)
from lapse.exceptions import ConfigError, MissingColumnsError
from lapse.schema import EVENT_COLUMNS


def _config(**source: Any) -> LapseConfig:
    return LapseConfig.model_validate({"source": source})


def _map(path: Path, **source: Any) -> pl.DataFrame:
    config = _config(**source)
    raw = scan_source(path, config.source.format, config.source.csv_separator)
    return map_events(raw, config, source_name=str(path)).collect()


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_transaction_csv_with_integer_dates_constant_event_and_float_ids(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text(
        "CustomerID,Day,StockCode,Qty\n"
        "17850.0,20101201,85123A,6\n"
        "13047.0,20101202,71053,-2\n"
        ",20101203,22423,1\n"
    )
    got = _map(
        path,
        columns={"user_id": "CustomerID", "ts": "Day", "sku": "StockCode", "quantity": "Qty"},
        timestamp={"format": "%Y%m%d"},
        event_name="purchase",
    )
    identity = {ANONYMOUS_ID: pl.String, PREVIOUS_ID: pl.String, CALL: pl.String}
    assert got.schema == pl.Schema(
        {**EVENT_COLUMNS, TS_RAW: pl.String, BY_RULE: pl.Boolean, **identity}
    )
    assert got["user_id"].to_list() == ["17850", "13047", None]
    assert got["ts"].to_list() == [_utc(2010, 12, 1), _utc(2010, 12, 2), _utc(2010, 12, 3)]
    assert got["event"].to_list() == ["purchase"] * 3
    assert got["sku"].to_list() == ["85123A", "71053", "22423"]
    assert got["quantity"].to_list() == [6.0, -2.0, 1.0]
    assert got["revenue"].to_list() == [None, None, None]  # absent optional -> typed nulls
    assert got[TS_RAW].to_list() == ["20101201", "20101202", "20101203"]


def test_integer_dates_are_inferred(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("user_id,ts\n1,20101201\n2,20101231\n")
    got = _map(path, event_name="purchase")
    assert got["ts"].to_list() == [_utc(2010, 12, 1), _utc(2010, 12, 31)]
    assert got["user_id"].to_list() == ["1", "2"]


def _ndjson(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["iso", None])
def test_iso_strings_with_offsets(tmp_path: Path, fmt: str | None) -> None:
    stamps = [
        "2024-01-01T10:00:00+02:00",
        "2024-01-01T10:00:00Z",
        "2024-01-01 10:00:00.250-05:00",
        "2024-01-01T10:00:00+0530",
        "2024-01-01T10:00",  # naive: read in source.timestamp.timezone (UTC)
        "2024-01-01",
    ]
    path = _ndjson(tmp_path / "e.jsonl", [{"user_id": "u", "ts": s, "event": "e"} for s in stamps])
    got = _map(path, timestamp={"format": fmt})
    assert got["ts"].to_list() == [
        _utc(2024, 1, 1, 8),
        _utc(2024, 1, 1, 10),
        datetime(2024, 1, 1, 15, 0, 0, 250000, tzinfo=UTC),
        _utc(2024, 1, 1, 4, 30),
        _utc(2024, 1, 1, 10),
        _utc(2024, 1, 1),
    ]


def test_unparsable_stamp_is_null_and_raw_text_is_kept(tmp_path: Path) -> None:
    rows = [{"user_id": "u", "ts": s, "event": "e"} for s in ("2024-01-01", "not a date", None)]
    got = _map(_ndjson(tmp_path / "e.jsonl", rows), timestamp={"format": "iso"})
    assert got["ts"].to_list() == [_utc(2024, 1, 1), None, None]
    assert got[TS_RAW].to_list() == ["2024-01-01", "not a date", None]


def test_inference_tolerates_a_few_bad_stamps(tmp_path: Path) -> None:
    stamps = [f"2024-01-{day:02d}T00:00:00Z" for day in range(1, 11)] + ["n/a"]
    rows = [{"user_id": "u", "ts": s, "event": "e"} for s in stamps]
    got = _map(_ndjson(tmp_path / "e.jsonl", rows))  # 10 of 11 are ISO: iso is guessed
    assert got["ts"].null_count() == 1
    assert got["ts"][0] == _utc(2024, 1, 1)


@pytest.mark.parametrize("fmt", ["epoch_ms", None])
def test_epoch_millis(tmp_path: Path, fmt: str | None) -> None:
    rows = [{"user_id": "u", "ts": 1_704_103_200_000, "event": "e"}]  # 2024-01-01 10:00 UTC
    rows.append({"user_id": "u", "ts": 1_704_103_200_500, "event": "e"})
    got = _map(_ndjson(tmp_path / "e.jsonl", rows), timestamp={"format": fmt})
    assert got["ts"].to_list() == [
        _utc(2024, 1, 1, 10),
        datetime(2024, 1, 1, 10, 0, 0, 500000, tzinfo=UTC),
    ]


def test_epoch_seconds_inferred_from_floats(tmp_path: Path) -> None:
    rows = [{"user_id": "u", "ts": 1_704_103_200.25, "event": "e"}]
    got = _map(_ndjson(tmp_path / "e.jsonl", rows))
    assert got["ts"].to_list() == [datetime(2024, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)]


def test_naive_london_stamps_become_utc(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pl.DataFrame(
        {
            "user_id": ["u", "u", "u", "u"],
            "ts": [
                datetime(2024, 1, 15, 10, 0),  # GMT = UTC
                datetime(2024, 7, 1, 10, 0),  # BST = UTC+1
                datetime(2024, 10, 27, 1, 30),  # repeated hour: the earlier (BST) instant
                datetime(2024, 3, 31, 1, 30),  # skipped hour: does not exist -> null
            ],
            "event": ["e"] * 4,
        }
    ).write_parquet(path)
    got = _map(path, timestamp={"timezone": "Europe/London"})
    assert got["ts"].to_list() == [
        _utc(2024, 1, 15, 10),
        _utc(2024, 7, 1, 9),
        _utc(2024, 10, 27, 0, 30),
        None,
    ]


def test_naive_london_strings_with_a_pattern(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event\nu,01/07/2024 10:00,e\nu,15/01/2024 10:00,e\n")
    got = _map(path, timestamp={"format": "%d/%m/%Y %H:%M", "timezone": "Europe/London"})
    assert got["ts"].to_list() == [_utc(2024, 7, 1, 9), _utc(2024, 1, 15, 10)]


def test_day_month_inference_and_ambiguity(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event\nu,12/1/2010 8:26,e\nu,12/13/2010 18:26,e\n")
    got = _map(path)  # 13 can only be a day: month first
    assert got["ts"].to_list() == [_utc(2010, 12, 1, 8, 26), _utc(2010, 12, 13, 18, 26)]
    (tmp_path / "amb.csv").write_text("user_id,ts,event\nu,01/02/2024,e\n")
    with pytest.raises(ConfigError, match="day or month first"):
        _map(tmp_path / "amb.csv")


def test_unknown_timezone(tmp_path: Path) -> None:
    path = _ndjson(tmp_path / "e.jsonl", [{"user_id": "u", "ts": "2024-01-01", "event": "e"}])
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        _map(path, timestamp={"timezone": "Mars/Olympus"})


def test_derive_revenue(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text(
        "user_id,ts,Quantity,UnitPrice,fee\nu,2024-01-01,3,2.5,1\nu,2024-01-02,-2,4,0\n"
    )
    got = _map(
        path,
        event_name="purchase",
        columns={"quantity": "Quantity"},
        derive={"revenue": "Quantity * UnitPrice - (fee / 2)"},
    )
    assert got["revenue"].to_list() == [7.0, -8.0]
    assert got["quantity"].to_list() == [3.0, -2.0]


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('x')", "a ** 2", "a if b else c", "abs(a)", "'text'", "a +", "True"],
)
def test_derive_rejects_anything_but_arithmetic(text: str) -> None:
    with pytest.raises(ConfigError, match=r"source\.derive\.revenue"):
        derive_expr("revenue", text)


def test_derive_dotted_names_and_unary_minus() -> None:
    expr, names = derive_expr("revenue", "-properties.price * (qty + 1)")
    assert names == ["properties.price", "qty"]
    frame = pl.DataFrame({"properties.price": [2.0], "qty": [3]})
    assert frame.select(expr).item() == -8.0


def test_row_rules_first_match_wins(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text(
        "InvoiceNo,CustomerID,InvoiceDate,Quantity\n"
        "536365,1,20101201,6\n"
        "C536379,1,20101201,-1\n"
        "536380,2,20101201,-3\n"
        "C536381,2,20101201,2\n"
    )
    got = _map(
        path,
        columns={"user_id": "CustomerID", "ts": "InvoiceDate", "quantity": "Quantity"},
        event_name="purchase",
        row_rules=[
            {"column": "InvoiceNo", "op": "starts_with", "value": "C", "event": "cancellation"},
            {"column": "quantity", "op": "lt", "value": 0, "event": "return"},
        ],
    )
    assert got["event"].to_list() == ["purchase", "cancellation", "return", "cancellation"]
    assert got[BY_RULE].to_list() == [False, True, True, True]


def test_row_rule_ops_on_source_columns(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event,code\nu,2024-01-01,a,1\nu,2024-01-01,b,2\nu,2024-01-01,c,\n")
    got = _map(
        path,
        row_rules=[
            {"column": "code", "op": "is_null", "event": "no_code"},
            {"column": "code", "op": "in", "value": [2, 3], "event": "two_or_three"},
        ],
    )
    assert got["event"].to_list() == ["a", "two_or_three", "no_code"]


def test_missing_columns_message(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("CustomerNo,When,Amount\n1,2024-01-01,3\n")
    with pytest.raises(MissingColumnsError) as info:
        _map(path)
    message = str(info.value)
    for fragment in ("user_id", "ts", "event", "CustomerNo", "When", "Amount", str(path)):
        assert fragment in message
    assert "source.columns" in message
    assert "\n" not in message


def test_mapped_column_absent_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("user_id,ts\n1,2024-01-01\n")
    with pytest.raises(MissingColumnsError, match="'StockCode'"):
        _map(path, event_name="purchase", columns={"sku": "StockCode"})
    with pytest.raises(MissingColumnsError, match="Country"):
        _map(path, event_name="purchase", properties=["Country"])


def test_event_name_satisfies_the_event_column(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("user_id,ts\n1,2024-01-01\n")
    with pytest.raises(MissingColumnsError, match="event"):
        _map(path)
    assert _map(path, event_name="purchase")["event"].to_list() == ["purchase"]


def test_segment_default_mapping(tmp_path: Path) -> None:
    rows = [
        {
            "event": "Order Completed",
            "userId": "u1",
            "anonymousId": "a1",
            "timestamp": "2024-01-01T10:00:00.000Z",
            "properties": {"sku": "S1", "quantity": 2, "revenue": 9.5, "plan": "pro"},
        },
        {
            "event": "App Opened",
            "userId": None,
            "anonymousId": "a2",
            "timestamp": "2024-01-01T11:00:00+02:00",
            "properties": {"plan": "free"},
        },
        {"event": "App Opened", "userId": "", "anonymousId": "a3", "timestamp": "2024-01-02"},
    ]
    got = _map(_ndjson(tmp_path / "track.jsonl", rows), properties=["properties.plan"])
    assert got.select(*EVENT_COLUMNS, "properties.plan").rows() == [
        ("u1", _utc(2024, 1, 1, 10), "Order Completed", "S1", 2.0, 9.5, "pro"),
        ("a2", _utc(2024, 1, 1, 9), "App Opened", None, None, None, "free"),
        ("a3", _utc(2024, 1, 2), "App Opened", None, None, None, None),
    ]


def test_id_as_string() -> None:
    frame = pl.DataFrame(
        {
            "f": [17850.0, 1.5, None, float("nan")],
            "s": [" 17850.0 ", "v1.0", "", "0042"],
            "i": [1, 2, None, 4],
        }
    )
    got = frame.select(
        id_as_string(pl.col("f"), pl.Float64()),
        id_as_string(pl.col("s"), pl.String()),
        id_as_string(pl.col("i"), pl.Int64()),
    )
    assert got["f"].to_list() == ["17850", "1.5", None, None]
    assert got["s"].to_list() == ["17850", "v1.0", None, "0042"]
    assert got["i"].to_list() == ["1", "2", None, "4"]
