"""validate_events / read_events: every reject reason, duplicates, future events, the report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from lapse.config import LapseConfig, load_config
from lapse.events import REJECT_REASONS, read_events, validate_events
from lapse.events.validate import _first_distinct, rejects_path_for
from lapse.exceptions import ConfigError, MissingColumnsError
from lapse.schema import EVENT_COLUMNS

SOURCE: dict[str, Any] = {
    "timestamp": {"format": "iso"},
    "message_id": "mid",
    "row_rules": [{"column": "code", "op": "eq", "value": "X", "event": "adjustment"}],
}
ROLES = {"usage": ["open"], "purchase": ["order"], "return": ["refund"]}
NOW = datetime(2024, 6, 1, tzinfo=UTC)

# (user_id, ts, event, quantity, mid, code) -> expected fate
ROWS: list[tuple[Any, ...]] = [
    ("u1", "2024-01-01T00:00:00Z", "open", None, "m1", None),  # 1 kept
    ("u1", "2024-01-02T00:00:00Z", "order", 2, "m2", None),  # 2 kept
    (None, "2024-01-02T00:00:00Z", "order", 1, "m3", None),  # 3 null_user_id
    ("", "2024-01-02T00:00:00Z", "order", 1, "m4", None),  # 4 null_user_id (empty)
    ("u2", "garbage", "open", None, "m5", None),  # 5 unparsable_ts
    ("u2", None, "open", None, "m6", None),  # 6 unparsable_ts (null)
    ("u2", "2024-01-03T00:00:00Z", None, None, "m7", None),  # 7 null_event
    ("u2", "2024-01-03T00:00:00Z", "order", -1, "m8", None),  # 8 negative_quantity
    ("u2", "2024-01-03T00:00:00Z", "refund", -1, "m9", None),  # 9 kept: roles.return
    ("u2", "2024-01-03T00:00:00Z", "order", -1, "m10", "X"),  # 10 kept: claimed by a rule
    ("u1", "2024-01-02T00:00:00Z", "order", 2, "m11", None),  # 11 duplicate of row 2
    ("u3", "2024-01-04T00:00:00Z", "open", None, "m1", None),  # 12 duplicate message id m1
    ("u3", "2024-01-05T00:00:00Z", "open", None, None, None),  # 13 kept
    ("u3", "2024-01-06T00:00:00Z", "open", None, None, None),  # 14 kept (null ids never clash)
    ("u3", "2030-01-01T00:00:00Z", "open", None, "m15", None),  # 15 kept, future
    ("u3", "2024-06-01T23:00:00Z", "open", None, "m16", None),  # 16 kept, within 24 h
]


def _write_events(path: Path, rows: list[tuple[Any, ...]] = ROWS) -> Path:
    keys = ("user_id", "ts", "event", "quantity", "mid", "code")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(dict(zip(keys, r, strict=True))) for r in rows) + "\n")
    return path


def _config(tmp_path: Path, **source: Any) -> LapseConfig:
    """A config loaded from a file in tmp_path, so default rejects land there."""
    path = tmp_path / "lapse.yaml"
    path.write_text(yaml.safe_dump({"source": {**SOURCE, **source}, "roles": ROLES}))
    return load_config(path)


def test_report_counts_every_path(tmp_path: Path) -> None:
    events = _write_events(tmp_path / "data" / "events.jsonl")
    kept, report = validate_events(events, _config(tmp_path), now=NOW)

    assert report.rows_read == 16
    assert report.rejected_by_reason == {
        "null_user_id": 2,
        "unparsable_ts": 2,
        "null_event": 1,
        "negative_quantity": 1,
    }
    assert report.duplicates == 2
    assert report.rows_kept == 8 == kept.height
    assert report.rows_read == report.rows_kept + report.rows_rejected + report.duplicates
    assert report.rejected_share == pytest.approx(6 / 16)
    assert report.users == 3
    assert report.ts_min == datetime(2024, 1, 1, tzinfo=UTC)
    assert report.ts_max == datetime(2030, 1, 1, tzinfo=UTC)
    assert report.future_events == 1
    assert report.events_per_role == {
        "usage": 5,
        "purchase": 1,
        "aha": 0,
        "error": 0,
        "setup_started": 0,
        "setup_completed": 0,
        "consumption": 0,
        "cancel": 0,
        "return": 1,
    }
    assert report.events_unassigned == 1  # the rule's "adjustment"
    assert report.path == str(events)

    assert kept.schema == pl.Schema(EVENT_COLUMNS)
    assert kept["event"].to_list() == [
        "open", "order", "refund", "adjustment", "open", "open", "open", "open",
    ]  # fmt: skip


def test_rejects_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAPSE_HOME")  # the default path is beside the config file
    events = _write_events(tmp_path / "data" / "events.jsonl")
    _, report = validate_events(events, _config(tmp_path), now=NOW)
    assert report.rejects_path == tmp_path / "events.rejects.parquet"
    rejects = pl.read_parquet(tmp_path / "events.rejects.parquet")
    assert rejects["reason"].to_list() == [
        "null_user_id", "null_user_id", "unparsable_ts", "unparsable_ts", "null_event",
        "negative_quantity",
    ]  # fmt: skip
    assert set(rejects["reason"]) <= set(REJECT_REASONS)
    assert rejects["_ts_raw"].to_list()[2:4] == ["garbage", None]
    assert {*EVENT_COLUMNS, "reason"} <= set(rejects.columns)


def test_given_rejects_path_and_none_when_clean(tmp_path: Path) -> None:
    config = _config(tmp_path)
    target = tmp_path / "out" / "bad.parquet"
    _, report = validate_events(
        _write_events(tmp_path / "events.jsonl"), config, rejects_path=target, now=NOW
    )
    assert report.rejects_path == target
    assert pl.read_parquet(target).height == 6

    clean = _write_events(tmp_path / "clean.jsonl", ROWS[:2])
    _, report = validate_events(clean, config, now=NOW)
    assert report.rejects_path is None
    assert report.rejected_share == 0.0
    assert not (tmp_path / "clean.rejects.parquet").exists()


def test_future_events_relative_to_as_of(tmp_path: Path) -> None:
    events = _write_events(tmp_path / "events.jsonl")
    as_of = datetime(2024, 1, 4, 12)  # naive means UTC
    _, report = validate_events(events, _config(tmp_path), as_of=as_of, now=NOW)
    assert report.future_events == 3  # later than 2024-01-05 12:00: rows 14, 15, 16
    strict = _config(tmp_path, future_tolerance_hours=0)
    _, report = validate_events(events, strict, as_of=as_of, now=NOW)
    assert report.future_events == 4  # rows 13-16; row 12 is a dropped duplicate
    _, report = validate_events(events, strict, now=NOW)
    assert report.future_events == 2  # rows 15 and 16 (23:00 on the day of `now`)


def test_duplicates_without_message_id(tmp_path: Path) -> None:
    events = _write_events(tmp_path / "events.jsonl")
    _, report = validate_events(events, _config(tmp_path, message_id=None), now=NOW)
    assert report.duplicates == 1  # only the identical row 11; row 12 differs in content


def test_read_events_matches_validate(tmp_path: Path) -> None:
    events = _write_events(tmp_path / "events.jsonl")
    config = _config(tmp_path)
    lazy = read_events(events, config)
    assert isinstance(lazy, pl.LazyFrame)
    kept, _ = validate_events(events, config, now=NOW)
    assert lazy.collect().equals(kept)


def test_properties_are_kept(tmp_path: Path) -> None:
    events = _write_events(tmp_path / "events.jsonl", ROWS[:2])
    kept, _ = validate_events(events, _config(tmp_path, properties=["code", "mid"]), now=NOW)
    assert kept.columns == [*EVENT_COLUMNS, "code", "mid"]
    assert kept["mid"].to_list() == ["m1", "m2"]


def test_default_rejects_path_names() -> None:
    config = LapseConfig()
    assert rejects_path_for("/data/events.csv.gz", config).name == "events.rejects.parquet"
    assert rejects_path_for("/data/shards/*.parquet", config).name == "shards.rejects.parquet"
    assert rejects_path_for("/data/hive", config) == config.base_dir / "hive.rejects.parquet"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", None]),
            st.sampled_from([0, 1]),
            st.sampled_from([None, 0.0, -0.0, 1.5, float("nan")]),
        ),
        max_size=40,
    )
)
def test_first_distinct_equals_the_exact_row_comparison(rows: list[Any]) -> None:
    """The hashed shortcut keeps exactly the rows a whole-row comparison keeps."""
    frame = pl.DataFrame(rows, schema=["u", "n", "x"], orient="row")
    exact = frame.select(pl.struct("u", "n", "x").is_first_distinct()).to_series()
    assert _first_distinct(frame, ["u", "n", "x"]).to_list() == exact.to_list()


# -- source.order_id ---------------------------------------------------------------------------

INVOICE_LINES = """InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID
536365,A,6,2010-12-01 08:26:00,17850.0
536365,B,6,2010-12-01 08:26:00,17850.0
536365,B,6,2010-12-01 08:26:00,17850.0
536366,B,6,2010-12-01 08:26:00,17850.0
C536367,A,-1,2010-12-02 09:00:00,17850.0
,A,1,2010-12-03 09:00:00,17850.0
536365,A,2,2010-12-04 10:00:00,13047.0
"""


def _invoice_config(tmp_path: Path, **source: Any) -> LapseConfig:
    spec = {
        "columns": {"user_id": "CustomerID", "ts": "InvoiceDate", "sku": "StockCode"},
        "event_name": "purchase",
        "row_rules": [
            {"column": "InvoiceNo", "op": "starts_with", "value": "C", "event": "return"}
        ],
        **source,
    }
    path = tmp_path / "lapse.yaml"
    roles = {"purchase": ["purchase"], "return": ["return"]}
    path.write_text(yaml.safe_dump({"source": spec, "roles": roles}))
    return load_config(path)


def test_order_id_is_carried_and_orders_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_text(INVOICE_LINES)
    kept, report = validate_events(path, _invoice_config(tmp_path, order_id="InvoiceNo"), now=NOW)
    assert kept.columns == [*EVENT_COLUMNS, "order_id"]
    # the repeated line of 536365 is a duplicate; the same line in 536366 is not
    assert report.duplicates == 1
    assert kept["order_id"].to_list() == [
        "536365", "536365", "536366", "C536367", None, "536365",
    ]  # fmt: skip
    # 536365 and 536366 of 17850, its row without a number, 536365 of 13047; not the return
    assert report.purchase_orders == 4

    _, per_row = validate_events(path, _invoice_config(tmp_path), now=NOW)
    assert per_row.purchase_orders is None
    assert per_row.duplicates == 2  # without the order key the two B lines of 536366 match too


def test_order_id_column_must_exist_and_not_clash(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_text(INVOICE_LINES)
    with pytest.raises(MissingColumnsError, match="OrderNo"):
        validate_events(path, _invoice_config(tmp_path, order_id="OrderNo"), now=NOW)
    with pytest.raises(ConfigError, match="properties lists 'order_id'"):
        _invoice_config(tmp_path, order_id="InvoiceNo", properties=["order_id"])


def test_validate_says_how_purchases_are_counted(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app

    path = tmp_path / "lines.csv"
    path.write_text(INVOICE_LINES)
    _invoice_config(tmp_path)
    per_row = CliRunner().invoke(app, ["validate", str(path), "-c", str(tmp_path / "lapse.yaml")])
    assert per_row.exit_code == 0, per_row.output
    assert "per row (no source.order_id)" in per_row.output
    _invoice_config(tmp_path, order_id="InvoiceNo")
    orders = CliRunner().invoke(app, ["validate", str(path), "-c", str(tmp_path / "lapse.yaml")])
    assert "purchase orders" in orders.output and "4 (source.order_id)" in orders.output


# -- guest rows -----------------------------------------------------------------------

ORDERS = [  # a shop log: a quarter of the rows are guest checkouts without a customer id
    {"customer": "c1", "ts": "2024-01-01T10:00:00Z", "sku": "A"},
    {"customer": "c1", "ts": "2024-01-08T10:00:00Z", "sku": "B"},
    {"customer": None, "ts": "2024-01-09T10:00:00Z", "sku": "A"},
    {"customer": "c2", "ts": "2024-01-10T10:00:00Z", "sku": "A"},
    {"customer": "", "ts": "2024-01-11T10:00:00Z", "sku": "B"},
    {"customer": "c2", "ts": "2024-01-12T10:00:00Z", "sku": "B"},
    {"customer": "c3", "ts": "2024-01-13T10:00:00Z", "sku": "A"},
    {"customer": "c3", "ts": "bad", "sku": "A"},
]


def _orders(tmp_path: Path, *, guests: bool) -> tuple[Path, Path]:
    events = tmp_path / "orders.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in ORDERS) + "\n")
    config = tmp_path / "lapse.yaml"
    source = {"columns": {"user_id": "customer"}, "event_name": "purchase"}
    config.write_text(yaml.safe_dump({"source": {**source, "allow_guest_rows": guests}}))
    return events, config


def test_guest_rows_are_counted_not_rejected(tmp_path: Path) -> None:
    events, config_path = _orders(tmp_path, guests=True)
    kept, report = validate_events(events, load_config(config_path), now=NOW)
    assert report.guest_rows == 2
    assert report.rejected_by_reason == {
        "null_user_id": 0,
        "unparsable_ts": 1,
        "null_event": 0,
        "negative_quantity": 0,
    }
    assert report.rows_read == 8 == report.rows_kept + report.rows_rejected + report.guest_rows
    assert report.users == 3 and kept["user_id"].null_count() == 0  # guests never become users
    assert pl.read_parquet(report.rejects_path)["reason"].to_list() == ["unparsable_ts"]
    assert read_events(events, load_config(config_path)).collect().equals(kept)

    _, strict = validate_events(events, load_config(_orders(tmp_path, guests=False)[1]), now=NOW)
    assert strict.guest_rows == 0 and strict.rejected_by_reason["null_user_id"] == 2


def test_validate_cli_rejects_guests_unless_the_config_accepts_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app

    runner = CliRunner()
    events, config_path = _orders(tmp_path, guests=False)
    refused = runner.invoke(app, ["validate", str(events), "--config", str(config_path)])
    assert refused.exit_code == 1
    assert "source.allow_guest_rows: true" in " ".join(refused.output.split())

    events, config_path = _orders(tmp_path, guests=True)
    accepted = runner.invoke(
        app, ["validate", str(events), "--config", str(config_path), "--max-reject-share", "0.2"]
    )
    assert accepted.exit_code == 0, accepted.output
    assert "guest rows (no user id)" in accepted.output


# -- slices ------------------------------------------------------------------------------


def _in_slices_and_at_once(
    source: str | Path | pl.DataFrame,
    config: LapseConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
) -> None:
    """``validate_events`` and ``read_events`` of ``source`` in slices of ``rows`` rows
    equal one pass: the kept rows, every count of the report, the rejected rows."""
    from dataclasses import replace

    from lapse.events import validate

    def run(name: str) -> tuple[pl.DataFrame, Any, pl.DataFrame | None, pl.DataFrame]:
        rejects = tmp_path / f"{name}.rejects.parquet"
        kept, report = validate_events(source, config, now=NOW, rejects_path=rejects)
        written = pl.read_parquet(rejects) if report.rejects_path else None
        return (
            kept,
            replace(report, rejects_path=None),
            written,
            read_events(source, config).collect(),
        )

    whole = run("whole")
    monkeypatch.setattr(validate, "MAP_BATCH_ROWS", rows)
    assert validate._batch_rows(source, config) == rows
    sliced = run("sliced")
    assert sliced[0].n_chunks() > 1  # one chunk a slice: it was read in slices
    assert_frame_equal(sliced[0], whole[0])
    assert sliced[1] == whole[1]
    assert (sliced[2] is None) == (whole[2] is None)
    if sliced[2] is not None and whole[2] is not None:
        assert_frame_equal(sliced[2], whole[2])
    assert_frame_equal(sliced[3], whole[3])
    assert_frame_equal(sliced[3], whole[0])


@pytest.mark.parametrize("kind", ["parquet", "frame"])
@pytest.mark.parametrize("guests", [False, True])
def test_slices_of_a_parquet_file_or_a_frame_equal_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, guests: bool
) -> None:
    """Every reject reason, guest rows, a duplicate row and a duplicate message id in
    another slice than their first occurrence: slices of 3 of the 16 rows give what one pass
    gives."""
    keys = ["user_id", "ts", "event", "quantity", "mid", "code"]
    frame = pl.DataFrame(ROWS, schema=keys, orient="row")
    path = tmp_path / "events.parquet"
    frame.write_parquet(path, row_group_size=5)
    config = _config(tmp_path, allow_guest_rows=guests)
    source: Path | pl.DataFrame = path if kind == "parquet" else frame
    _in_slices_and_at_once(source, config, tmp_path, monkeypatch, rows=3)
    _, report = validate_events(source, config, now=NOW)
    assert report.duplicates == 2 and report.rows_read == 16  # the cases are there


def test_slices_of_a_segment_export_count_calls_and_links_as_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identify calls, anonymous ids and their links spread over slices: the same calls,
    links, merged and anonymous-only ids as one pass."""
    from lapse.datasets import generate, write_segment

    paths = write_segment(generate(n_users=40, n_days=30, seed=5), tmp_path, seed=5)
    frame = pl.read_ndjson(paths["segment"])
    config = load_config()
    _, report = validate_events(frame, config, now=NOW)
    assert report.calls["identify"] > 3 and report.links > 3 and report.merged_ids > 3
    _in_slices_and_at_once(frame, config, tmp_path, monkeypatch, rows=frame.height // 7)


def test_text_files_and_lazy_frames_are_read_in_one_pass(tmp_path: Path) -> None:
    """A slice of a CSV/NDJSON file or of a LazyFrame's plan would read it again: no
    slices."""
    from lapse.events.validate import _batch_rows

    config = _config(tmp_path)
    assert _batch_rows(_write_events(tmp_path / "events.jsonl"), config) is None
    assert _batch_rows(pl.LazyFrame({"user_id": ["u1"]}), config) is None
