"""Identity resolution: Segment call types, links, point-in-time merging (#28)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from lapse import LapseConfig
from lapse.events import validate_events
from lapse.events.identity import (
    LINK_SCHEMA,
    anonymous_only,
    canonical_ids,
    changing_ids,
    resolve,
    union_links,
)
from lapse.events.validate import (
    read_events,
    read_events_with_links,
    read_links,
    validate_with_links,
)
from lapse.features import build, build_many

CONFIG = LapseConfig.model_validate(
    {
        "roles": {
            "usage": ["App Opened"],
            "purchase": ["Order Completed"],
            "setup_started": ["Setup Started"],
        }
    }
)

# two anonymous track calls, an identify, an order by the identified user, an app
# open from a second device
FIVE_LINES = [
    {"type": "track", "event": "Setup Started", "anonymousId": "anon-1", "userId": None,
     "timestamp": "2026-03-01T09:00:00Z", "messageId": "m1"},
    {"type": "track", "event": "App Opened", "anonymousId": "anon-1", "userId": None,
     "timestamp": "2026-03-01T09:05:00Z", "messageId": "m2"},
    {"type": "identify", "anonymousId": "anon-1", "userId": "u-42",
     "timestamp": "2026-03-02T10:00:00Z", "messageId": "m3", "traits": {"email": "a@b.c"}},
    {"type": "track", "event": "Order Completed", "userId": "u-42", "anonymousId": "anon-1",
     "timestamp": "2026-03-03T12:00:00Z", "messageId": "m4",
     "properties": {"sku": "S1", "quantity": 1, "revenue": 20.0}},
    {"type": "track", "event": "App Opened", "anonymousId": "anon-2", "userId": "u-42",
     "timestamp": "2026-03-05T08:00:00Z", "messageId": "m5"},
]  # fmt: skip


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def day(d: int) -> datetime:
    return datetime(2026, 3, d, tzinfo=UTC)


def test_five_line_export_is_one_customer_after_identify(tmp_path: Path) -> None:
    path = write(tmp_path / "export.jsonl", FIVE_LINES)
    events, report = validate_events(path, CONFIG, as_of=day(10))
    assert report.rows_rejected == 0
    assert report.rejects_path is None
    assert report.calls == {"identify": 1}
    assert (report.rows_kept, report.duplicates) == (4, 0)
    assert (report.links, report.merged_ids, report.anonymous_only) == (2, 2, 0)
    links = read_links(path, CONFIG)

    later = build(events.lazy(), day(10), CONFIG, links=links)
    assert later["user_id"].to_list() == ["u-42"]
    row = later.row(0, named=True)
    assert row["usage_count_14d"] == 2  # both devices' app opens
    assert row["setup_started_count_14d"] == 1
    assert row["purchase_count_14d"] == 1
    assert row["tenure_days"] == 8  # from the anonymous setup on 2026-03-01

    before = build(events.lazy(), day(2), CONFIG, links=links)
    assert before["user_id"].to_list() == ["anon-1"]
    assert before.row(0, named=True)["setup_started_count_7d"] == 1
    # without links, the same events stay apart
    assert build(events.lazy(), day(10), CONFIG)["user_id"].to_list() == ["anon-1", "u-42"]


@pytest.mark.parametrize("table", [False, True])
def test_one_read_gives_the_events_and_links_of_two(tmp_path: Path, table: bool) -> None:
    """:func:`validate_with_links` and :func:`read_events_with_links` read each source once
    and give what :func:`validate_events` / :func:`read_events` and :func:`read_links` give
    (the ``identities`` table's links once, and none without a source)."""
    first = write(tmp_path / "a.jsonl", FIVE_LINES[:3])
    second = write(tmp_path / "b.jsonl", FIVE_LINES[3:])
    config = CONFIG.model_copy(deep=True)
    if table:
        (tmp_path / "ids.csv").write_text("device,customer\nd-9,u-42\n")
        config.identities.path = tmp_path / "ids.csv"
        config.identities.anonymous_id, config.identities.user_id = "device", "customer"
    kept, report, links = validate_with_links(first, config, as_of=day(10))
    alone, alone_report = validate_events(first, config, as_of=day(10))
    assert kept.equals(alone) and report == alone_report
    assert links.equals(read_links(first, config)) and links.height == 2 + table
    events, both = read_events_with_links([first, second], config, message_ids=True)
    for frame, path in zip(events, [first, second], strict=True):
        assert frame.equals(read_events(path, config, message_ids=True).collect())
    assert both.equals(union_links([read_links(p, config) for p in (first, second)]))
    assert both.height == 3 + table
    nothing, no_links = read_events_with_links([], config)
    assert nothing == [] and no_links.is_empty()


def test_page_screen_alias_and_group_calls(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"type": "page", "name": "Pricing", "anonymousId": "a-1", "timestamp": "2026-03-01T09:00:00Z"},
        {"type": "page", "anonymousId": "a-1", "timestamp": "2026-03-01T09:01:00Z"},
        {"type": "screen", "userId": "u-1", "timestamp": "2026-03-01T09:02:00Z"},
        {"type": "group", "userId": "u-1", "groupId": "g-1", "timestamp": "2026-03-01T09:03:00Z"},
        {"type": "alias", "previousId": "a-1", "userId": "u-1", "timestamp": "2026-03-01T09:04:00Z"},
        {"type": "identify", "userId": "u-1", "timestamp": "2026-03-01T09:05:00Z"},
        {"type": "track", "event": "App Opened", "userId": "u-1", "timestamp": "2026-03-01T09:06:00Z"},
    ]  # fmt: skip
    path = write(tmp_path / "calls.jsonl", rows)
    events, report = validate_events(path, CONFIG, as_of=day(10))
    assert events["event"].to_list() == ["Pricing", "page", "screen", "App Opened"]
    assert report.rows_rejected == 0
    assert report.calls == {"identify": 1, "alias": 1, "group": 1}
    assert report.rows_read == report.rows_kept + sum(report.calls.values())
    links = read_links(path, CONFIG)
    assert canonical_ids(links).rows() == [("u-1", "u-1"), ("a-1", "u-1")]
    assert build(events.lazy(), day(2), CONFIG, links=links)["user_id"].to_list() == ["u-1"]


