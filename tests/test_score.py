"""`lapse score`: records, audit trail, delta sync, resume after SIGKILL, failures, locks."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import score_sinks
from lapse.cli import app
from lapse.config import LapseConfig, dump_config, load_config
from lapse.datasets import generate, write
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import Ledger, sink_lock
from lapse.exceptions import LapseError, LockHeldError
from lapse.jobs import run_forget
from lapse.modeling.bundle import ChurnBundle, listing
from lapse.schema import ROLES
from lapse.score.run import run_score
from lapse.sinks import RECORD_COLUMNS, SINKS
from lapse.sinks.file import read_records
from worlds import World, trained_world

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return trained_world(
        tmp_path_factory.mktemp("score"),
        n_users=1500,
        n_days=240,
        seed=3,
        train_days=200,
        score_day=210,
    )


def make_config(home: Path, world: World, **sections: dict[str, object]) -> Path:
    """A config file in LAPSE_HOME: attributes from the generator, small batches."""
    data = yaml.safe_load(dump_config(load_config()))
    data["attributes"]["path"] = str(world.users)
    data["attributes"]["static_features"] = []
    data["delivery"].update(batch_size=50, backoff_seconds=0.0)
    for name, values in sections.items():
        data[name].update(values)
    path = home / "lapse.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def config_at(path: Path) -> LapseConfig:
    return load_config(path)


@pytest.fixture(autouse=True)
def _fresh_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    score_sinks.RECEIVED.clear()
    score_sinks.FlakySink.seen = set()
    monkeypatch.setitem(SINKS, "capture", "score_sinks:CaptureSink")
    monkeypatch.setitem(SINKS, "flaky", "score_sinks:FlakySink")


def sent_users() -> list[str]:
    return [i["user_id"] for _, items in score_sinks.RECEIVED for i in items]


# -- the records ---------------------------------------------------------------------------


def test_file_sink_writes_the_pinned_columns_for_every_eligible_user(
    world: World, _isolated_home: Path
) -> None:
    cfg = make_config(_isolated_home, world)
    out = _isolated_home / "scores.parquet"
    res = runner.invoke(
        app,
        [
            "score",
            str(world.events),
            "--as-of",
            f"{world.as_of:%Y-%m-%d}",
            "--model",
            str(world.bundle),
            "--config",
            str(cfg),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    records = read_records(out)
    assert tuple(records.columns) == RECORD_COLUMNS
    assert records["user_id"].is_unique().all()
    assert records["as_of"].unique().to_list() == [world.as_of.date()]
    assert records["risk_segment"].is_in(["high", "medium", "low"]).all()
    assert records["churn_risk"].is_between(0, 1).all()
    assert records["churn_risk_percentile"].is_between(0, 1).all()
    assert (records["model_version"] == "local").all()
    # reasons only for users with something to say, at most 3 each
    n_reasons = records["reasons"].list.len()
    quiet = (records["risk_segment"] == "low") & (records["triggers"].list.len() == 0)
    assert (n_reasons.filter(quiet) == 0).all()
    assert (n_reasons <= 3).all() and (n_reasons.filter(~quiet) > 0).mean() > 0.8  # type: ignore[operator]
    # refills: prompt never before as_of nor after depletion; all three dates together
    refill = records.filter(pl.col("refill_sku").is_not_null())
    assert refill.height > 0
    assert (refill["refill_prompt_date"] >= world.as_of.date()).all()
    assert (refill["refill_prompt_date"] <= refill["depletion_date"]).all()
    assert refill["next_order_date"].null_count() == 0
    # the scored users are exactly the eligible ones, do-not-contact users excluded
    bundle = ChurnBundle.load(world.bundle)
    from lapse.labels import eligible

    ev = pl.scan_parquet(world.events)
    expected = set(eligible(ev, [world.as_of], bundle.config)["user_id"].to_list())
    dnc = set(pl.read_parquet(world.users).filter("do_not_contact")["user_id"].to_list())
    assert set(records["user_id"].to_list()) == expected - dnc
    # the audit snapshot holds every scored user, suppressed ones flagged and not sent
    snap = pl.read_parquet(_isolated_home / "lapse-runs" / "snapshots" / "*" / "*.parquet")
    assert set(snap["user_id"].to_list()) == expected
    assert set(snap.filter("suppressed")["user_id"].to_list()) == expected & dnc
    assert not snap.filter("suppressed")["sent"].any()
    # and a CSV holds the lists as JSON strings
    csv = _isolated_home / "scores.csv"
    res = runner.invoke(
        app,
        [
            "score",
            str(world.events),
            "--as-of",
            f"{world.as_of:%Y-%m-%d}",
            "--model",
            str(world.bundle),
            "--config",
            str(cfg),
            "--out",
            str(csv),
        ],
    )
    assert res.exit_code == 0, res.output
    raw = pl.read_csv(csv)
    assert raw["triggers"].str.starts_with("[").all()
    back = read_records(csv)
    # the same records, but a milestone is celebrated once: not again by the second run
    celebrated = records.filter(pl.col("triggers").list.contains("milestone"))["user_id"]
    assert celebrated.len() > 0
    assert (
        not back.filter(pl.col("user_id").is_in(celebrated.implode()))["triggers"]
        .list.contains("milestone")
        .any()
    )
    # (so a low-risk user who fired nothing else gets no reasons either)
    no_milestone = pl.col("triggers").list.eval(pl.element().filter(pl.element() != "milestone"))
    said = (pl.col("risk_segment") != "low") | (pl.col("triggers").list.len() > 0)
    assert (
        back.drop("score_run_id")
        .with_columns(no_milestone)
        .filter(said)
        .sort("user_id")
        .equals(
            records.drop("score_run_id").with_columns(no_milestone).filter(said).sort("user_id")
        )
    )


def test_point_in_time_scores_ignore_events_at_or_after_as_of(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    cfg = config_at(make_config(_isolated_home, world))
    past = tmp_path / "past.parquet"
    pl.scan_parquet(world.events).filter(pl.col("ts") < world.as_of).sink_parquet(past)
    a = run_score(
        world.events, cfg, as_of=world.as_of, model=str(world.bundle), out=tmp_path / "a.parquet"
    )
    # its own ledger: a celebration delivered by the first run is not repeated by the second
    other = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"path": tmp_path / "b"})})
    b = run_score(
        past, other, as_of=world.as_of, model=str(world.bundle), out=tmp_path / "b.parquet"
    )
    ra, rb = (read_records(r.out).drop("score_run_id") for r in (a, b) if r.out)  # type: ignore[arg-type]
    assert ra.equals(rb)


def test_a_cutoff_in_another_zone_is_the_run_of_its_utc_instant(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    # 19:00 the evening before at UTC-5 is the same instant as midnight UTC: another calendar day
    eastern = world.as_of.astimezone(timezone(timedelta(hours=-5)))
    assert eastern == world.as_of and eastern.date() != world.as_of.date()
    cfg = config_at(make_config(_isolated_home, world))
    runs = {}
    for name, as_of in (("utc", world.as_of), ("eastern", eastern)):
        own = cfg.model_copy(
            update={"audit": cfg.audit.model_copy(update={"path": tmp_path / name})}
        )
        runs[name] = run_score(
            world.events,
            own,
            as_of=as_of,
            model=str(world.bundle),
            out=tmp_path / f"{name}.parquet",
        )
    utc, other = runs["utc"], runs["eastern"]
    assert other.as_of == utc.as_of and other.as_of.utcoffset() == timedelta(0)
    assert other.score_run_id[:8] == utc.score_run_id[:8] == f"{world.as_of:%Y%m%d}"
    # the snapshot is filed under the UTC day
    assert utc.snapshot is not None and other.snapshot is not None
    assert (
        other.snapshot.parent.name == utc.snapshot.parent.name == f"run_date={world.as_of.date()}"
    )
    # the same records
    assert utc.out is not None and other.out is not None
    records = read_records(other.out).drop("score_run_id")
    assert records.equals(read_records(utc.out).drop("score_run_id"))
    assert records["as_of"].unique().to_list() == [world.as_of.date()]
    # the same cooldowns and messages, counted in the UTC day
    day = world.as_of.date()
    kept = {}
    for name in runs:
        with Ledger(tmp_path / name / "ledger.sqlite") as ledger:
            kept[name] = (
                sorted(ledger.fired("file")),
                ledger.messages("file", since=day, until=day),
            )
    fired, messages = kept["utc"]
    assert fired and {d for _, _, d in fired} == {day} and messages
    assert kept["eastern"] == kept["utc"]


# -- delta sync, suppression, control ------------------------------------------------------


def test_delta_sync_sends_nothing_unchanged_and_exactly_the_changed_users(
    world: World, _isolated_home: Path
) -> None:
    cfg = config_at(make_config(_isolated_home, world))
    first = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture")
    assert first.complete and first.counts["sent"] == len(sent_users()) > 0
    assert len(set(sent_users())) == len(sent_users())
    assert {i["email"] for _, items in score_sinks.RECEIVED for i in items} != {None}

    celebrated = {
        i["user_id"]
        for _, items in score_sinks.RECEIVED
        for i in items
        if "milestone" in i["triggers"]
    }
    assert celebrated
    score_sinks.RECEIVED.clear()
    again = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture")
    # unchanged but for the milestones: celebrated once, so those records lost the trigger
    assert set(sent_users()) == celebrated and again.counts["sent"] == len(celebrated)
    assert not any("milestone" in i["triggers"] for _, items in score_sinks.RECEIVED for i in items)
    assert again.counts["unchanged"] == first.counts["sent"] - len(celebrated)

    score_sinks.RECEIVED.clear()
    later = world.as_of + timedelta(days=7)
    run_score(world.events, cfg, as_of=later, model=str(world.bundle), sink="capture")
    snaps = pl.read_parquet(_isolated_home / "lapse-runs" / "snapshots" / "*" / "*.parquet")
    sent_then = snaps.filter(pl.col("as_of") == world.as_of.date(), pl.col("sent"))
    old = sent_then.sort("score_run_id").unique("user_id", keep="last")  # the last delivered
    new = snaps.filter(pl.col("as_of") == later.date(), ~pl.col("suppressed"))
    joined = new.join(
        old.select("user_id", pl.col("delta_key").alias("old")), on="user_id", how="left"
    )
    changed = joined.filter(pl.col("old").is_null() | (pl.col("old") != pl.col("delta_key")))
    assert sorted(sent_users()) == sorted(changed["user_id"].to_list())
    assert 0 < len(sent_users()) < new.height
    # a changed segment carries the previous one, so platforms can fire risk_<segment> events
    prev = {
        i["user_id"]: i["previous_risk_segment"] for _, items in score_sinks.RECEIVED for i in items
    }
    last = dict(zip(old["user_id"], old["risk_segment"], strict=True))
    assert all(prev[u] == last.get(u) for u in prev)

    score_sinks.RECEIVED.clear()
    full = run_score(
        world.events, cfg, as_of=later, model=str(world.bundle), sink="capture", full=True
    )
    assert full.counts["sent"] == new.height == len(sent_users())


def test_suppressed_users_are_never_sent(world: World, _isolated_home: Path) -> None:
    users = pl.read_parquet(world.users)
    listed = users.filter(~pl.col("do_not_contact"))["user_id"].head(40).to_list()
    (_isolated_home / "suppress.txt").write_text("# erasure list\n" + "\n".join(listed) + "\n")
    cfg = config_at(make_config(_isolated_home, world, score={"suppression_file": "suppress.txt"}))
    res = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture")
    never = set(listed) | set(users.filter("do_not_contact")["user_id"].to_list())
    assert not never & set(sent_users())
    snap = pl.read_parquet(res.snapshot)  # type: ignore[arg-type]
    assert res.counts["suppressed"] == snap["user_id"].is_in(list(never)).sum() > 0


def test_control_group_is_stable_per_salt_and_not_sent(world: World, _isolated_home: Path) -> None:
    cfg = config_at(make_config(_isolated_home, world, control={"share": 0.3, "salt": "s1"}))
    a = run_score(
        world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture", full=True
    )
    b = run_score(
        world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture", full=True
    )
    snap_a, snap_b = (pl.read_parquet(r.snapshot) for r in (a, b))  # type: ignore[arg-type]
    control = set(snap_a.filter("control")["user_id"].to_list())
    assert control == set(snap_b.filter("control")["user_id"].to_list())
    assert 0.2 < len(control) / snap_a.height < 0.4
    for seg in ("high", "low"):  # held out within every segment
        part = snap_a.filter(pl.col("risk_segment") == seg)
        if part.height >= 30:
            assert 0.1 < part["control"].mean() < 0.5  # type: ignore[operator]
    assert not control & set(sent_users())
    cfg.control.salt = "s2"
    c = run_score(
        world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture", full=True
    )
    assert set(pl.read_parquet(c.snapshot).filter("control")["user_id"].to_list()) != control  # type: ignore[arg-type]


# -- failures, dead letters, resume --------------------------------------------------------


def test_sink_failures_go_to_dead_letters_and_exit_non_zero(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(_isolated_home, world)
    records = run_score(
        world.events, config_at(cfg), as_of=world.as_of, model=str(world.bundle), dry_run=True
    )
    assert records.counts["sent"] == 0
    snap_users = sorted(
        pl.read_parquet(world.users).filter(~pl.col("do_not_contact"))["user_id"].to_list()
    )
    monkeypatch.setattr(score_sinks.FlakySink, "reject", frozenset(snap_users[:3]))
    monkeypatch.setattr(score_sinks.FlakySink, "poison", frozenset(snap_users[300:301]))
    res = runner.invoke(
        app,
        [
            "score",
            str(world.events),
            "--as-of",
            f"{world.as_of:%Y-%m-%d}",
            "--model",
            str(world.bundle),
            "--config",
            str(cfg),
            "--sink",
            "flaky",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "dead letters" in res.output and "--resume" in res.output
    dead = [
        json.loads(x)
        for x in next((_isolated_home / "lapse-runs" / "dead_letters").glob("*.ndjson"))
        .read_text()
        .splitlines()
    ]
    reasons = {d["reason"] for d in dead}
    assert reasons == {"invalid profile", "400 Bad Request: malformed batch"} or reasons == {
        "400 Bad Request: malformed batch"
    }
    failed = {d["record"]["user_id"] for d in dead}
    delivered = set(sent_users()) - score_sinks.FlakySink.reject
    assert not failed & delivered
    # every sendable user either arrived or is a dead letter: nothing silently lost
    snap = pl.read_parquet(_isolated_home / "lapse-runs" / "snapshots" / "*" / "*.parquet")
    assert failed | delivered == set(snap.filter("sent")["user_id"].to_list())
    # retried 503s were counted, not dead-lettered
    assert "retried" in res.output


def test_sigkill_mid_run_then_resume_delivers_everything_once(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(_isolated_home, world, delivery={"batch_size": 40})
    out = _isolated_home / "scores.parquet"
    log = _isolated_home / "sends.log"
    monkeypatch.setenv("LAPSE_TEST_SEND_LOG", str(log))
    monkeypatch.setenv("LAPSE_TEST_KILL_AFTER", "4")
    args = [
        "score",
        str(world.events),
        "--as-of",
        f"{world.as_of:%Y-%m-%d}",
        "--model",
        str(world.bundle),
        "--config",
        str(cfg),
        "--out",
        str(out),
    ]
    killed = score_sinks.run_cli("KillingFileSink", *args)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        ((run_id, sink, _),) = ledger.runs()
        batches = ledger.batches(run_id, sink)
    done = {b.batch_id for b in batches if b.state == "done"}
    before = log.read_text().split()
    assert len(done) == 3 and before[:3] == sorted(done) and len(before) == 4
    assert len(batches) > 5

    # the lock died with the process: resume goes ahead
    resumed = score_sinks.run_cli(
        "LoggingFileSink", "score", str(world.events), "--config", str(cfg), "--resume", run_id
    )
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    after = log.read_text().split()[len(before) :]
    assert not set(after) & done  # acknowledged batches are not sent again
    assert before[3] in after  # the batch written but not acknowledged is resent (idempotent)
    records = read_records(out)
    snap = pl.read_parquet(_isolated_home / "lapse-runs" / "snapshots" / "*" / "*.parquet")
    assert records["user_id"].is_unique().all()
    assert sorted(records["user_id"].to_list()) == sorted(snap.filter("sent")["user_id"].to_list())
    assert not list(out.parent.glob(".scores.parquet.parts*/*"))
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        assert ledger.run(run_id).status == "complete"


def test_a_second_run_for_the_same_sink_is_refused(world: World, _isolated_home: Path) -> None:
    cfg = make_config(_isolated_home, world)
    with sink_lock(_isolated_home / "lapse-runs" / "locks", "file", "lapse triggers run"):
        res = runner.invoke(
            app,
            [
                "score",
                str(world.events),
                "--as-of",
                f"{world.as_of:%Y-%m-%d}",
                "--model",
                str(world.bundle),
                "--config",
                str(cfg),
            ],
        )
    assert res.exit_code == 3
    assert "sink 'file' is busy: `lapse triggers run` is running, pid" in res.output
    # another sink is not blocked
    other = run_score(
        world.events, config_at(cfg), as_of=world.as_of, model=str(world.bundle), sink="capture"
    )
    assert other.complete


def test_forget_waits_for_the_run_holding_a_sink(world: World, _isolated_home: Path) -> None:
    """An erasure during a run would be undone by the run's own writes (its snapshot, the
    event store): refused while any sink's lock is held, nothing erased; then it goes ahead."""
    config = config_at(make_config(_isolated_home, world))
    run_score(world.events, config, as_of=world.as_of, model=str(world.bundle), sink="capture")
    trail = AuditTrail(_isolated_home / "lapse-runs")
    someone = str(trail.snapshots()["user_id"][0])
    busy = "sink 'capture' is busy: `lapse score` is running"
    with sink_lock(trail.locks, "capture", "lapse score"), pytest.raises(LockHeldError, match=busy):
        run_forget(config, [someone])
    assert someone in trail.snapshots()["user_id"].to_list()
    assert run_forget(config, [someone]).removed["snapshot_rows"] >= 1
    assert someone not in trail.snapshots()["user_id"].to_list()


