"""Crash safety: real `lapse score` and `lapse triggers run --incremental` processes killed
(SIGKILL) at every stage (the fault points of ``lapse.faults``) and at random moments of
delivery, against the local Braze server with faults, then resumed.

Braze is the hard case: its attribute updates are idempotent, its events are not (no dedupe
key), so a batch in doubt follows ``sinks.braze.in_doubt`` (``skip`` by default). Every test
asserts that no record is lost, that no event arrives twice, that the events missing are
those of users the run counted as in doubt, that ``lapse impact`` ignores runs that sent
nothing, and that the first line of every run names it and the command that resumes it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import load_config
from lapse.delivery.audit import AuditTrail
from lapse.delivery.ledger import Ledger
from lapse.insights.impact import impact
from lapse.jobs import run_forget
from lapse.schema import run_day
from lapse.sinks._http import event_time, record_events
from platform_servers import KEY, BrazeServer, Reply, Request
from worlds import World, trained_world, world_config

runner = CliRunner()
HEADER = re.compile(
    r"^(?:resuming )?score run (\S+): .+; if cut off, resume with: (lapse score .+)$"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return trained_world(
        tmp_path_factory.mktemp("crash"),
        n_users=250,
        n_days=200,
        seed=7,
        train_days=140,
        score_day=150,
    )


def config_file(home: Path, world: World) -> Path:
    """Small batches (many requests to kill between) and a tiny Retry-After."""
    return world_config(home, world, batch_size=10, backoff_seconds=0.0, max_backoff_seconds=0.05)


class Braze(BrazeServer):
    """The Braze server, keeping what it processed (attributes and events, in order) and
    able to SIGKILL the client at its N-th request: before processing it, or after (the
    acknowledgement never arrives)."""

    def __init__(self) -> None:
        super().__init__()
        self.attributes: list[tuple[str, str]] = []  # (external_id, lapse_as_of)
        self.sent_events: list[tuple[str, str, str]] = []  # (external_id, name, time)
        self.kill: tuple[subprocess.Popen[str], int, bool] | None = None
        self.count = 0

    def handle(self, request: Request) -> Reply:
        reply = super().handle(request)
        body = request.json()
        self.attributes += [(a["external_id"], a["lapse_as_of"]) for a in body["attributes"]]
        self.sent_events += [
            (e["external_id"], e["name"], e["time"]) for e in body.get("events", [])
        ]
        return reply

    def _dispatch(self, request: Request) -> Reply | str | None:
        with self.lock:
            self.count += 1
            kill = self.kill if self.kill is not None and self.count == self.kill[1] else None
        if kill is None:
            return super()._dispatch(request)
        proc, _, after = kill
        if after:
            super()._dispatch(request)
        os.kill(proc.pid, signal.SIGKILL)
        return None


def lapse_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lapse.cli import app; app()", *args]


def environment(home: Path, braze: Braze, fault: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "LAPSE_HOME": str(home),
        "LAPSE_BRAZE_API_KEY": KEY,
        "LAPSE_BRAZE_BASE_URL": braze.url,
    }
    env.pop("LAPSE_FAULT", None)
    if fault is not None:
        env["LAPSE_FAULT"] = fault
    return env


def lapse(home: Path, braze: Braze, *args: str, fault: str | None = None) -> Any:
    return subprocess.run(
        lapse_argv(*args),
        env=environment(home, braze, fault),
        capture_output=True,
        text=True,
        timeout=300,
    )


def header(stdout: str) -> tuple[str, list[str]]:
    """The run id and the resume command (as arguments after ``lapse``) of the first line."""
    first = stdout.splitlines()[0]
    found = HEADER.match(first)
    assert found is not None, first
    command = shlex.split(found[2])
    assert command[:2] == ["lapse", "score"] and command[command.index("--resume") + 1] == found[1]
    return found[1], command[1:]


def in_doubt(stderr: str) -> int:
    """Users counted in doubt in a run's warnings (its own and those of runs it finished)."""
    return sum(
        int(n.replace(",", "")) for n in re.findall(r"([\d,]+) users' events in doubt", stderr)
    )