def test_source_identity_column_links_a_csv(tmp_path: Path) -> None:
    path = tmp_path / "ev.csv"
    path.write_text(
        "customer,device,when,what\n"
        ",d-1,2026-03-01 09:00:00,App Opened\n"
        "c-7,d-1,2026-03-04 09:00:00,App Opened\n"
    )
    config = CONFIG.model_copy(deep=True)
    config.source.columns = {"user_id": "customer", "ts": "when", "event": "what"}
    config.source.identity = "device"
    events, report = validate_events(path, config, as_of=day(10))
    assert events["user_id"].to_list() == ["d-1", "c-7"]
    assert (report.links, report.merged_ids, report.rows_rejected) == (1, 1, 0)
    links = read_links(path, config)
    assert build(events.lazy(), day(5), config, links=links)["user_id"].to_list() == ["c-7"]
    assert build(events.lazy(), day(3), config, links=links)["user_id"].to_list() == ["d-1"]


def links(*rows: tuple[str, str | None, int]) -> pl.DataFrame:
    return pl.DataFrame([(i, u, day(d)) for i, u, d in rows], schema=LINK_SCHEMA, orient="row")


def test_merging_is_transitive_and_the_first_linked_user_id_wins() -> None:
    lk = links(("a1", "u-2", 3), ("a1", "u-1", 5), ("a2", "u-1", 4), ("a3", None, 1))
    got = dict(canonical_ids(lk).rows())
    # u-2 was linked first (day 3): u-1 and both devices merge into it
    assert got == {"u-2": "u-2", "u-1": "u-2", "a1": "u-2", "a2": "u-2"}
    assert dict(canonical_ids(lk, day(5)).rows()) == {
        "u-2": "u-2", "u-1": "u-1", "a1": "u-2", "a2": "u-1",
    }  # fmt: skip
    assert anonymous_only(lk).to_list() == ["a3"]
    assert anonymous_only(lk, day(4)).to_list() == ["a3"]
    assert anonymous_only(links(("a1", None, 1), ("a1", "u", 4)), day(4)).to_list() == ["a1"]
    assert changing_ids(lk, [day(4), day(6)]).to_list() == ["a1", "a2", "u-1", "u-2"]
    assert changing_ids(lk, [day(6), day(9)]).to_list() == []


