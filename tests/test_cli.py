from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import typer
import yaml
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import load_config

runner = CliRunner()


def test_help_lists_commands_and_no_placeholders() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "generate", "config", "demo"):
        assert command in result.output


def test_cli_import_stays_light() -> None:
    code = (
        "import sys, lapse.cli, lapse.jobs, lapse.events\n"
        "heavy = {'mlflow', 'lightgbm', 'lifelines', 'sklearn', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_FIT = (
    "import pickle, sys, numpy as np, lightgbm as lgb\n"
    "x = np.arange(200.0).reshape(100, 2); y = (x[:, 0] > 100).astype(float)\n"
    "b = lgb.train({'verbosity': -1, 'min_data_in_leaf': 5}, lgb.Dataset(x, y), 5)\n"
    "p = pickle.loads(pickle.dumps(b)).predict(x)\n"
    "assert ((p > 0.5) == (y > 0)).all(), p\n"
)


def test_lapse_process_imports_lightgbm_without_sklearn_or_pandas() -> None:
    """The `lapse` process (``main``) loads LightGBM without scikit-learn and pandas (about
    1.2 s of CPU), and LightGBM still trains, pickles and predicts there."""
    code = (
        "import sys\nfrom lapse import cli\nsys.argv = ['lapse', '--version']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        + _FIT
        + "assert not {'sklearn', 'pandas'} & set(sys.modules), sys.modules.keys()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_import_leaves_lightgbm_sklearn_api_whole() -> None:
    """Importing the CLI (a notebook, tests) changes nothing in LightGBM: its scikit-learn API
    fits, on a pandas frame too."""
    code = (
        "import lapse.cli\n"
        + _FIT
        + "import pandas as pd\n"
        + "m = lgb.LGBMClassifier(n_estimators=5, min_child_samples=5, verbose=-1)\n"
        + "assert (m.fit(pd.DataFrame(x), y).predict(pd.DataFrame(x)) == y).all()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("given", "used"), [(None, 1), ("2", 2)])
def test_cli_runs_openblas_on_one_thread_unless_told(given: str | None, used: int) -> None:
    """Small BLAS calls only make a second OpenBLAS thread spin; a user's setting wins."""
    code = (
        "import sys, lapse.cli\n"
        "assert 'numpy' not in sys.modules, 'numpy loaded before the thread setting'\n"
        "import numpy, scipy.linalg, threadpoolctl\n"
        "pools = [i for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']\n"
        "print(sorted({i['num_threads'] for i in pools}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == f"[{used}]"  # numpy's OpenBLAS and scipy's own


def test_generate_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = runner.invoke(
        app, ["generate", "--users", "60", "--days", "45", "--seed", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for name in ("events", "users", "truth", "truth_hazard"):
        assert (out / f"{name}.parquet").exists()
    result = runner.invoke(app, ["validate", str(out / "events.parquet")])
    assert result.exit_code == 0, result.output
    rows = pl.read_parquet(out / "events.parquet").height
    assert f"{rows:,}" in result.output
    assert "role usage" in result.output


def _bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "tx.csv"
    path.write_text(
        "user_id,ts,event\n"
        "a,2026-01-01T10:00:00Z,open\n"
        ",2026-01-01T11:00:00Z,open\n"
        "b,not a time,open\n"
        "c,2026-01-02T10:00:00Z,open\n",
        encoding="utf-8",
    )
    return path


def test_exit_code_1_validate_over_reject_share(tmp_path: Path) -> None:
    path = _bad_csv(tmp_path)
    rejects = tmp_path / "rejects.parquet"
    result = runner.invoke(app, ["validate", str(path), "--rejects", str(rejects)])
    assert result.exit_code == 1, result.output
    assert "50.0%" in result.output
    assert pl.read_parquet(rejects).height == 2
    ok = runner.invoke(
        app, ["validate", str(path), "--rejects", str(rejects), "--max-reject-share", "0.6"]
    )
    assert ok.exit_code == 0, ok.output


def test_unreadable_file_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    path.write_text("this is not parquet", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert str(path) in result.output


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("validate", []),
        ("features", ["--as-of", "2026-01-01", "--out", "{tmp}/features.parquet"]),
        ("train", ["--out", "{tmp}/run"]),
    ],
)
def test_input_without_rows_is_one_line_exit_2(
    command: str, args: list[str], tmp_path: Path
) -> None:
    header = tmp_path / "header.csv"
    header.write_text("user_id,ts,event\n", encoding="utf-8")
    schema = {"user_id": pl.String, "ts": pl.Datetime("us", "UTC"), "event": pl.String}
    pl.DataFrame(schema=schema).write_parquet(tmp_path / "none.parquet")
    for path in (header, tmp_path / "none.parquet"):
        result = runner.invoke(app, [command, str(path), *(a.format(tmp=tmp_path) for a in args)])
        assert result.exit_code == 2, result.output
        (line,) = [line for line in result.output.splitlines() if line.strip()]
        assert line == (
            f"error: {path}: the file has no rows, only a header or schema; point at data with rows"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.csv", "none.parquet"]


def test_exit_code_2_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("roles:\n  usage: app_open\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "show", "--config", str(config)])
    assert result.exit_code == 2
    assert "roles.usage" in result.output


def test_config_show_prints_loadable_yaml() -> None:
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["roles"]["usage"] == ["app_open", "device_used"]


def test_config_init_writes_a_loadable_skeleton(tmp_path: Path) -> None:
    events = tmp_path / "e.csv"
    events.write_text("userId,timestamp,event\nu1,2026-01-01T00:00:00Z,Opened\n", encoding="utf-8")
    out = tmp_path / "lapse.yaml"
    result = runner.invoke(app, ["config", "init", str(events), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["config", "show", "--config", str(out)])
    assert shown.exit_code == 0, shown.output
    again = runner.invoke(app, ["config", "init", str(events), "--out", str(out)])
    assert again.exit_code == 2
    assert "--force" in again.output


def test_bad_as_of_date(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_bad_csv(tmp_path)), "--as-of", "yesterday"])
    assert result.exit_code == 2
    assert "YYYY-MM-DD" in result.output


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAPSE_HOME", str(tmp_path))  # the MLflow store lands here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--users", "600", "--days", "180"])
    assert result.exit_code == 0, result.output
    for name in ("events.parquet", "features.parquet", "report/metrics.json", "models/lapse.pkl"):
        assert (out / name).exists(), name
    assert "rows kept" in result.output
    assert "selected:" in result.output
    assert "registered lapse version 1 (challenger, champion)" in result.output
    assert (tmp_path / "mlflow.db").exists()
    # ... and scored every eligible user with the registered model into the file sink
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.height > 0 and (scores["model_version"] == "1").all()
    assert list(tmp_path.glob("lapse-runs/snapshots/run_date=*/*.parquet"))
    assert "where to look next" in result.output and "mlflow ui" in result.output
    assert f"who was scored: {scores.height:,} of " in result.output


def test_exit_code_4_train_review_promote_refused_then_forced_and_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAPSE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    assert (
        runner.invoke(
            app, ["generate", "--users", "500", "--days", "200", "--out", str(data)]
        ).exit_code
        == 0
    )
    full = data / "events.parquet"
    early = tmp_path / "early.parquet"
    pl.read_parquet(full).filter(
        pl.col("ts") < pl.datetime(2026, 6, 1, time_zone="UTC")
    ).write_parquet(early)
    for version, until in ((1, []), (2, ["--until", "2026-05-18"])):
        run = runner.invoke(
            app, ["train", str(early), "--out", str(tmp_path / f"r{version}"), *until]
        )
        assert run.exit_code == 0, run.output
        assert f"registered lapse version {version}" in run.output
        # the shipped model's segment sizes: the top 10% high, the next 20% medium
        sizes = re.search(r"segments at \S+: high [\d,]+ \((\d+\.\d)%\), medium", run.output)
        assert sizes is not None and 8 <= float(sizes[1]) <= 12, run.output
    reviewed = runner.invoke(app, ["review", str(full)])
    assert reviewed.exit_code == 0, reviewed.output
    assert "champion v1" in reviewed.output and "challenger v2" in reviewed.output
    assert "cutoffs 2026-06-01, 2026-06-08, 2026-06-15, 2026-06-22;" in reviewed.output
    interval = re.search(r"roc_auc \(primary\).*?([-+]\d\.\d{4} to [-+]\d\.\d{4})", reviewed.output)
    assert interval is not None, reviewed.output
    assert "verdict: inconclusive" in reviewed.output
    assert "more users, or" in reviewed.output  # how much data would settle it

    refused = runner.invoke(app, ["promote"])
    assert refused.exit_code == 4, refused.output
    (line,) = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert line.startswith(
        "error: promotion of version 2 of 'lapse' refused, the review's verdict "
    )
    assert f"({interval[1]})" in line and "pass --force to promote anyway" in line

    promoted = runner.invoke(app, ["promote", "--force", "--reason", "cli test"])
    assert promoted.exit_code == 0, promoted.output
    assert "champion is now v2 (previous-champion v1)" in promoted.output
    back = runner.invoke(app, ["promote", "--rollback"])
    assert back.exit_code == 0, back.output
    assert "champion is now v1 (previous-champion none)" in back.output
    again = runner.invoke(app, ["promote", "--rollback"])
    assert again.exit_code == 2 and "nothing to roll back to" in again.output
    both = runner.invoke(app, ["promote", "--force", "--rollback"])
    assert both.exit_code == 2
    log = runner.invoke(app, ["registry", "history"])
    assert log.exit_code == 0, log.output
    rows = [
        [cell.strip() for cell in ln.split("│")[1:-1]]
        for ln in log.output.splitlines()
        if ln.startswith("│")
    ]
    assert [(r[2], r[3]) for r in rows if r[0]] == [
        ("registered", "v1"),
        ("refused", "v2"),
        ("forced", "v2"),
        ("rolled back", "v1"),
    ], log.output
    # the champion serves, and says first which version and what it was trained on
    scored = runner.invoke(app, ["score", str(full), "--as-of", "2026-06-01", "--dry-run"])
    assert scored.exit_code == 0, scored.output
    first = next(line for line in scored.output.splitlines() if line.startswith("score run "))
    assert first.endswith(
        "model 'lapse' version 1 (models:/lapse@champion); trained on "
        f"{early}, 2026-01-01 to 2026-05-31, events app_error, app_open, device_error, "
        "device_used, order_completed, order_returned, routine_created, setup_completed "
        "and 2 more"
    ), first


def test_features_command_writes_one_row_per_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        runner.invoke(
            app, ["generate", "--users", "80", "--days", "60", "--out", str(data)]
        ).exit_code
        == 0
    )
    out = tmp_path / "features.parquet"
    result = runner.invoke(
        app, ["features", str(data / "events.parquet"), "--as-of", "2026-02-15", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    events = pl.read_parquet(data / "events.parquet")
    before = events.filter(pl.col("ts") < pl.datetime(2026, 2, 15, time_zone="UTC"))
    assert frame.height == before["user_id"].n_unique()
    assert frame["user_id"].is_unique().all()
    assert {"usage_count_7d", "decay_ratio_14d", "days_since_last_purchase"} <= set(frame.columns)
    assert f"{frame.height:,}" in result.output


def test_features_report_rows_validation_dropped(tmp_path: Path) -> None:
    out = tmp_path / "f.parquet"
    argv = ["features", str(_bad_csv(tmp_path)), "--as-of", "2026-01-03", "--out", str(out)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "2 rejected" in result.output
    assert sorted(pl.read_parquet(out)["user_id"]) == ["a", "c"]


def test_error_messages_keep_bracketed_column_lists(tmp_path: Path) -> None:
    path = tmp_path / "nocols.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "The source has [a, b]" in result.output


def test_version() -> None:
    from lapse import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"lapse {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


def test_tables_print_whole_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    """The nightly job's log and CI are not terminals: a table row longer than 80
    columns stays one line there (rich would fold it at 80)."""
    deep = tmp_path / ("a-folder-name-long-enough-to-push-the-row-past-eighty-columns" * 2)
    deep.mkdir()
    rejects = str(deep / "rejects.parquet")
    argv = ["validate", str(_bad_csv(tmp_path)), "--rejects", rejects, "--max-reject-share", "1"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if "rejects file" in line]
    assert rejects in row and len(row) > 80


def test_a_terminal_keeps_its_width() -> None:
    import io

    from rich.table import Table

    from lapse.cli import _Console

    table = Table("column")
    table.add_row("x" * 120)
    wide, narrow = io.StringIO(), io.StringIO()
    _Console(file=wide).print(table)
    _Console(file=narrow, force_terminal=True, color_system=None, width=50).print(table)
    assert max(len(line) for line in wide.getvalue().splitlines()) == 124
    assert max(len(line) for line in narrow.getvalue().splitlines()) == 50


# -- exit codes: docs/exit-codes.md; 1, 2 and 4 are tested above ------------------------------


def test_exit_code_0_done(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--users", "5", "--days", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output


def test_exit_code_3_another_run_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lapse.delivery.ledger import sink_lock

    monkeypatch.setenv("LAPSE_HOME", str(tmp_path))
    events = _bad_csv(tmp_path)
    config = load_config()
    with sink_lock(config.resolve(config.audit.path) / "locks", "file", "lapse score"):
        result = runner.invoke(
            app, ["score", str(events), "--sink", "file", "--out", str(tmp_path / "s.parquet")]
        )
    assert result.exit_code == 3, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith("error: sink 'file' is busy: `lapse score` is running, pid ")


def test_exit_code_5_a_write_fails(tmp_path: Path) -> None:
    """/dev/full takes the file and fails the write, as a full disk does."""
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full on this system")
    events = tmp_path / "e.csv"
    events.write_text("userId,timestamp,event\nu1,2026-01-01T00:00:00Z,Opened\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "init", str(events), "--out", str(full), "--force"])
    assert result.exit_code == 5, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line == (
        "error: cannot write /dev/full: No space left on device; free space or fix the path, "
        "then run again"
    )


def _commands(group: typer.Typer, prefix: str = "") -> list[str]:
    found = [f"{prefix}{c.name or c.callback.__name__}" for c in group.registered_commands]  # type: ignore[union-attr]
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, f"{prefix}{sub.name} ")  # type: ignore[arg-type]
    return found


def test_exit_code_table_names_every_command_and_matches_the_exceptions() -> None:
    from lapse.exceptions import LapseError, LockHeldError, PromotionRefused, WriteFailed

    text = (Path(__file__).resolve().parents[1] / "docs" / "exit-codes.md").read_text()
    codes = re.findall(r"^\| (\d) \|", text, re.M)
    assert codes == ["0", "1", "2", "3", "4", "5"]
    listed = re.findall(r"^\| `lapse ([a-z ]+)` \|", text, re.M)
    assert sorted(listed) == sorted(c.replace("_", "-") for c in _commands(app))
    assert [e.exit_code for e in (LapseError, LockHeldError, PromotionRefused, WriteFailed)] == [
        2,
        3,
        4,
        5,
    ]
