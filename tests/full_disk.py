"""Run `lapse score` against full file systems (run by tests/test_crash.py inside
``unshare -rm``: a private mount namespace where it may mount size-limited tmpfs).

For each scenario a tmpfs is mounted where one kind of file goes (the audit snapshots,
the outboxes, the file sink's output folder, the whole audit folder with the ledger) and
filled to the last byte; `lapse score` runs, then the filler is removed (space freed) and
the run is resumed (or run again when it says so). Prints one JSON object: per scenario
the exit codes, outputs, the files left and the ledger's run statuses. Last, `lapse
train --register` into an MLflow store on a full disk.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import dump_config, load_config
from lapse.delivery.ledger import Ledger

SCENARIOS = ("audit", "outbox", "file_sink", "ledger")


def mount_full(folder: Path, size: str) -> Path:
    """Mount a ``size`` tmpfs at ``folder`` and fill it; the filler file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    return fill(folder)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def statuses(audit: Path) -> dict[str, str]:
    if not (audit / "ledger.sqlite").exists():
        return {}
    with Ledger(audit / "ledger.sqlite") as ledger:
        return {r: ledger.run(r).status for r, _, _ in ledger.runs()}


def scenario(name: str, args: dict[str, str], runner: CliRunner) -> dict[str, Any]:
    home = Path(args["root"]) / name
    home.mkdir(parents=True)
    data = yaml.safe_load(dump_config(load_config()))
    data["attributes"]["path"] = args["users"]
    data["attributes"]["static_features"] = []
    data["delivery"]["batch_size"] = 20
    cfg = home / "lapse.yaml"
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    audit, out = home / "lapse-runs", home / "scores" / "scores.parquet"
    env = {"LAPSE_HOME": str(home)}
    argv = ["score", args["events"], "--model", args["bundle"], "--config", str(cfg)]
    argv += ["--as-of", args["as_of"], "--sink", "file", "--out", str(out)]
    if name == "ledger":  # a first run makes the ledger, then the disk is full
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(home)], check=True)
        audit.mkdir(parents=True)
        cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
        first = runner.invoke(app, argv, env=env)
        assert first.exit_code == 0, first.output
        before = statuses(audit)
        filler = fill(audit)
    else:
        before = {}
        where = {"audit": audit / "snapshots", "outbox": audit / "outbox", "file_sink": out.parent}
        filler = mount_full(where[name], "1m")
    failed = runner.invoke(app, argv, env=env)
    left = [f for f in files(home) if not f.endswith("filler")]
    filler.unlink()  # space freed (the ledger cannot even be read on a full disk)
    runs = {r: s for r, s in statuses(audit).items() if r not in before}
    resume = re.search(r"`(lapse score .+?)`", failed.output)
    again = shlex.split(resume[1])[1:] if resume else argv
    finished = runner.invoke(app, again, env=env)
    return {
        "exit_code": failed.exit_code,
        "output": failed.output + _traceback(failed),
        "files": left,
        "runs": runs,
        "resumed": resume is not None,
        "again_exit_code": finished.exit_code,
        "again_output": finished.output,
        "runs_after": {r: s for r, s in statuses(audit).items() if r not in before},
        "out_exists": out.exists(),
        "files_after": [f for f in files(home) if not f.endswith("filler")],
    }


def mlflow_scenario(args: dict[str, str], runner: CliRunner) -> dict[str, Any]:
    """`lapse train --register` into an MLflow store on a full disk, then with space freed."""
    home = Path(args["root"]) / "mlflow"
    store = home / "store"
    filler = mount_full(store, "8m")
    env = {"LAPSE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    argv = ["train", args["train_events"], "--register", "--config", args["config"]]
    failed = runner.invoke(app, argv, env=env)
    filler.unlink()
    again = runner.invoke(app, argv, env=env)
    return {
        "exit_code": failed.exit_code,
        "output": failed.output + _traceback(failed),
        "again_exit_code": again.exit_code,
        "again_output": again.output + _traceback(again),
    }


def _traceback(result: Any) -> str:
    """An unexpected exception's traceback (what a user would see instead of one line)."""
    if result.exc_info is None or isinstance(result.exception, SystemExit):
        return ""
    return "".join(traceback.format_exception(*result.exc_info))


def main() -> None:
    args = json.loads(sys.argv[1])
    runner = CliRunner()
    report = {name: scenario(name, args, runner) for name in SCENARIOS}
    report["mlflow"] = mlflow_scenario(args, runner)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