def test_canonical_ids_do_not_depend_on_row_order() -> None:
    lk = links(("a", "u-2", 1), ("b", "u-1", 1), ("b", "u-2", 2), ("c", "b", 3), ("d", "u-3", 2))
    want = canonical_ids(lk).sort("id")
    for seed in range(5):
        assert (
            canonical_ids(lk.sample(fraction=1.0, shuffle=True, seed=seed)).sort("id").equals(want)
        )
    # same first-link instant: the smaller id wins
    assert dict(canonical_ids(lk).rows())["u-1"] == "u-1"
    assert dict(canonical_ids(lk).rows())["u-2"] == "u-1"


@pytest.mark.parametrize("as_of", [None, day(2)])
def test_resolve_keeps_unlinked_ids(as_of: datetime | None) -> None:
    ev = pl.LazyFrame({"user_id": ["a1", "x"], "ts": [day(1), day(1)]})
    got = resolve(ev, links(("a1", "u", 1)), as_of).collect()
    assert got["user_id"].to_list() == ["u", "x"]


def test_churn_labels_use_the_ids_of_the_cutoff_and_follow_the_person() -> None:
    from lapse.labels import churn_labels

    config = CONFIG.model_copy(deep=True)
    config.labels.horizon_days = 7
    ts = [day(1), day(3), day(9)]
    ev = pl.LazyFrame({"user_id": ["anon-1", "u-1", "u-1"], "ts": ts, "event": ["App Opened"] * 3})
    lk = links(("anon-1", "u-1", 8))
    got = churn_labels(ev, [day(5), day(10)], config, data_end=day(25), links=lk)
    # day 5: two ids as far as anyone knew, and anon-1's person came back on day 9;
    # day 10: one customer, idle since
    assert got.rows() == [
        ("anon-1", day(5), False),
        ("u-1", day(5), False),
        ("u-1", day(10), True),
    ]
    without = churn_labels(ev, [day(5), day(10)], config, data_end=day(25))
    assert without.rows() == [
        ("anon-1", day(5), True),
        ("u-1", day(5), False),
        ("anon-1", day(10), True),
        ("u-1", day(10), True),
    ]
    features = build_many(ev, [day(5), day(10)], config, links=lk)
    assert features.select("user_id", "cutoff").rows() == got.select("user_id", "cutoff").rows()