def test_dry_run_sends_nothing_and_shows_payloads(world: World, _isolated_home: Path) -> None:
    cfg = make_config(_isolated_home, world)
    res = runner.invoke(
        app,
        [
            "score",
            str(world.events),
            "--as-of",
            f"{world.as_of:%Y-%m-%d}",
            "--model",
            str(world.bundle),
            "--config",
            str(cfg),
            "--sink",
            "capture",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "would send" in res.output and '"churn_risk"' in res.output
    assert sent_users() == []
    assert not (_isolated_home / "lapse-runs" / "snapshots").exists()
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        assert ledger.runs() == [] and ledger.delivered("capture") == {}


# -- what a run says: the model it serves, who it scored -------------------------------------


def score_argv(world: World, cfg: Path, *extra: str, events: Path | None = None) -> list[str]:
    day = f"{world.as_of:%Y-%m-%d}"
    argv = ["score", str(events or world.events), "--as-of", day, "--model", str(world.bundle)]
    return [*argv, "--config", str(cfg), *extra]


def test_the_header_names_the_run_the_model_and_its_training_data_first(
    world: World, _isolated_home: Path
) -> None:
    cfg = make_config(_isolated_home, world)
    res = runner.invoke(app, score_argv(world, cfg, "--dry-run"))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    train = pl.read_parquet(world.bundle.parent.parent / "train.parquet")
    first, last = train["ts"].min(), train["ts"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    header = next(i for i, line in enumerate(lines) if line.startswith("score run "))
    run_id = lines[header].split()[2].rstrip(":")
    assert lines[header] == (
        f"score run {run_id}: model 'lapse' (bundle file {world.bundle}); trained on "
        f"{world.bundle.parent.parent / 'train.parquet'}, {first:%Y-%m-%d} to {last:%Y-%m-%d}, "
        "events " + listing(ChurnBundle.load(world.bundle).event_names())
    )
    summary = next(i for i, line in enumerate(lines) if f"score dry run {run_id}" in line)
    assert header < summary  # printed before the work, the summary after it
    # segment sizes come with their shares of the scored users
    assert re.search(r"segment high\s+│\s+[\d,]+ \(\d+\.\d%\)", res.output)


def test_events_of_another_source_are_refused_naming_both_sets_of_names(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    other = tmp_path / "web.parquet"
    events = pl.read_parquet(world.events)
    events.with_columns(("web_" + pl.col("event")).alias("event")).write_parquet(other)
    cfg = make_config(_isolated_home, world)
    res = runner.invoke(app, score_argv(world, cfg, events=other))
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert "share no event name with model 'lapse'" in errors[0]
    model_names = ChurnBundle.load(world.bundle).event_names()
    trained, theirs = errors[0].split("it was trained on ")[1].split("; these events have ")
    assert trained.startswith(", ".join(model_names[:8]))
    assert "web_order_completed" in theirs and all(
        n.startswith("web_") for n in theirs.split(", ")[:8]
    )
    assert not (_isolated_home / "lapse-runs" / "snapshots").exists()  # nothing was scored


def test_nothing_to_score_gives_the_real_cause_with_counts(
    world: World, _isolated_home: Path
) -> None:
    cfg = config_at(make_config(_isolated_home, world))
    events = pl.read_parquet(world.events)
    first, last = events["ts"].min(), events["ts"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    late = world.as_of + timedelta(days=400)
    customers = events["user_id"].n_unique()
    roles = ChurnBundle.load(world.bundle).config.roles
    names = sorted({*roles.of("usage"), *roles.of("purchase")})
    never = customers - events.filter(pl.col("event").is_in(names))["user_id"].n_unique()
    with pytest.raises(LapseError) as info:
        run_score(world.events, cfg, as_of=late, model=str(world.bundle), dry_run=True)
    assert str(info.value) == (
        f"0 of {customers:,} customers are eligible at {late:%Y-%m-%d} (labels.eligibility "
        f"'active'): {customers:,} had no event of the activity roles ({', '.join(names)}) in "
        f"the 28 days before {late:%Y-%m-%d}"
        + (f" ({never:,} of them never had one)" if never else "")
        + f"; the events run from {first:%Y-%m-%d} to {last:%Y-%m-%d}, check --as-of"
    )
    early = first - timedelta(days=1)
    with pytest.raises(LapseError, match=f"no customer has an event before {early:%Y-%m-%d}"):
        run_score(world.events, cfg, as_of=early, model=str(world.bundle), dry_run=True)


def test_the_summary_says_who_was_scored_and_why_not(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    events = pl.read_parquet(world.events)
    broken = tmp_path / "events.parquet"
    nobody = events.head(3).with_columns(pl.lit(None, pl.String).alias("user_id"))
    pl.concat([events, nobody]).write_parquet(broken)
    cfg = config_at(make_config(_isolated_home, world))
    res = run_score(broken, cfg, as_of=world.as_of, model=str(world.bundle), dry_run=True)

    # an independent count: last event of an activity role before as_of, per user
    roles = ChurnBundle.load(world.bundle).config.roles
    names = sorted({*roles.of("usage"), *roles.of("purchase")})
    before = events.filter(pl.col("ts") < world.as_of)
    customers = before["user_id"].n_unique()
    last = before.filter(pl.col("event").is_in(names)).group_by("user_id").agg(pl.col("ts").max())
    active = last.filter(pl.col("ts") >= world.as_of - timedelta(days=28)).height
    never = customers - last.height
    assert 0 < active < customers
    assert res.population == {
        "customers": customers,
        "eligible": active,
        **({"no_activity": never} if never else {}),
        "inactive": last.height - active,
    }
    assert res.counts["scored"] == active
    ever = f" ({never:,} of them never had one)" if never else ""
    assert res.who_was_scored == (
        f"{active:,} of {customers:,} customers scored; {customers - active:,} had no event of "
        f"the activity roles ({', '.join(names)}) in the 28 days before "
        f"{world.as_of:%Y-%m-%d}{ever}; 3 event rows were rejected by validation"
    )
    # the CLI prints it under the summary; the audit summary keeps it
    cli = runner.invoke(app, score_argv(world, make_config(_isolated_home, world), events=broken))
    assert cli.exit_code == 0, cli.output
    assert f"who was scored: {active:,} of {customers:,} customers scored" in cli.output
    audit = next((_isolated_home / "lapse-runs" / "snapshots").glob("*/*.json"))
    kept = json.loads(audit.read_text())
    assert kept["population"] == res.population
    assert kept["who_was_scored"] == res.who_was_scored


def test_a_bundle_saved_before_its_training_data_was_recorded_still_serves(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    bundle = ChurnBundle.load(world.bundle)
    del bundle.__dict__["training_data"]  # as pickled by an earlier lapse
    old = ChurnBundle.load(bundle.save(tmp_path / "old.pkl"))
    assert old.training_data is None
    roles = old.config.roles
    assert old.event_names() == sorted({n for r in ROLES for n in roles.of(r)})
    cfg = make_config(_isolated_home, world)
    argv = score_argv(world, cfg, "--dry-run")
    res = runner.invoke(app, [*argv[:5], str(tmp_path / "old.pkl"), *argv[6:]])
    assert res.exit_code == 0, res.output
    assert "predates the record of its training events" in res.output


# -- model checks, drift ---------------------------------------------------------------------


def test_schema_mismatch_and_stale_model(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    bundle = ChurnBundle.load(world.bundle)
    name = next(iter(bundle.feature_schema))
    bundle.feature_schema[name] = "String"
    bundle.feature_schema["setup_completed_count_28d_x"] = "UInt32"
    broken = bundle.save(tmp_path / "broken.pkl")
    cfg = make_config(_isolated_home, world)
    res = runner.invoke(
        app,
        [
            "score",
            str(world.events),
            "--as-of",
            f"{world.as_of:%Y-%m-%d}",
            "--model",
            str(broken),
            "--config",
            str(cfg),
        ],
    )
    assert res.exit_code == 2
    assert "setup_completed_count_28d_x is missing" in res.output
    assert f"{name} is" in res.output and "trained on String" in res.output

    late = run_score(
        world.events,
        config_at(cfg),
        as_of=world.as_of + timedelta(days=45),
        model=str(world.bundle),
        dry_run=True,
    )
    assert any("max_model_age_days" in w for w in late.warnings)
    assert late.drift["churn_risk"] >= 0


def test_drift_is_flagged_when_the_population_moves(
    world: World, _isolated_home: Path, tmp_path: Path
) -> None:
    bundle = ChurnBundle.load(world.bundle)
    bundle.score_reference = np.sort(np.random.default_rng(0).uniform(0.8, 1.0, 500))
    shifted = bundle.save(tmp_path / "shifted.pkl")
    res = run_score(
        world.events,
        config_at(make_config(_isolated_home, world)),
        as_of=world.as_of,
        model=str(shifted),
        dry_run=True,
    )
    assert res.drift["churn_risk"] > 0.2
    assert any(w.startswith("drift:") and "churn_risk" in w for w in res.warnings)


def test_unknown_sink_and_bad_out_are_clear(world: World, _isolated_home: Path) -> None:
    cfg = make_config(_isolated_home, world)
    base = ["score", str(world.events), "--model", str(world.bundle), "--config", str(cfg)]
    res = runner.invoke(app, [*base, "--sink", "nope"])
    assert res.exit_code == 2 and "unknown sink 'nope'" in res.output
    res = runner.invoke(app, [*base, "--out", "scores.xlsx"])
    assert res.exit_code == 2 and ".parquet or .csv" in res.output
    with pytest.raises(LapseError, match="not in the ledger"):
        run_score(world.events, config_at(cfg), as_of=datetime.now(UTC), resume="nope")


# -- impact, retention, erasure --------------------------------------------------------------


def test_impact_compares_treated_and_control_retention(world: World, _isolated_home: Path) -> None:
    path = make_config(_isolated_home, world, control={"share": 0.3})
    cfg = config_at(path)
    run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture")
    res = runner.invoke(
        app,
        ["impact", str(world.events), "--since", f"{world.as_of:%Y-%m-%d}", "--config", str(path)],
    )
    assert res.exit_code == 0, res.output
    assert "lift (95% CI)" in res.output

    from lapse.insights.impact import impact

    result = impact(world.events, cfg, since=world.as_of.date())
    # the same figures, straight from the raw events
    names = [*cfg.roles.usage, *cfg.roles.purchase]
    end = world.as_of + timedelta(days=cfg.labels.horizon_days)
    active = set(
        pl.read_parquet(world.events)
        .filter(pl.col("event").is_in(names), pl.col("ts") >= world.as_of, pl.col("ts") < end)[
            "user_id"
        ]
        .to_list()
    )
    snap = pl.read_parquet(_isolated_home / "lapse-runs" / "snapshots" / "*" / "*.parquet")
    snap = snap.filter(~pl.col("suppressed")).with_columns(
        pl.col("user_id").is_in(list(active)).alias("retained")
    )
    row = result.table.filter(pl.col("segment") == "all").row(0, named=True)
    treated, control = snap.filter(~pl.col("control")), snap.filter("control")
    assert (row["treated"], row["control"]) == (treated.height, control.height)
    # stratified: each segment's retention weighted by its share of the users
    per = (
        snap.group_by("risk_segment")
        .agg(
            pl.len().alias("n"),
            pl.col("retained").filter(~pl.col("control")).mean().alias("t"),
            pl.col("retained").filter("control").mean().alias("c"),
        )
        .drop_nulls()
    )
    w = per["n"] / per["n"].sum()
    assert row["treated_retention"] == pytest.approx((w * per["t"]).sum())
    assert row["control_retention"] == pytest.approx((w * per["c"]).sum())
    assert row["lift"] == pytest.approx((w * (per["t"] - per["c"])).sum())
    assert row["ci_low"] < row["lift"] < row["ci_high"]
    assert set(result.table["segment"]) <= {"all", "high", "medium", "low"}

    late = runner.invoke(
        app, ["impact", str(world.events), "--since", "2030-01-01", "--config", str(path)]
    )
    assert late.exit_code == 2 and "no score run since 2030-01-01" in late.output


def test_forget_erases_users_everywhere(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_config(_isolated_home, world)
    cfg = config_at(path)
    users = sorted(pl.read_parquet(world.users).filter(~pl.col("do_not_contact"))["user_id"])
    monkeypatch.setattr(score_sinks.FlakySink, "reject", frozenset(users[:2]))
    res = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="flaky")
    dead = {
        json.loads(x)["record"]["user_id"]
        for x in res.dead_letters.read_text().splitlines()  # type: ignore[union-attr]
    }
    snap = pl.read_parquet(res.snapshot)  # type: ignore[arg-type]
    sent = snap.filter("sent")["user_id"].to_list()
    assert dead
    gone = [*sorted(dead), next(u for u in reversed(sent) if u not in dead)]
    out = runner.invoke(app, ["forget", *gone, "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert f"forgot {len(gone)} user(s)" in out.output
    root = _isolated_home / "lapse-runs"
    for f in [*root.glob("snapshots/*/*.parquet"), *root.glob("outbox/*/*.parquet")]:
        assert not set(gone) & set(pl.read_parquet(f)["user_id"].to_list()), f
    assert not set(gone) & {
        json.loads(x)["record"]["user_id"]
        for f in root.glob("dead_letters/*.ndjson")
        for x in f.read_text().splitlines()
    }
    with Ledger(root / "ledger.sqlite") as ledger:
        assert not set(gone) & set(ledger.delivered("flaky"))
        assert not set(gone) & {u for _, u, _, _ in ledger.failures(res.score_run_id, "flaky")}
        assert len(ledger.delivered("flaky")) == len(sent) - 1 - len(dead)


def test_retention_prunes_old_snapshots_and_their_runs(world: World, _isolated_home: Path) -> None:
    cfg = config_at(make_config(_isolated_home, world, audit={"retention_days": 5}))
    old = run_score(
        world.events,
        cfg,
        as_of=world.as_of - timedelta(days=7),
        model=str(world.bundle),
        sink="capture",
    )
    assert old.snapshot is not None and old.snapshot.exists()
    new = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="capture")
    assert not old.snapshot.exists() and new.snapshot is not None and new.snapshot.exists()
    assert not (_isolated_home / "lapse-runs" / "outbox" / old.score_run_id).exists()
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        assert [r for r, _, _ in ledger.runs()] == [new.score_run_id]


def test_score_to_braze_over_http_with_faults_then_delta(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from platform_servers import KEY, BrazeServer

    with BrazeServer() as server:
        monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
        monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", server.url)
        server.fail_next("/users/track", "429", "503", "drop_before", "drop_after", "500")
        cfg = config_at(
            make_config(
                _isolated_home, world, delivery={"batch_size": None, "max_backoff_seconds": 0}
            )
        )
        first = run_score(
            world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="braze"
        )
        assert first.complete and first.counts["retried"] >= 5
        snap = pl.read_parquet(first.snapshot)  # type: ignore[arg-type]
        sent = snap.filter("sent")
        assert set(server.profiles) == set(sent["user_id"].to_list())
        for row in sent.head(20).iter_rows(named=True):
            profile = server.profiles[row["user_id"]]
            assert profile["lapse_risk_segment"] == row["risk_segment"]
            assert profile["lapse_churn_risk"] == pytest.approx(row["churn_risk"])
        assert not set(server.profiles) & set(snap.filter("suppressed")["user_id"].to_list())
        _rerun_sends_only_the_celebrated(world, cfg, server, sent)


def _rerun_sends_only_the_celebrated(
    world: World, cfg: LapseConfig, server: Any, sent: pl.DataFrame
) -> None:
    """An unchanged rerun to Braze sends only the users whose milestone went out: their
    celebration is once ever, so their record changed; nobody else is sent again."""
    n = len(server.requests)
    again = run_score(world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="braze")
    celebrated = sent.filter(pl.col("triggers").list.contains("milestone")).height
    assert again.counts["sent"] == celebrated
    if not celebrated:
        assert len(server.requests) == n


def test_score_to_braze_when_most_users_fire_two_or_three_triggers(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Braze's current rule: 75 objects per request counted across attributes and events."""
    from platform_servers import KEY, BrazeServer

    always = {"when": "tenure_days >= 0", "cooldown_days": 0}
    triggers = {
        "welcome_back": always,
        "weekly_digest": always,
        "quiet_week": {"when": "days_since_last_event >= 3", "cooldown_days": 0},
    }
    with BrazeServer() as server:
        monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
        monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", server.url)
        cfg = config_at(
            make_config(_isolated_home, world, delivery={"batch_size": None}, triggers=triggers)
        )
        first = run_score(
            world.events, cfg, as_of=world.as_of, model=str(world.bundle), sink="braze"
        )
        snap = pl.read_parquet(first.snapshot)  # type: ignore[arg-type]
        sent = snap.filter("sent")
        fired = sent["triggers"].list.len()
        assert fired.min() >= 2 and ((fired >= 2) & (fired <= 3)).mean() > 0.5  # type: ignore[operator]
        assert first.complete and first.counts["failed"] == 0
        assert set(server.profiles) == set(sent["user_id"].to_list())
        bodies = [r.json() for r in server.calls("/users/track")]
        objects = [len(b["attributes"]) + len(b.get("events", [])) for b in bodies]
        assert max(objects) <= 75 and server.requests_over_limit == 0
        assert sum(len(b.get("events", [])) for b in bodies) == len(server.events)
        assert len(server.events) >= 2 * sent.height
        _rerun_sends_only_the_celebrated(world, cfg, server, sent)


def test_score_refuses_input_without_rows(world: World, _isolated_home: Path) -> None:
    cfg = make_config(_isolated_home, world)
    header = _isolated_home / "header.csv"
    header.write_text("user_id,ts,event\n", encoding="utf-8")
    args = ["--as-of", f"{world.as_of:%Y-%m-%d}", "--model", str(world.bundle), "--config"]
    res = runner.invoke(app, ["score", str(header), *args, str(cfg), "--sink", "capture"])
    assert res.exit_code == 2, res.output
    assert f"error: {header}: the file has no rows" in res.output
    assert score_sinks.RECEIVED == []


def test_score_a_plain_transaction_table(tmp_path: Path, _isolated_home: Path) -> None:
    """Only purchases, in a CSV with its own column names: train, then score to CSV."""
    files = write(generate(n_users=800, n_days=300, seed=4), tmp_path / "data")
    orders = pl.read_parquet(files["events"]).filter(pl.col("event") == "order_completed")
    orders.select(
        pl.col("user_id").alias("CustomerID"),
        pl.col("ts").dt.strftime("%m/%d/%Y %H:%M").alias("InvoiceDate"),
        pl.col("sku").alias("StockCode"),
        pl.col("quantity").alias("Quantity"),
        pl.col("revenue").alias("Amount"),
    ).write_csv(tmp_path / "tx.csv")
    data = yaml.safe_load(dump_config(load_config()))
    data["source"].update(
        columns={
            "user_id": "CustomerID",
            "ts": "InvoiceDate",
            "sku": "StockCode",
            "quantity": "Quantity",
            "revenue": "Amount",
        },
        event_name="purchase",
        timestamp={"format": "%m/%d/%Y %H:%M", "timezone": "UTC"},
    )
    data["roles"] = {k: [] for k in data["roles"]} | {"purchase": ["purchase"]}
    data["milestones"] = []
    data["features"]["units_per_pack"] = {}
    data["labels"].update(activity_roles=["purchase"], horizon_days=56, eligibility="any_history")
    data["replenishment"]["target"] = "any"
    cfg = tmp_path / "tx.yaml"
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    trained = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "tx.csv"),
            "--config",
            str(cfg),
            "--no-register",
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "scores.csv"
    res = runner.invoke(
        app,
        [
            "score",
            str(tmp_path / "tx.csv"),
            "--config",
            str(cfg),
            "--model",
            str(_isolated_home / "models" / "lapse.pkl"),
            "--as-of",
            "2026-10-28",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    records = read_records(out)
    assert records.height > 100
    assert records["triggers"].list.len().max() == 0  # no usage, aha or errors to trigger on
    assert records["refill_sku"].null_count() == records.height
    assert records["next_order_date"].drop_nulls().len() > 0
    assert (records["risk_segment"] != "low").any()


def test_the_pooled_impact_row_is_stratified_by_segment() -> None:
    from lapse.insights.impact import compare

    def group(segment: str, control: bool, n: int, retained: int) -> pl.DataFrame:
        churned = [False] * retained + [True] * (n - retained)
        return pl.DataFrame(
            {"risk_segment": [segment] * n, "control": [control] * n, "churned": churned}
        )

    # no effect in either segment, but the control group holds more of the high-risk users:
    # pooled naively, treated retain (20 + 80) / 200 = 0.5 and control (20 + 16) / 120 = 0.3
    rows = pl.concat(
        [
            group("high", False, 100, 20),
            group("high", True, 100, 20),
            group("low", False, 100, 80),
            group("low", True, 20, 16),
        ]
    )
    table = {r["segment"]: r for r in compare(rows).iter_rows(named=True)}
    pooled = table["all"]
    assert (pooled["treated"], pooled["control"]) == (200, 120)
    # weights 200/320 and 120/320: both groups retain 0.625 * 0.2 + 0.375 * 0.8
    assert pooled["treated_retention"] == pytest.approx(0.425)
    assert pooled["control_retention"] == pytest.approx(0.425)
    assert pooled["lift"] == pytest.approx(0.0, abs=1e-12)
    # se = sqrt((0.625 * sqrt(.0032))^2 + (0.375 * sqrt(.0096))^2) = sqrt(.0026)
    half = 1.959964 * 0.0026**0.5
    assert (pooled["ci_low"], pooled["ci_high"]) == (pytest.approx(-half), pytest.approx(half))
    assert table["high"]["lift"] == pytest.approx(0.0) and table["low"]["lift"] == pytest.approx(
        0.0
    )


# -- shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["by_user", "by_time"])
def test_compact_events_scored_in_shards_give_the_records_of_all_at_once(
    world: World, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local run holds its events compact and scores them in shards of whole users: the
    records, feature rows, fired triggers, drift and counts equal one pass over them all,
    whether the events come sorted by user (slices) or not (filters)."""
    from lapse.score import records as rec
    from lapse.score.records import compact_events, score_users, user_shards

    events = pl.read_parquet(world.events).sort("user_id" if order == "by_user" else "ts")
    bundle = ChurnBundle.load(world.bundle)
    config = load_config()

    def scored(ev: pl.DataFrame) -> rec.ScoreResult:
        return score_users(bundle, ev, world.as_of, config, score_run_id="r", model_version="v")

    whole = scored(events)
    compact = events.clone()
    compact_events(compact)
    assert isinstance(compact["user_id"].dtype, pl.Enum)
    monkeypatch.setattr(rec, "SHARD_EVENTS", -(-events.height // 5))
    shards = list(user_shards(compact))
    assert len(shards) == 5
    users = [set(s.collect()["user_id"]) for s in shards]
    assert sum(map(len, users)) == len(set().union(*users))  # whole users, each once
    assert max(users[0]) < min(users[1])  # in user_id order
    assert shards[0].collect_schema() == events.schema  # canonical strings again
    parts = scored(compact)
    for name in ("records", "features", "fired"):
        assert_frame_equal(getattr(parts, name), getattr(whole, name))
    assert (parts.drift, parts.population, parts.warnings) == (
        whole.drift,
        whole.population,
        whole.warnings,
    )


def test_a_shard_counts_drift_bins_only_when_asked_and_they_add_up(world: World) -> None:
    """An incremental run (``subset``) discards drift, so its shards skip the bins
    (``drift=False``: the same records); the bins of two halves of the users add up to
    the whole's through ``summed_bins``, which the Spark driver's tally uses too."""
    from lapse.score.records import score_shard, summed_bins
    from lapse.spark.score import _Tally

    events = pl.read_parquet(world.events)
    bundle = ChurnBundle.load(world.bundle)
    config = load_config()

    def shard(ev: pl.DataFrame, **drift: bool) -> Any:
        return score_shard(
            bundle, ev.lazy(), world.as_of, config, score_run_id="r", model_version="v", **drift
        )

    whole = shard(events)
    assert set(whole.drift) > {"churn_risk"}
    skipped = shard(events, drift=False)
    assert skipped.drift == {}
    assert_frame_equal(skipped.records, whole.records)
    first = pl.col("user_id").is_in(events["user_id"].unique().sort().head(40).implode())
    parts = [shard(events.filter(first)).drift, shard(events.filter(~first)).drift]
    assert parts[0] != whole.drift
    assert summed_bins(parts) == whole.drift
    tally = _Tally()
    for part in parts:
        tally.add_drift(part)
    assert tally.drift == whole.drift
