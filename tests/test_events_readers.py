"""scan_source: every supported layout, and one-line errors for unreadable files."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from lapse.config import LapseConfig
from lapse.events import scan_source, validate_events
from lapse.exceptions import ReadError

FRAME = pl.DataFrame({"user_id": ["a", "b", "c"], "n": [1, 2, 3]})


def _rows(lf: pl.LazyFrame) -> list[tuple[object, ...]]:
    return sorted(lf.collect().select("user_id", "n").iter_rows())


EXPECTED = [("a", 1), ("b", 2), ("c", 3)]


def test_parquet_file(tmp_path: Path) -> None:
    FRAME.write_parquet(tmp_path / "e.parquet")
    lf = scan_source(tmp_path / "e.parquet")
    assert isinstance(lf, pl.LazyFrame)
    assert _rows(lf) == EXPECTED


def test_parquet_directory_and_glob(tmp_path: Path) -> None:
    FRAME.head(2).write_parquet(tmp_path / "part-0.parquet")
    FRAME.tail(1).write_parquet(tmp_path / "part-1.parquet")
    (tmp_path / "_SUCCESS").write_text("")  # marker files are ignored
    assert _rows(scan_source(tmp_path)) == EXPECTED
    assert _rows(scan_source(str(tmp_path / "part-*.parquet"))) == EXPECTED


def test_hive_partitioned_folder(tmp_path: Path) -> None:
    for day, frame in (("2024-01-01", FRAME.head(2)), ("2024-01-02", FRAME.tail(1))):
        folder = tmp_path / f"day={day}"
        folder.mkdir()
        frame.write_parquet(folder / "data.parquet")
    got = scan_source(tmp_path).collect().sort("user_id")
    assert got["user_id"].to_list() == ["a", "b", "c"]
    assert got["day"].cast(pl.String).to_list() == ["2024-01-01", "2024-01-01", "2024-01-02"]


def test_csv_tsv_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("user_id,n\na,1\nb,2\nc,3\n")
    (tmp_path / "e.tsv").write_text("user_id\tn\na\t1\nb\t2\nc\t3\n")
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(b"user_id,n\na,1\nb,2\nc,3\n"))
    (tmp_path / "semi.csv").write_text("user_id;n\na;1\nb;2\nc;3\n")
    for name in ("e.csv", "e.tsv", "e.csv.gz"):
        assert _rows(scan_source(tmp_path / name)) == EXPECTED, name
    assert _rows(scan_source(tmp_path / "semi.csv", csv_separator=";")) == EXPECTED


def test_csv_column_that_turns_textual_late_is_read_as_text(tmp_path: Path) -> None:
    # InvoiceNo is numeric for 200 rows, then "C536379": inference must see it.
    lines = ["InvoiceNo,n", *(f"{536365 + i},{i}" for i in range(200)), "C536379,-1"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    got = scan_source(tmp_path / "t.csv").collect()
    assert got.schema["InvoiceNo"] == pl.String
    assert got["InvoiceNo"][-1] == "C536379"


def test_ndjson(tmp_path: Path) -> None:
    rows = [{"user_id": "a", "n": 1}, {"user_id": "b", "n": 2}, {"user_id": "c", "n": 3}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    for name in ("e.ndjson", "e.jsonl", "e.json"):
        (tmp_path / name).write_text(text)
        assert _rows(scan_source(tmp_path / name)) == EXPECTED, name


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    FRAME.write_parquet(tmp_path / "events.data")
    (tmp_path / "events.log").write_text('{"user_id": "a", "n": 1}\n')
    (tmp_path / "events.dat").write_text("user_id,n\na,1\n")
    assert _rows(scan_source(tmp_path / "events.data")) == EXPECTED
    assert _rows(scan_source(tmp_path / "events.log")) == [("a", 1)]
    assert _rows(scan_source(tmp_path / "events.dat")) == [("a", 1)]


SEGMENT = [
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": "anon-1",
        "timestamp": "2024-01-01T10:00:00.000Z",
        "messageId": "m1",
        "properties": {"sku": "S1", "quantity": 2, "revenue": 9.5},
        "context": {"ip": "1.2.3.4"},
    },
    {
        "type": "track",
        "event": "App Opened",
        "userId": None,
        "anonymousId": "anon-2",
        "timestamp": "2024-01-01T11:00:00+02:00",
        "messageId": "m2",
        "properties": {"plan": "pro"},
        "context": {"ip": "5.6.7.8"},
    },
]


def _write_segment(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in SEGMENT) + "\n")
    return path


def test_segment_export_is_detected_and_flattened(tmp_path: Path) -> None:
    lf = scan_source(_write_segment(tmp_path / "track.jsonl"))
    schema = lf.collect_schema()
    assert {
        "properties.sku",
        "properties.quantity",
        "properties.revenue",
        "properties.plan",
    } <= set(schema)
    assert "context.ip" in schema
    assert "properties" not in schema
    got = lf.collect()
    assert got["properties.plan"].to_list() == [None, "pro"]
    assert got["anonymousId"].to_list() == ["anon-1", "anon-2"]


def test_segment_format_forced(tmp_path: Path) -> None:
    lf = scan_source(_write_segment(tmp_path / "track.txt"), fmt="segment")
    assert "properties.sku" in lf.collect_schema()


def _one_line_error(path: str | Path, fragment: str) -> str:
    with pytest.raises(ReadError) as info:
        scan_source(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message
    return message


def test_missing_path(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.parquet", "file not found")


def test_glob_without_matches(tmp_path: Path) -> None:
    _one_line_error(str(tmp_path / "*.parquet"), "no files match")


def test_empty_files(tmp_path: Path) -> None:
    for name in ("empty.parquet", "empty.csv", "empty.ndjson"):
        (tmp_path / name).write_bytes(b"")
        _one_line_error(tmp_path / name, "the file is empty")


def test_files_without_rows(tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("user_id,ts,event\n")
    (tmp_path / "header.tsv.gz").write_bytes(gzip.compress(b"user_id\tts\tevent\n"))
    FRAME.clear().write_parquet(tmp_path / "none.parquet")
    for name in ("header.csv", "header.tsv.gz", "none.parquet"):
        _one_line_error(tmp_path / name, "the file has no rows, only a header or schema")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        FRAME.clear().write_parquet(shards / f"part-{k}.parquet")
    _one_line_error(shards, "its 2 files have no rows")
    FRAME.write_parquet(shards / "part-2.parquet")  # one shard with rows: the source has rows
    assert _rows(scan_source(shards)) == EXPECTED


def test_empty_folder(tmp_path: Path) -> None:
    _one_line_error(tmp_path, "no data files")


def test_truncated_parquet(tmp_path: Path) -> None:
    FRAME.write_parquet(tmp_path / "full.parquet")
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut.parquet", "truncated or corrupt Parquet file")


def test_csv_named_parquet(tmp_path: Path) -> None:
    (tmp_path / "events.parquet").write_text("user_id,n\na,1\n")
    _one_line_error(tmp_path / "events.parquet", "not a Parquet file")


def test_json_array_is_not_ndjson(tmp_path: Path) -> None:
    (tmp_path / "events.ndjson").write_text('[{"user_id": "a"},\n{"user_id": "b"}]')
    _one_line_error(tmp_path / "events.ndjson", "cannot read as ndjson")


def test_damaged_shard_fails_at_collect_with_one_line(tmp_path: Path) -> None:
    frame = pl.DataFrame({"user_id": ["a"], "ts": [datetime(2024, 1, 1)], "event": ["e"]})
    frame.write_parquet(tmp_path / "a.parquet")
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "b.parquet").write_bytes(data[:-10])  # footer cut: found only when read
    with pytest.raises(ReadError) as info:
        validate_events(tmp_path, LapseConfig())
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


# -- input edges: the file is not what lapse reads, and the error says so in one line --------
EVENTS_CSV = "user_id,ts,event\nu1,2024-01-01T10:00:00,order\nu2,2024-01-02T11:00:00,order\n"


def _lapse(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from lapse.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_a_header_naming_a_column_twice_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user_id,ts,event,user_id\nu1,2024-01-01,order,u2\n")
    message = _one_line_error(path, "names column 'user_id' more than once")
    assert "rename or remove" in message
    # a column whose name merely looks like Polars' renaming is fine
    path.write_text("user_id,ts,event,event_duplicated_0\nu1,2024-01-01,order,x\n")
    assert scan_source(path).collect().width == 4


@pytest.mark.parametrize(
    ("encoding", "name"),
    [
        ("utf-16", "UTF-16 (little-endian)"),  # with a byte-order mark
        ("utf-16-be", "UTF-16 (big-endian)"),  # without one
        ("utf-32", "UTF-32 (little-endian)"),
    ],
)
def test_a_utf16_or_utf32_file_is_refused_naming_the_encoding(
    tmp_path: Path, encoding: str, name: str
) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(EVENTS_CSV.encode(encoding))
    message = _one_line_error(path, f"the file is {name} text")
    assert "UTF-8" in message and "iconv" in message
    gz = tmp_path / "events.csv.gz"
    gz.write_bytes(gzip.compress(EVENTS_CSV.encode(encoding)))
    _one_line_error(gz, f"is {name} text")
    # UTF-8, with or without a byte-order mark, reads as always
    path.write_bytes(EVENTS_CSV.encode("utf-8-sig"))
    assert scan_source(path).collect_schema().names() == ["user_id", "ts", "event"]


def test_a_binary_or_system_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    binary = tmp_path / "blob.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    _one_line_error(binary, "is not text: it holds binary data")
    system = tmp_path / "passwd.csv"  # e.g. a symlink to /etc/passwd
    system.write_text(
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    )
    code, output = _lapse("validate", str(system))
    assert code == 2
    assert output.count("\n") == 1 and "Traceback" not in output
    assert "passwd.csv: not a table of events" in output
    assert "expected the columns user_id, ts, event" in output
    assert "root:x" not in output and "/bin/bash" not in output and "daemon" not in output
    # a table with another separator is told where to say so
    semi = tmp_path / "semi.csv"
    semi.write_text("user_id;ts;event\nu1;2024-01-01;order\n")
    code, output = _lapse("validate", str(semi))
    assert code == 2 and "source.csv_separator" in output and "user_id;ts" not in output


def test_a_duckdb_query_with_a_syntax_error_is_one_config_line(tmp_path: Path) -> None:
    import duckdb
    import yaml

    from lapse.config import dump_config, load_config
    from lapse.events.database import scan_database
    from lapse.exceptions import ConfigError

    db = tmp_path / "events.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE events AS SELECT 'u1' AS user_id, now() AS ts, 'x' AS event")
    data = yaml.safe_load(dump_config(load_config()))
    data["source"].update(format="duckdb", sql={"query": "SELEC * FORM events"})
    config = tmp_path / "lapse.yaml"
    config.write_text(yaml.safe_dump(data))
    code, output = _lapse("validate", str(db), "--config", str(config))
    assert code == 2
    assert output.count("\n") == 1 and "Traceback" not in output
    assert "source.sql.query cannot run: Parser Error: syntax error" in output
    data["source"]["sql"]["query"] = "SELECT nope FROM events"
    with pytest.raises(ConfigError, match=r"source.sql.query cannot run: Binder Error"):
        scan_database(db, LapseConfig.model_validate(data).source)


def test_a_read_comes_in_one_chunk_per_column(tmp_path: Path) -> None:
    """Row groups read as chunks cut differently per column made every filter copy the
    whole frame to align them: a read is rechunked, a column at a time."""
    from lapse.events.readers import collect_frame

    path = tmp_path / "events.parquet"
    frame = pl.DataFrame({"user_id": [str(i) for i in range(1000)], "x": range(1000)})
    frame.write_parquet(path, row_group_size=100)
    read = collect_frame(pl.scan_parquet(path).with_columns(pl.col("x") * 2), str(path))
    assert read.n_chunks("all") == [1, 1]
    assert read.equals(frame.with_columns(pl.col("x") * 2))