def test_cli_validate_and_features_on_the_five_line_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app

    runner = CliRunner()
    path = write(tmp_path / "export.jsonl", FIVE_LINES)
    config = tmp_path / "lapse.yaml"
    config.write_text(
        "roles:\n  usage: [App Opened]\n  purchase: [Order Completed]\n"
        "  setup_started: [Setup Started]\n"
    )
    result = runner.invoke(app, ["validate", str(path), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "identify calls (not events)" in result.output
    out = tmp_path / "f.parquet"
    for as_of, ids in (("2026-03-10", ["u-42"]), ("2026-03-02", ["anon-1"])):
        argv = ["features", str(path), "--config", str(config), "--as-of", as_of, "--out", str(out)]
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert pl.read_parquet(out)["user_id"].to_list() == ids


def test_generated_segment_export_stitches_users_point_in_time(tmp_path: Path) -> None:
    from datetime import timedelta

    from lapse.config import load_config
    from lapse.datasets import generate, write_segment
    from lapse.labels import churn_labels

    data = generate(n_users=120, n_days=100, seed=5)
    paths = write_segment(data, tmp_path, seed=5)
    config = load_config()
    events, report = validate_events(paths["segment"], config)
    assert report.rows_rejected == 0 and report.rows_kept == data.events.height
    ids = pl.read_parquet(paths["identities"])
    assert report.calls == {"identify": ids.height} and ids.height > 10
    links = read_links(paths["segment"], config)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    cuts = [start + timedelta(days=d) for d in (20, 45, 70)]

    def true_ids_at(frame: pl.DataFrame, cutoff: datetime) -> pl.DataFrame:
        """The generator's user ids, anonymous for those identified at or after ``cutoff``."""
        later = ids.filter(pl.col("identified_at") >= cutoff)
        return frame.with_columns(
            pl.col("user_id").replace(
                dict(zip(later["user_id"], later["anonymous_id"], strict=True))
            )
        )

    got = build_many(events.lazy(), cuts, config, links=links)
    labels = churn_labels(
        events.lazy(), cuts, config, data_end=cuts[-1] + timedelta(days=28), links=links
    )
    want_labels = churn_labels(
        data.events.lazy(), cuts, config, data_end=cuts[-1] + timedelta(days=28)
    )
    anonymous_rows = 0
    for cutoff in cuts:
        want = true_ids_at(build(data.events.lazy(), cutoff, config), cutoff).sort("user_id")
        mine = got.filter(pl.col("cutoff") == cutoff).drop("cutoff")
        assert mine.equals(want)
        anonymous_rows += mine.filter(pl.col("user_id").str.starts_with("anon-")).height
        label_rows = true_ids_at(want_labels.filter(pl.col("cutoff") == cutoff), cutoff)
        assert (
            labels.filter(pl.col("cutoff") == cutoff)
            .sort("user_id")
            .equals(label_rows.sort("user_id"))
        )
    assert anonymous_rows > 0  # some users were still anonymous at an early cutoff


def test_cli_generate_segment_writes_an_export_that_validates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lapse.cli import app

    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(
        app, ["generate", "--users", "40", "--days", "40", "--out", str(out), "--segment"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "segment.ndjson").exists() and (out / "identities.parquet").exists()
    result = runner.invoke(app, ["validate", str(out / "segment.ndjson")])
    assert result.exit_code == 0, result.output
    assert "identify calls (not events)" in result.output


def test_a_long_alias_chain_merges_into_its_first_user_id() -> None:
    chain = pl.DataFrame(
        {
            "id": [f"a{i:03d}" for i in range(300)],
            "user_id": [f"a{i + 1:03d}" for i in range(300)],
            "ts": [day(1) + i * (day(2) - day(1)) / 300 for i in range(300)],
        },
        schema=LINK_SCHEMA,
    ).reverse()
    got = canonical_ids(chain)
    assert got.height == 301 and set(got["canonical"]) == {"a001"}


@pytest.mark.parametrize("with_ts", [True, False])
def test_an_identities_table_links_ids(tmp_path: Path, with_ts: bool) -> None:
    from lapse.exceptions import MissingColumnsError

    events = tmp_path / "ev.csv"
    events.write_text(
        "user_id,ts,event\nd-1,2026-03-01 09:00:00,App Opened\nc-7,2026-03-02 09:00:00,App Opened\n"
    )
    table = tmp_path / "ids.csv"
    table.write_text("device,customer,seen\nd-1,c-7,2026-03-04 08:00:00\n,c-8,2026-03-01\n")
    config = CONFIG.model_copy(deep=True)
    config.identities.path = table
    config.identities.anonymous_id = "device"
    config.identities.user_id = "customer"
    config.identities.ts = "seen" if with_ts else None
    kept, _ = validate_events(events, config, as_of=day(10))
    links = read_links(events, config)
    assert links.select("id", "user_id").rows() == [("d-1", "c-7")]
    early = build(kept.lazy(), day(3), config, links=links)["user_id"].to_list()
    assert early == (["c-7", "d-1"] if with_ts else ["c-7"])
    assert build(kept.lazy(), day(5), config, links=links)["user_id"].to_list() == ["c-7"]

    config.identities.user_id = "person"
    with pytest.raises(
        MissingColumnsError, match=r"ids.csv: missing identities columns \['person'\]"
    ):
        read_links(events, config)


def test_replenishment_episodes_merge_anonymous_orders_only_after_the_link() -> None:
    """The race's view at a cutoff (:class:`lapse.train.replenishment._AsOf`): a visitor's
    two anonymous orders are its own episodes before it identifies on the 15th, and the
    customer's first episodes (with their covariates) after it."""
    from lapse.config import load_config
    from lapse.labels.episodes import episodes
    from lapse.train.replenishment import _AsOf

    config = load_config()
    orders = pl.LazyFrame(
        {
            "user_id": ["anon-1", "anon-1", "u-42", "u-7", "u-7"],
            "ts": [day(1), day(11), day(21), day(2), day(12)],
            "event": ["order_completed"] * 5,
            "sku": ["P"] * 5,
            "quantity": [1.0] * 5,
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    links = pl.DataFrame({"id": ["anon-1"], "user_id": ["u-42"], "ts": [day(15)]}, LINK_SCHEMA)
    view = _AsOf(orders, links, config, day(31))
    skus = {"P": 1.0}

    def spans(cutoff: datetime) -> list[tuple[str, int, int, bool]]:
        eps = episodes(view.at(cutoff), config, cutoff=cutoff, skus=skus, target="sku")
        return [
            (u, s.day, e.day, o)
            for u, s, e, o in eps.select("user_id", "start", "end", "observed").iter_rows()
        ]

    def prior_orders(cutoff: datetime) -> dict[tuple[str, int], int]:
        covs = view.covariates(cutoff, skus, "sku")
        return {(u, t.day): n for u, t, n in covs.select("user_id", "ts", "prior_orders").rows()}

    before, after = day(14), day(25)
    assert spans(before) == [
        ("anon-1", 1, 11, True),
        ("anon-1", 11, 14, False),
        ("u-7", 2, 12, True),
        ("u-7", 12, 14, False),
    ]
    assert spans(after) == [
        ("u-42", 1, 11, True),
        ("u-42", 11, 21, True),
        ("u-42", 21, 25, False),
        ("u-7", 2, 12, True),
        ("u-7", 12, 25, False),
    ]
    assert prior_orders(before)[("anon-1", 11)] == 1
    assert prior_orders(after)[("u-42", 21)] == 2  # the visitor's orders came along
    # without links every id keeps its own orders at every cutoff
    alone = _AsOf(orders, None, config, day(31))
    eps = episodes(alone.at(after), config, cutoff=after, skus=skus, target="sku")
    assert eps.filter(pl.col("user_id") == "u-42")["start"].dt.day().to_list() == [21]


def test_drivers_see_the_ids_of_each_cutoff() -> None:
    """Half the users' early events are under ``anon-<id>``: linked before the drivers'
    first cutoff, the table equals the generator's true ids' (the ids of each cutoff);
    without links the visitors are more users."""
    from datetime import timedelta

    from polars.testing import assert_frame_equal

    from lapse.config import load_config
    from lapse.datasets import generate
    from lapse.insights.drivers import DriversResult, stickiness_drivers

    data = generate(n_users=200, n_days=120, seed=7)
    start = data.events["ts"].min()
    assert isinstance(start, datetime)
    early = pl.col("ts") < start + timedelta(days=40)
    odd = pl.col("user_id").str.slice(-1).is_in(["1", "3", "5", "7", "9"])
    events = data.events.with_columns(
        pl.when(early & odd).then("anon-" + pl.col("user_id")).otherwise("user_id").alias("user_id")
    )
    anonymous = events.filter(pl.col("user_id").str.starts_with("anon-"))["user_id"].unique()
    links = pl.DataFrame(
        {
            "id": anonymous,
            "user_id": anonymous.str.strip_prefix("anon-"),
            "ts": [start + timedelta(days=41)] * anonymous.len(),
        },
        LINK_SCHEMA,
    )
    config = load_config()

    def drivers(ev: pl.DataFrame, with_links: pl.DataFrame | None) -> DriversResult:
        got = stickiness_drivers(ev.lazy(), config, min_adopters=5, links=with_links)
        assert min(got.cutoffs) > start + timedelta(days=41)
        return got

    truth = drivers(data.events, None)
    assert truth.table.height > 3
    linked = drivers(events, links)
    assert linked.pairs == truth.pairs
    assert_frame_equal(linked.table, truth.table)  # sums in another order: to rounding
    assert drivers(events, None).pairs > truth.pairs  # the anonymous ids as more users
