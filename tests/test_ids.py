"""Ids are read as written (#18): ``00001`` stays ``00001`` from a text source to the
features, the records, the audit snapshot and every sink's request body."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from lapse.config import LapseConfig, dump_config, load_config
from lapse.datasets import generate
from lapse.events import read_attributes, read_events
from lapse.features import build, build_sku
from lapse.labels import eligible
from lapse.score.run import run_score
from lapse.sinks.file import read_records
from lapse.train.churn import train
from pg_server import pg_schema, pg_server  # noqa: F401  (fixtures)
from platform_servers import (
    KEY,
    BrazeServer,
    CustomerioServer,
    IterableServer,
    KlaviyoServer,
    PlatformServer,
    SegmentServer,
    WebhookServer,
    served,  # noqa: F401  (fixture)
)

# -- the reader alone ------------------------------------------------------------------------


def _config(**source: Any) -> LapseConfig:
    return LapseConfig.model_validate({"source": {"event_name": "purchase", **source}})


def _ids(path: Path, config: LapseConfig) -> pl.DataFrame:
    events = read_events(path, config).collect()
    return events.select("user_id", "sku")


@pytest.mark.parametrize("sep", [",", "\t"], ids=["csv", "tsv"])
def test_numeric_looking_csv_ids_are_read_as_written(tmp_path: Path, sep: str) -> None:
    # Every id column looks numeric, so inference would make 00001 the number 1 and
    # collapse the message ids 7 and 007 into one (a duplicate dropped).
    rows = [
        ["Customer", "Day", "Code", "Msg"],
        ["00001", "2024-01-02", "0042", "7"],
        ["0042", "2024-01-03", "00001", "007"],
        ["17", "2024-01-04", "17", "0007"],
    ]
    path = tmp_path / ("tx.tsv" if sep == "\t" else "tx.csv")
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n", encoding="utf-8")
    config = _config(columns={"user_id": "Customer", "ts": "Day", "sku": "Code"}, message_id="Msg")
    assert _ids(path, config).rows() == [("00001", "0042"), ("0042", "00001"), ("17", "17")]


def test_ndjson_and_segment_numbers_keep_every_digit(tmp_path: Path) -> None:
    # Whole JSON numbers beside floats would be read as floats: 20 digits do not fit.
    big = 12345678901234567891
    plain = tmp_path / "events.ndjson"
    plain.write_text(
        f'{{"user_id": {big}, "ts": "2024-01-02", "sku": {big}}}\n'
        '{"user_id": 17850.0, "ts": "2024-01-03", "sku": 1.5}\n',
        encoding="utf-8",
    )
    want = [(str(big), str(big)), ("17850", "1.5")]
    assert _ids(plain, _config()).rows() == want
    segment = tmp_path / "segment.ndjson"
    segment.write_text(
        f'{{"userId": {big}, "timestamp": "2024-01-02", "event": "Order Completed", '
        f'"messageId": {big}, "properties": {{"sku": {big}}}}}\n'
        '{"userId": 17850.0, "timestamp": "2024-01-03", "event": "Order Completed", '
        '"messageId": 1.5, "properties": {"sku": 1.5}}\n',
        encoding="utf-8",
    )
    config = _config(format="segment", message_id="messageId", event_name=None)
    assert _ids(segment, config).rows() == want


def test_attribute_ids_are_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("id,plan\n00001,free\n1,pro\n0042,pro\n", encoding="utf-8")
    config = LapseConfig.model_validate({"attributes": {"user_id": "id"}})
    frame, report = read_attributes(path, config)
    assert frame.rows() == [("00001", "free"), ("1", "pro"), ("0042", "pro")]
    assert report.duplicates == 0


# -- from a source file to every sink ---------------------------------------------------------

#: Users as a source writes them and as lapse keeps them (the space is trimmed).
WRITTEN = ("00001", "0042", "A-7", " 17", "0007")
KEPT = ("00001", "0042", "A-7", "17", "0007")
SUPPRESSED = "0007"  # do_not_contact in the attributes file: scored, never sent
SENT = set(KEPT) - {SUPPRESSED}
#: Generated SKUs renamed to numeric-looking ids a reader must not turn into numbers.
SKUS = {"DEVICE-1": "0001", "PODS-30": "0030", "PODS-60": "0060", "MUG-1": "0002"}


@dataclass(frozen=True)
class Sources:
    files: dict[str, Path]  # reader -> events of the five users
    rows: int
    attributes: Path
    bundle: Path
    as_of: datetime


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    """A bundle trained on generated events whose SKUs are numeric-looking text, and the
    events of five eligible buyers of pods under the ids of :data:`WRITTEN`."""
    root = tmp_path_factory.mktemp("ids")
    events = generate(n_users=300, n_days=150, seed=7).events.with_columns(
        pl.col("sku").replace_strict(SKUS, default=None)
    )
    start = events["ts"].min()
    assert isinstance(start, datetime)
    start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    train_file = root / "train.parquet"
    events.filter(pl.col("ts") < start + timedelta(days=120)).write_parquet(train_file)
    config = load_config().model_copy(deep=True)
    config.features.units_per_pack = {"0030": 30, "0060": 60}
    config.attributes.static_features = []
    train(train_file, config, out_dir=root / "report", models_dir=root / "models")

    as_of = start + timedelta(days=130)
    past = events.filter(pl.col("ts") < as_of)
    pods = past.filter(pl.col("sku").is_in(["0030", "0060"]))["user_id"].unique().to_list()
    users = eligible(past.lazy(), [as_of], config).filter(pl.col("user_id").is_in(pods))
    chosen = sorted(users["user_id"].to_list())[: len(WRITTEN)]
    rename = dict(zip(chosen, WRITTEN, strict=True))
    mine = (
        past.filter(pl.col("user_id").is_in(chosen))
        .with_columns(
            pl.col("user_id").replace_strict(rename),
            pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        )
        .with_row_index("n")
        # distinct as text, yet 7 and 07 are one number: a numeric read would drop rows
        .with_columns(
            pl.when(pl.col("n") % 2 == 1)
            .then(pl.format("0{}", pl.col("n") // 2))
            .otherwise((pl.col("n") // 2).cast(pl.String))
            .alias("message_id")
        )
        .drop("n")
    )
    files = {"csv": root / "events.csv", "ndjson": root / "events.ndjson"}
    mine.write_csv(files["csv"])
    mine.write_ndjson(files["ndjson"])
    attributes = root / "users.csv"
    attributes.write_text(
        "user_id,do_not_contact\n00001,false\n0042,false\n0007,true\n", encoding="utf-8"
    )
    return Sources(files, mine.height, attributes, root / "models" / "lapse.pkl", as_of)


def _score_config(home: Path, sources: Sources) -> LapseConfig:
    data = yaml.safe_load(dump_config(load_config()))
    data["source"]["message_id"] = "message_id"
    data["attributes"].update(path=str(sources.attributes), static_features=[])
    data["features"]["units_per_pack"] = {"0030": 30, "0060": 60}
    data["delivery"].update(backoff_seconds=0.0)
    data["sinks"]["klaviyo"]["poll_seconds"] = 0.0
    path = home / "lapse.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path)


#: HTTP sink -> its local server and the environment pointing the sink at it.
SERVERS: dict[str, tuple[Callable[[], PlatformServer], Callable[[str], dict[str, str]]]] = {
    "braze": (BrazeServer, lambda url: {"BRAZE_API_KEY": KEY, "BRAZE_BASE_URL": url}),
    "klaviyo": (KlaviyoServer, lambda url: {"KLAVIYO_API_KEY": KEY, "KLAVIYO_BASE_URL": url}),
    "customerio": (
        CustomerioServer,
        lambda url: {
            "CUSTOMERIO_API_KEY": KEY,
            "CUSTOMERIO_SITE_ID": CustomerioServer.SITE,
            "CUSTOMERIO_BASE_URL": url,
        },
    ),
    "segment": (SegmentServer, lambda url: {"SEGMENT_API_KEY": KEY, "SEGMENT_BASE_URL": url}),
    "iterable": (IterableServer, lambda url: {"ITERABLE_API_KEY": KEY, "ITERABLE_BASE_URL": url}),
    "webhook": (WebhookServer, lambda url: {"WEBHOOK_SECRET": KEY, "WEBHOOK_URL": f"{url}/hook"}),
}


def _sql_ids(uri: str) -> set[str]:
    import psycopg

    from lapse.sinks.sql import LATEST_TABLE

    with psycopg.connect(uri) as conn:
        rows = conn.execute(f"SELECT user_id FROM {LATEST_TABLE}").fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize("sink", ["file", "sql", *SERVERS])
@pytest.mark.parametrize("reader", ["csv", "ndjson"])
def test_ids_survive_from_source_to_every_sink(
    reader: str,
    sink: str,
    sources: Sources,
    _isolated_home: Path,
    served: Callable[[PlatformServer], PlatformServer],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    config = _score_config(_isolated_home, sources)
    path = sources.files[reader]
    events = read_events(path, config)
    assert events.select(pl.len()).collect().item() == sources.rows  # no message id merged
    assert set(build(events, sources.as_of, config)["user_id"]) == set(KEPT)
    skus = set(build_sku(events, sources.as_of, config)["sku"])
    assert skus <= set(SKUS.values()) and skus & {"0030", "0060"}  # they all bought pods

    server = None
    if sink == "sql":
        uri, _ = request.getfixturevalue("pg_schema")
        monkeypatch.setenv("LAPSE_SQL_SINK_URI", uri)
    elif sink in SERVERS:
        make, env = SERVERS[sink]
        server = served(make())
        for name, value in env(server.url).items():
            monkeypatch.setenv(f"LAPSE_{name}", value)
    out = _isolated_home / "scores.parquet"
    result = run_score(
        path, config, as_of=sources.as_of, model=str(sources.bundle), sink=sink, out=out
    )
    assert result.complete and result.counts["sent"] == len(SENT), result.counts

    assert result.snapshot is not None
    snapshot = pl.read_parquet(result.snapshot)
    assert sorted(snapshot["user_id"]) == sorted(KEPT)
    assert snapshot.filter("suppressed")["user_id"].to_list() == [SUPPRESSED]
    if sink == "file":
        records = read_records(out)
        assert sorted(records["user_id"]) == sorted(SENT)
    elif sink == "sql":
        assert _sql_ids(uri) == SENT
    else:
        assert server is not None
        # what the server parsed out of the request bodies, and the bodies themselves
        assert set(server.profiles) == server.seen == SENT
        bodies = "".join(r.body.decode() for r in server.requests)
        assert all(json.dumps(user) in bodies for user in SENT)
        assert json.dumps(SUPPRESSED) not in bodies
