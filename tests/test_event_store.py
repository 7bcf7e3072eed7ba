"""The event store of incremental trigger runs: parts by user, read memory-mapped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from lapse.config import load_config
from lapse.events import identity
from lapse.events import store as es
from lapse.events.mapping import MESSAGE_ID
from lapse.events.validate import validate_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _events(rows: list[tuple[str, int, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "ts": [T0 + timedelta(hours=r[1]) for r in rows],
            "event": [r[2] for r in rows],
            "sku": [None] * len(rows),
            "quantity": [None] * len(rows),
            "revenue": [None] * len(rows),
        },
        schema_overrides={
            "ts": pl.Datetime("us", "UTC"),
            "sku": pl.String,
            "quantity": pl.Float64,
            "revenue": pl.Float64,
        },
    )


def test_a_part_gives_back_the_rows_of_the_users_asked_for(tmp_path: Path) -> None:
    # users interleaved as in a time-ordered file; each user's rows keep their order
    events = _events([("b", 1, "x"), ("a", 2, "y"), ("b", 3, "z"), ("c", 4, "x"), ("a", 0, "x")])
    part = es.write(tmp_path, events, identity.empty_links())
    got = es.read(tmp_path, [part], ["a", "c", "nobody"])
    assert got is not None
    assert (
        got.rows()
        == events.filter(pl.col("user_id") != "b").sort("user_id", maintain_order=True).rows()
    )
    assert es.read(tmp_path, [part], ["nobody"]) is None
    assert es.present(tmp_path, [part]) and not es.present(tmp_path, [part, "gone"])


def test_new_rows_repeating_stored_ones_are_left_out() -> None:
    config = load_config()
    stored = _events([("a", 1, "x"), ("a", 2, "y")])
    fresh = _events([("a", 2, "y"), ("a", 3, "y"), ("b", 1, "x")])
    both, added = es.combine(stored, fresh, config)
    assert added.rows() == fresh.slice(1).rows()
    assert both.rows() == pl.concat([stored, fresh.slice(1)]).rows()
    assert es.combine(None, fresh, config)[1].equals(fresh)


def test_newer_parts_merge_as_they_accumulate_and_forget_erases(tmp_path: Path) -> None:
    base = es.write(
        tmp_path, _events([(f"u{i}", i, "x") for i in range(40)]), identity.empty_links()
    )
    parts = [base]
    for day in range(6):  # one small part per incremental run
        new = es.write(
            tmp_path,
            _events([("u1", 100 + day, "y"), ("u2", 100 + day, "y")]),
            identity.empty_links(),
        )
        parts = es.merge(tmp_path, [*parts, new])
        es.clean(tmp_path, parts)
    assert parts[0] == base and len(parts) <= 3
    assert len(list(tmp_path.glob("*.arrow"))) == len(parts)
    u1 = es.read(tmp_path, parts, ["u1"])
    assert u1 is not None and u1["ts"].to_list() == [
        T0 + timedelta(hours=h) for h in (1, *range(100, 106))
    ]
    # parts outside a store root's event_store/ folder are not the store's: left alone
    assert es.forget(tmp_path, {"u1"}) == 0 and es.read(tmp_path, parts, ["u1"]) is not None
    root = tmp_path / "root"
    store = es.folder(root, "file", "/data/events")
    part = es.write(store, _events([("u1", 1, "x"), ("u2", 2, "x")]), identity.empty_links())
    assert es.forget(root, {"u1"}) == 1
    assert es.read(store, [part], ["u1"]) is None and es.read(store, [part], ["u2"]) is not None


def test_forget_erases_links_and_a_part_killed_half_rewritten_is_missing(tmp_path: Path) -> None:
    """A part holding only a link of the user loses it; a forget killed in the middle of a
    part leaves it missing (the next trigger run is a full one), and a second one finishes."""
    root = tmp_path / "root"
    store = es.folder(root, "file", "/data/events")
    links = pl.DataFrame(
        {"id": ["anon-1", "anon-2"], "user_id": ["u1", "u2"], "ts": [T0, T0]}
    ).cast(identity.LINK_SCHEMA)  # type: ignore[arg-type]
    only_links = es.write(store, _events([("u3", 1, "x")]), links)
    assert es.forget(root, {"u1"}) == 0
    assert es.links(store, [only_links])["user_id"].to_list() == ["u2"]
    assert es.read(store, [only_links], ["u3"]) is not None
    part = es.write(store, _events([("u1", 1, "x"), ("u2", 2, "x")]), identity.empty_links())
    script = (
        "from pathlib import Path; from lapse.events import store; "
        f"store.forget(Path({str(root)!r}), {{'u2'}})"
    )
    env = {**os.environ, "LAPSE_FAULT": "forget_part"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not es.present(store, [part, only_links])
    assert es.forget(root, {"u2"}) == 1  # the rows the killed one had not replaced yet
    assert es.present(store, [part, only_links])
    assert es.read(store, [part, only_links], ["u2"]) is None
    assert es.links(store, [part, only_links]).is_empty()


def test_a_message_id_repeated_in_a_new_file_is_a_duplicate_as_in_one_folder(
    tmp_path: Path,
) -> None:
    """With ``source.message_id``, a new row whose message id a stored row (or an earlier new
    file) has is left out, as validating the whole folder drops it; the store keeps the ids."""
    base = load_config()
    config = base.model_copy(
        update={"source": base.source.model_copy(update={"message_id": "mid"})}
    )
    folder = tmp_path / "events"
    folder.mkdir()
    day0 = _events([("a", 1, "x"), ("b", 2, "x")]).with_columns(mid=pl.Series(["m1", "m2"]))
    # a retry of m1 stamped later, a new event, a retry of m3 in the next file
    day1 = _events([("a", 5, "x"), ("a", 6, "y")]).with_columns(mid=pl.Series(["m1", "m3"]))
    day2 = _events([("a", 7, "y")]).with_columns(mid=pl.Series(["m3"]))
    for name, frame in (("d0", day0), ("d1", day1), ("d2", day2)):
        frame.write_parquet(folder / f"{name}.parquet")
    whole, _ = validate_events(folder, config)
    stored, _ = validate_events(folder / "d0.parquet", config, message_ids=True)
    part = es.write(tmp_path / "store", stored, identity.empty_links())
    fresh, _ = es.read_new([folder / "d1.parquet", folder / "d2.parquet"], config)
    both, added = es.combine(es.read(tmp_path / "store", [part], ["a"]), fresh, config)
    assert added["ts"].to_list() == [T0 + timedelta(hours=6)]
    assert sorted(both.drop(MESSAGE_ID).rows()) == sorted(whole.filter(user_id="a").rows())