def expected(trail: AuditTrail, run_id: str) -> tuple[set[str], Counter[tuple[str, str, str]]]:
    """The users a delivered run sent (its outbox) and the events they make."""
    outbox = trail.read_outbox(run_id, "braze")
    events: Counter[tuple[str, str, str]] = Counter()
    for record in outbox.to_dicts():
        time = event_time(record["as_of"])
        events.update((record["user_id"], name, time) for name in record_events(record, "lapse_"))
    return set(outbox["user_id"].to_list()), events


def statuses(home: Path) -> dict[str, str]:
    with Ledger(home / "lapse-runs" / "ledger.sqlite") as ledger:
        return {r: ledger.run(r).status for r, _, _ in ledger.runs()}


def score_args(world: World, cfg: Path, day: datetime, *extra: str) -> list[str]:
    return [
        "score",
        str(world.events),
        "--model",
        str(world.bundle),
        "--config",
        str(cfg),
        "--as-of",
        f"{day:%Y-%m-%d}",
        "--sink",
        "braze",
        *extra,
    ]


#: The stages in an order where each run's own work reaches its fault point: a run first
#: finishes what the one before left (in the same process, where a delivery fault point
#: would trip first), so the stages inside delivery follow a run that left none to finish,
#: and ``resume`` finishes one with the command its first line printed.
STAGES = (
    "run_recorded",
    "before_send@2",  # the 2nd batch marked sending, its request not made
    "resume",
    "after_send@2",  # the 2nd batch acknowledged, the ledger not told
    "after_snapshot",
    "after_outbox",
    "after_delivery",
    "before_delivery",
    "resume",
)


def test_a_score_run_killed_at_every_stage_loses_nothing_and_doubles_nothing(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run per stage, a day apart, each SIGKILLed at its stage; the next run finishes or
    cleans up the one before and says so, or the printed resume command finishes it."""
    home = _isolated_home
    cfg = config_file(home, world)
    config = load_config(cfg)
    trail = AuditTrail(home / "lapse-runs")
    ids: dict[str, str] = {}
    said: dict[str, str] = {}
    forgotten = ""
    with Braze() as braze:
        braze.fail_next("/users/track", "429", "503", "drop_after")
        monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
        monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", braze.url)
        day = world.as_of
        resume: list[str] = []
        for stage in STAGES:
            if stage == "resume":
                done = lapse(home, braze, *resume)
                assert done.returncode == 0, done.stderr
                run_id, again = header(done.stdout)
                assert again == resume and done.stdout.startswith(f"resuming score run {run_id}")
                said[f"resume {run_id}"] = done.stdout + done.stderr
                continue
            killed = lapse(home, braze, *score_args(world, cfg, day), fault=stage)
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            run_id, resume = header(killed.stdout)  # the first line: id, model, resume command
            assert resume == ["score", str(world.events), "--resume", run_id, "--config", str(cfg)]
            ids[stage], said[stage] = run_id, killed.stderr
            if stage == "after_snapshot":
                # the orphan snapshot says sent=true for users who got nothing: impact leaves
                # it out (and counts the runs delivered), forget still cleans it
                snapshot = trail.snapshot(run_day(day), run_id)
                assert pl.read_parquet(snapshot)["sent"].any()
                counted = impact(world.events, config, since=run_day(world.as_of))
                assert sorted(counted.runs) == sorted([ids["before_send@2"], ids["after_send@2"]])
                assert any("1 run(s) left out" in n and run_id in n for n in counted.notes)
                forgotten = pl.read_parquet(snapshot)["user_id"][0]
                rows = trail.snapshots().filter(pl.col("user_id") == forgotten).height
                assert run_forget(config, [forgotten]).removed["snapshot_rows"] == rows
                assert forgotten not in pl.read_parquet(snapshot)["user_id"].to_list()
            if stage == "after_outbox":  # its printed resume: nothing was sent, it says so
                res = runner.invoke(app, resume)
                assert res.exit_code == 2
                assert f"score run {run_id} stopped before it sent anything" in res.output
                assert "nothing to resume" in res.output
                assert not trail.outbox(run_id, "braze").exists()
            day += timedelta(days=1)

    # each run said what it did about the one before
    assert (
        f"score run {ids['run_recorded']} was cut off before it sent anything"
        in said["before_send@2"]
    )
    assert (
        f"score run {ids['after_send@2']} was cut off during delivery; this run finished it"
        in said["after_snapshot"]
    )
    assert (
        f"score run {ids['after_snapshot']} was cut off before it sent anything"
        in said["after_outbox"]
    )
    assert (
        f"score run {ids['after_delivery']} was cut off during delivery" in said["before_delivery"]
    )
    last = said[f"resume {ids['before_delivery']}"]
    assert "resumed: the earlier attempt had delivered 0 records, the resume sent" in last
    assert "scored with" in last and "(version local)" in last

    runs = statuses(home)
    delivered = [
        ids[s] for s in ("before_send@2", "after_send@2", "after_delivery", "before_delivery")
    ]
    assert {r: s for r, s in runs.items() if s != "complete"} == {
        ids[s]: "abandoned" for s in ("run_recorded", "after_snapshot", "after_outbox")
    }
    for stage in ("run_recorded", "after_snapshot", "after_outbox"):
        assert not list((home / "lapse-runs").rglob(f"{ids[stage]}*"))  # no file of theirs
    assert not list(home.rglob("*.tmp"))

    # 0 records lost: every record of every delivered run reached Braze
    want: Counter[tuple[str, str, str]] = Counter()
    for run_id in delivered:
        users, events = expected(trail, run_id)
        day_sent = str(run_day(trail_as_of(trail, run_id)))
        assert users and users <= {u for u, d in braze.attributes if d == day_sent}
        want += events
    # no event twice; the events missing are those of the batch marked sending when its run
    # was killed (skip, the default, resent its attributes only), counted by the resume
    # (the user erased by forget is gone from the outboxes of that time: left out here)
    want = Counter({e: n for e, n in want.items() if e[0] != forgotten})
    got = Counter(e for e in braze.sent_events if e[0] != forgotten)
    assert max(got.values()) == 1 and set(got) <= set(want)
    missing = {user for user, _, _ in want - got}
    assert 0 < len(missing) <= in_doubt(said[f"resume {ids['before_send@2']}"])
    assert in_doubt(said["after_snapshot"]) > 0  # the acknowledged batch: in doubt, no loss
    # impact counts the delivered runs only
    result = impact(world.events, config, since=run_day(world.as_of))
    assert sorted(result.runs) == sorted(delivered)
    assert not any("left out" in n for n in result.notes)


def trail_as_of(trail: AuditTrail, run_id: str) -> datetime:
    with Ledger(trail.ledger) as ledger:
        return ledger.run(run_id).as_of


def test_kills_at_random_moments_of_delivery_then_resumes(
    world: World, _isolated_home: Path
) -> None:
    """Killed twice in flight (at a random request, before or after Braze processed it),
    then finished with the printed resume command."""
    rng = random.Random(27)
    home = _isolated_home
    cfg = config_file(home, world)
    trail = AuditTrail(home / "lapse-runs")
    outputs = []
    with Braze() as braze:
        braze.fail_next("/users/track", "503", "drop_before", "429")
        argv = score_args(world, cfg, world.as_of)
        for attempt in range(3):
            proc = subprocess.Popen(
                lapse_argv(*argv),
                env=environment(home, braze),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            if attempt < 2:
                braze.kill = (proc, braze.count + rng.randint(2, 6), rng.random() < 0.5)
            stdout, stderr = proc.communicate(timeout=300)
            outputs.append(stdout + stderr)
            run_id, resume = header(stdout)
            if attempt < 2:
                assert proc.returncode == -signal.SIGKILL, stderr
                argv = resume
            else:
                assert proc.returncode == 0, stderr
                assert f"resuming score run {run_id}" in stdout
    assert statuses(home) == {run_id: "complete"}
    users, want = expected(trail, run_id)
    assert users <= {u for u, _ in braze.attributes}  # 0 records lost
    got = Counter(braze.sent_events)
    assert max(got.values()) == 1 and set(got) <= set(want)  # no event twice
    assert len({u for u, _, _ in want - got}) <= in_doubt("".join(outputs))


# -- `lapse triggers run --incremental` ---------------------------------------------------------


def folder(world: World, root: Path, days: int) -> Path:
    """An append-only event folder: the history before the world's as_of, then one file a day."""
    events = pl.read_parquet(world.events)
    out = root / "events"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "history.parquet").exists():
        events.filter(pl.col("ts") < world.as_of).write_parquet(out / "history.parquet")
    for k in range(days):  # files only ever added: a rewritten file would be new again
        start = world.as_of + timedelta(days=k)
        if not (out / f"day-{k:02d}.parquet").exists():
            events.filter(
                pl.col("ts").is_between(start, start + timedelta(days=1), "left")
            ).write_parquet(out / f"day-{k:02d}.parquet")
    return out


def triggers_args(events: Path, cfg: Path, world: World, at: datetime) -> list[str]:
    return [
        "triggers",
        "run",
        str(events),
        "--incremental",
        "--model",
        str(world.bundle),
        "--config",
        str(cfg),
        "--sink",
        "braze",
        "--as-of",
        at.strftime("%Y-%m-%dT%H:%M"),
    ]


def test_incremental_trigger_runs_killed_after_delivery_or_in_flight_equal_a_clean_sequence(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two homes run the same incremental sequence; in the second, one run is killed
    between its delivery and the watermark's advance and another in flight. Their next runs
    finish them: Braze ends with exactly the same events (no trigger lost or doubled)."""
    at = [
        world.as_of,
        world.as_of + timedelta(days=1, hours=3, minutes=17),
        world.as_of + timedelta(days=1, hours=3, minutes=22),
        world.as_of + timedelta(days=2, hours=14, minutes=5),
        world.as_of + timedelta(days=2, hours=14, minutes=10),
    ]
    files = [0, 1, 1, 2, 2]  # daily files in the folder at each run
    faults = [None, "before_watermark", None, "after_send@1", None]
    servers = {}
    for crash in (False, True):
        home = tmp_path / ("crash" if crash else "clean")
        home.mkdir()
        cfg = config_file(home, world)
        events = home / "events"
        with Braze() as braze:
            monkeypatch.setenv("LAPSE_HOME", str(home))
            monkeypatch.setenv("LAPSE_BRAZE_API_KEY", KEY)
            monkeypatch.setenv("LAPSE_BRAZE_BASE_URL", braze.url)
            for when, n, fault in zip(at, files, faults, strict=True):
                folder(world, home, n)
                argv = triggers_args(events, cfg, world, when)
                if crash and fault is not None:
                    killed = lapse(home, braze, *argv, fault=fault)
                    assert killed.returncode == -signal.SIGKILL, killed.stderr
                    header(killed.stdout)
                    continue
                res = runner.invoke(app, argv)
                assert res.exit_code == 0, res.output
                header(res.output)
                if crash and when == at[2]:
                    assert "was cut off after it delivered; its watermark is advanced" in res.output
                if crash and when == at[4]:
                    assert "was cut off during delivery; this run finished it first" in res.output
            servers[crash] = (Counter(braze.sent_events), set(braze.attributes))
    clean, crashed = servers[False], servers[True]
    assert clean[0]
    assert crashed[0] == clean[0]  # every trigger event as often as without the kills
    assert crashed[1] == clean[1]  # every record's attributes arrived


# -- a full disk ---------------------------------------------------------------------------------


def _can_mount_tmpfs(where: Path) -> bool:
    """Whether this machine lets us mount a size-limited tmpfs in a private namespace."""
    if shutil.which("unshare") is None:
        return False
    where.mkdir()
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def test_a_full_disk_is_one_line_exit_5_no_partial_file_and_resumable(
    world: World, tmp_path: Path
) -> None:
    """The real writers (Polars' Parquet, SQLite) on a full tmpfs: the audit snapshot, the
    outbox, the file sink and the ledger (tests/full_disk.py runs each in a private mount
    namespace, then frees the space and resumes, or runs again when told to), and the
    MLflow store of `lapse train --register`."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("no user namespaces here: cannot mount a size-limited tmpfs")
    args = {
        "root": str(tmp_path),
        "events": str(world.events),
        "bundle": str(world.bundle),
        "users": str(world.users),
        "as_of": f"{world.as_of:%Y-%m-%d}",
        "train_events": str(world.bundle.parent.parent / "train.parquet"),
        "config": str(config_file(tmp_path, world)),
    }
    driver = Path(__file__).parent / "full_disk.py"
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, str(driver), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    r = report.pop("mlflow")  # the registry's store (SQLite) on a full disk: one line, exit 5
    assert r["exit_code"] == 5, r["output"]
    assert r["output"].strip().splitlines() == [
        f"error: cannot write sqlite:///{tmp_path}/mlflow/store/mlflow.db: database or disk is "
        "full; free space or fix the path, then run again"
    ]
    assert r["again_exit_code"] == 0, r["again_output"]
    where = {
        "audit": "/lapse-runs/snapshots/run_date=",
        "outbox": "/lapse-runs/outbox/",
        "file_sink": "/scores/.scores.parquet.parts/",
        "ledger": "/lapse-runs/ledger.sqlite",
    }
    for name, r in report.items():
        lines = [line for line in r["output"].splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert r["exit_code"] == 5, (name, r["output"])
        assert len(errors) == 1 and "Traceback" not in r["output"], r["output"]
        assert "No space left on device" in errors[0] and where[name] in errors[0], errors[0]
        assert len(lines) == (1 if name == "ledger" else 2)  # the run's header, the error
        assert not [f for f in r["files"] if f.endswith(".tmp")]  # no partial file
        assert r["again_exit_code"] == 0 and r["out_exists"], r["again_output"]
        assert not [f for f in r["files_after"] if f.endswith(".tmp") or ".parts" in f]
    for name in ("audit", "outbox"):  # before delivery: nothing sent, nothing of it is left
        r = report[name]
        ((run_id, status),) = r["runs"].items()
        assert status == "abandoned" and not r["resumed"]
        assert "then run again" in r["output"]
        assert not [f for f in r["files"] if run_id in f]
    r = report["file_sink"]  # during delivery: stopped, resumable, then finished
    ((run_id, status),) = r["runs"].items()
    assert status == "interrupted" and r["resumed"]
    assert f"then finish score run {run_id} with `lapse score" in r["output"]
    assert r["runs_after"] == {run_id: "complete"}
    r = report["ledger"]  # the run could not be recorded: nothing else was written
    assert r["runs"] == {} and not r["resumed"] and "then run again" in r["output"]
    assert len(r["runs_after"]) == 1 and set(r["runs_after"].values()) == {"complete"}


# -- a killed `lapse train` ----------------------------------------------------------------------

#: What `lapse train` does after training, in a process of its own: log and register in MLflow.
LOG_TRAINING = (
    "import pickle, sys; from lapse.config import load_config; "
    "from lapse.registry import log_training; "
    "log_training(pickle.load(open(sys.argv[1], 'rb')), load_config(sys.argv[2]), "
    "events_path=sys.argv[3])"
)


def test_a_killed_train_leaves_no_running_run_and_no_unmarked_version(
    world: World, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while logging ends the MLflow run FAILED (this process gets the signal);
    after a SIGKILL between the registration and the aliases (another process), the next
    train marks the dead run FAILED and tags the version that was never finished (the
    training is done once, then logged three times)."""
    import pickle

    from mlflow import MlflowClient  # noqa: TID251  # the test inspects the store like a user

    from lapse.registry import log_training, tracking_uri
    from lapse.train.churn import train

    cfg = config_file(_isolated_home, world)
    config = load_config(cfg)
    events = world.bundle.parent.parent / "train.parquet"
    result = train(
        events, config, out_dir=_isolated_home / "report", models_dir=_isolated_home / "models"
    )
    saved = _isolated_home / "result.pkl"
    saved.write_bytes(pickle.dumps(result))
    uri = tracking_uri(config)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def log(fault: str) -> int:
        env = {**os.environ, "LAPSE_HOME": str(_isolated_home), "LAPSE_FAULT": fault}
        argv = [sys.executable, "-c", LOG_TRAINING, str(saved), str(cfg), str(events)]
        return subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode

    def runs() -> list[Any]:
        experiment = client.get_experiment_by_name(config.registry.experiment)
        return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])

    monkeypatch.setenv("LAPSE_FAULT", "train_logging:TERM")
    with pytest.raises(SystemExit) as stopped:
        log_training(result, config, events_path=events)
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.delenv("LAPSE_FAULT")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    ((terminated,),) = [runs()]
    assert terminated.info.status == "FAILED"

    assert log("after_register") == -signal.SIGKILL
    killed = runs()[-1]
    assert killed.info.status == "RUNNING"
    (version,) = client.search_model_versions(f"name = '{config.models.name}'")
    assert version.aliases == [] and version.tags["lapse.unfinished"].startswith("registered;")

    registered = log_training(result, config, events_path=events)  # the next train
    notes = " ".join(registered.notes)
    assert f"MLflow run {killed.info.run_id} was left RUNNING by a process that died" in notes
    assert f"version {version.version} was never finished" in notes
    assert [r.info.status for r in runs()] == ["FAILED", "FAILED", "FINISHED"]
    unfinished = client.get_model_version(config.models.name, version.version)
    assert unfinished.tags["lapse.unfinished"].startswith("never finished: its training run")
    assert unfinished.aliases == []
    latest = client.get_model_version(config.models.name, str(registered.version))
    assert "lapse.unfinished" not in latest.tags
    assert set(latest.aliases) == {"challenger", "champion"}


def test_a_cut_off_run_that_cannot_be_finished_does_not_block_the_next(
    world: World, _isolated_home: Path
) -> None:
    """A run left ``running`` whose outbox is gone (deleted by hand) is marked interrupted,
    with a note, and the next run goes on."""
    from lapse.score.run import run_score

    config = load_config(config_file(_isolated_home, world))
    with Ledger(_isolated_home / "lapse-runs" / "ledger.sqlite") as ledger:
        ledger.start_run("ghost", "file", as_of=world.as_of, model="m", target="", batches=[(0, 1)])
    out = _isolated_home / "scores.parquet"
    result = run_score(
        world.events, config, as_of=world.as_of, model=str(world.bundle), sink="file", out=out
    )
    assert result.complete and out.exists()
    assert statuses(_isolated_home) == {"ghost": "interrupted", result.score_run_id: "complete"}
    assert result.snapshot is not None
    summary = json.loads(result.snapshot.with_suffix(".json").read_text())
    (said,) = summary["notes"]
    assert said.startswith("score run ghost was cut off and cannot be finished: ")
    assert "outbox" in said or "audit summary" in said
