"""MLflow tracking and registry on a real, temporary SQLite store per test.

Two models are trained once per module on the first 200 days of synthetic data:
``good`` with the default config and ``weak`` without the usage role (it sees
purchases only), so a review on the full 240 days has a known loser. Both run
the replenishment race (about 5 s each at 800 users; the default
``min_repeat_buyers`` of 20 finds both pod SKUs), so the review compares it too.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lapse.config import LapseConfig, load_config
from lapse.datasets import generate, write
from lapse.events import read_events
from lapse.exceptions import LapseError
from lapse.modeling import ChurnBundle
from lapse.registry import (
    flatten_metrics,
    load_bundle,
    log_training,
    promote,
    review,
    tracking_uri,
)
from lapse.train.churn import TrainResult, train


@dataclass(frozen=True)
class Trained:
    full: Path
    train_events: Path
    good: TrainResult
    good_config: LapseConfig
    weak: TrainResult
    weak_config: LapseConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("registry")
    files = write(generate(n_users=800, n_days=240, seed=5), root / "data")
    events = pl.read_parquet(files["events"])
    first = events["ts"].min()
    assert first is not None
    train_events = root / "data" / "first_200_days.parquet"
    events.filter(pl.col("ts") < first + timedelta(days=200)).write_parquet(train_events)
    good_config = load_config()
    good = train(train_events, good_config, out_dir=root / "good", models_dir=root / "good_models")
    weak_config = load_config()
    weak_config.roles.usage = []
    weak = train(train_events, weak_config, out_dir=root / "weak", models_dir=root / "weak_models")
    return Trained(files["events"], train_events, good, good_config, weak, weak_config)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder for this test's MLflow store; the working directory too, to catch strays."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LAPSE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def at(config: LapseConfig, store: Path, **registry: object) -> LapseConfig:
    """``config`` pointed at the test's store, with registry overrides."""
    out = config.model_copy(deep=True)
    out._base_dir = store
    out.registry.tracking_uri = None  # the default: sqlite:///mlflow.db in the base folder
    for key, value in registry.items():
        setattr(out.registry, key, value)
    return out


def client_for(config: LapseConfig):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient  # noqa: TID251  # the tests inspect the store like a user

    uri = tracking_uri(config)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- pure parts --------------------------------------------------------------------------


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LAPSE_HOME", str(tmp_path))
    config = load_config()
    assert tracking_uri(config) == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(config) == "http://mlflow.internal:5000"
    config.registry.tracking_uri = "sqlite:///stores/lapse.db"  # the config wins, resolved
    assert tracking_uri(config) == f"sqlite:///{tmp_path.resolve().as_posix()}/stores/lapse.db"
    config.registry.tracking_uri = "postgresql://mlflow@db/mlflow"
    assert tracking_uri(config) == "postgresql://mlflow@db/mlflow"

    monkeypatch.delenv("LAPSE_HOME")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "lapse.yaml").write_text("registry:\n  tracking_uri: sqlite:///x/m.db\n")
    assert tracking_uri(load_config(folder / "lapse.yaml")) == (
        f"sqlite:///{folder.resolve().as_posix()}/x/m.db"
    )


def test_flatten_metrics_drops_the_models_level_and_keeps_numbers() -> None:
    metrics = {
        "churn": {
            "models": {"lightgbm": {"roc_auc": 0.8, "ece": None}, "oracle": {"roc_auc": 0.9}},
            "selected": "lightgbm",
            "n_test": 120,
            "test_cutoff": "2024-05-01",
        },
        "replenishment": {"models": {"weibull_aft": {"concordance": 0.75, "n": 40}}},
    }
    assert flatten_metrics(metrics) == {
        "churn.lightgbm.roc_auc": 0.8,
        "churn.oracle.roc_auc": 0.9,
        "churn.n_test": 120.0,
        "replenishment.weibull_aft.concordance": 0.75,
        "replenishment.weibull_aft.n": 40.0,
    }


def test_importing_the_registry_does_not_import_mlflow() -> None:
    code = "import sys, lapse.registry; print('mlflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_git_commit_is_read_from_the_checkout(tmp_path: Path) -> None:
    from lapse.registry import _git_commit

    assert _git_commit(tmp_path) is None
    git = tmp_path / "proj" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    (tmp_path / "proj" / "sub").mkdir()
    assert _git_commit(tmp_path / "proj" / "sub") == "a" * 40
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\n" + "b" * 40 + " refs/heads/main\n")
    assert _git_commit(tmp_path / "proj") == "b" * 40


# -- the store ------------------------------------------------------------------------------


def test_train_register_and_load_by_alias(trained: Trained, store: Path) -> None:
    import mlflow  # noqa: TID251  # plain MLflow, no lapse glue, as a serving user would

    config = at(trained.good_config, store)
    version = log_training(trained.good, config, events_path=trained.train_events)
    assert version.version == 1 and set(version.aliases) == {"challenger", "champion"}
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()
    assert not (store / "mlruns").exists()

    bundle = ChurnBundle.load(trained.good.bundle_path)
    events = read_events(trained.full, config)
    rows = bundle.prepare(events, trained.good.data_end)
    expected = bundle.predict_proba(rows)

    mlflow.set_registry_uri(tracking_uri(config))
    served = mlflow.pyfunc.load_model("models:/lapse@champion").predict(rows.to_pandas())
    assert served["user_id"].tolist() == rows["user_id"].to_list()
    np.testing.assert_array_equal(served["churn_risk"].to_numpy(), expected)
    assert served["risk_segment"].tolist() == bundle.segments(expected).to_list()
    np.testing.assert_array_equal(
        served["churn_risk_percentile"].to_numpy(), bundle.percentile(expected)
    )

    loaded = load_bundle("models:/lapse@champion", config)
    assert (loaded.name, loaded.version, loaded.run_id) == ("lapse", 1, version.run_id)
    np.testing.assert_array_equal(loaded.bundle.predict_proba(rows), expected)
    local = load_bundle(trained.good.bundle_path, config)
    assert local.version is None
    np.testing.assert_array_equal(local.bundle.predict_proba(rows), expected)

    run = client_for(config).get_run(version.run_id)
    assert run.data.params["config.labels.horizon_days"] == "28"
    assert run.data.params["cutoffs.test"] == f"{trained.good.test_cutoff:%Y-%m-%d}"
    assert run.data.params["rows.train"] == str(trained.good.n_train)
    assert "usage_count_7d" in run.data.params["features"]
    assert run.data.metrics["churn.lightgbm.roc_auc"] == pytest.approx(
        trained.good.metrics["churn"]["models"]["lightgbm"]["roc_auc"]
    )
    assert run.data.tags["lapse.version"]
    (dataset,) = run.inputs.dataset_inputs
    assert "first_200_days.parquet" in dataset.dataset.source
    assert len(dataset.dataset.digest) == 16
    client = client_for(config)
    report = {a.path for a in client.list_artifacts(version.run_id, "report")}
    assert {"report/metrics.json", "report/roc.png", "report/report.md"} <= report
    config_yaml = mlflow.artifacts.load_text(f"runs:/{version.run_id}/config.yaml")
    assert "registry:" in config_yaml


def test_review_promote_refuse_force_and_rollback(trained: Trained, store: Path) -> None:
    config = at(trained.good_config, store)
    log_training(trained.good, config, events_path=trained.train_events)
    second = log_training(trained.weak, config, events_path=trained.train_events)
    assert second.aliases == ("challenger",)

    with pytest.raises(LapseError, match="no review compares version 2"):
        promote(config)
    with pytest.raises(LapseError, match="review on events that reach at least"):
        review(trained.train_events, config)

    result = review(trained.full, config, out_dir=store / "review")
    assert (result.champion, result.challenger) == (1, 2)
    assert result.cutoff >= max(trained.good.data_end, trained.weak.data_end)
    churn = result.table.filter(pl.col("task") == "churn")
    assert set(churn["metric"]) == {"roc_auc", "pr_auc", "brier", "ece", "top_decile_lift"}
    auc = churn.filter(pl.col("metric") == "roc_auc").row(0, named=True)
    assert auc["primary"] and auc["delta"] == pytest.approx(auc["challenger"] - auc["champion"])
    assert auc["delta"] < -config.registry.tolerance, "the purchase-only model should lose"
    assert result.verdict == "keep" and "churn.roc_auc" in result.reasons[0]
    replen = result.table.filter(pl.col("task") == "replenishment")
    assert replen["metric"].to_list() == ["concordance", "mae_days"]
    for row in replen.iter_rows(named=True):
        assert 0 < row["champion"] < 1e3 and 0 < row["challenger"] < 1e3, row
        assert row["delta"] == pytest.approx(row["challenger"] - row["champion"])
    concord = replen.filter(pl.col("metric") == "concordance").row(0, named=True)
    assert concord["primary"] and 0.5 < concord["champion"] <= 1.0
    assert any(n.startswith("replenishment: episodes open at") for n in result.notes)
    for plot in ("roc", "calibration"):
        assert result.plots[plot].read_bytes()[:4] == b"\x89PNG"
    client = client_for(config)
    run = client.get_run(result.run_id)
    assert run.data.tags["lapse.champion_version"] == "1"
    assert run.data.tags["lapse.challenger_version"] == "2"
    assert run.data.metrics["delta.churn.roc_auc"] == pytest.approx(auc["delta"])
    assert run.data.metrics["delta.replenishment.concordance"] == pytest.approx(concord["delta"])
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"roc.png", "calibration.png", "review.csv", "review.md"} <= logged

    with pytest.raises(LapseError, match=r"refused: churn\.roc_auc is .* lower .*tolerance"):
        promote(config)
    assert int(client.get_model_version_by_alias("lapse", "champion").version) == 1

    forced = promote(config, force=True, reason="testing the weak model")
    assert (forced.action, forced.champion, forced.previous_champion) == ("forced", 2, 1)
    tags = client.get_model_version("lapse", "2").tags
    assert tags["lapse.promoted_by"] == getpass.getuser()
    assert tags["lapse.promotion_forced"] == "true"
    assert tags["lapse.promotion_reason"].startswith("testing the weak model: forced")
    assert "churn.roc_auc" in json.loads(tags["lapse.promotion_metrics"])
    assert int(client.get_model_version_by_alias("lapse", "previous-champion").version) == 1

    back = promote(config, rollback=True)
    assert (back.action, back.champion, back.previous_champion) == ("rolled_back", 1, 2)
    assert int(client.get_model_version_by_alias("lapse", "champion").version) == 1
    assert client.get_model_version("lapse", "1").tags["lapse.rolled_back_from"] == "2"

    lenient = at(trained.good_config, store, tolerance=1.0)
    accepted = promote(lenient)
    assert (accepted.action, accepted.champion, accepted.review_run_id) == (
        "promoted",
        2,
        result.run_id,
    )
    with pytest.raises(LapseError, match="already the champion"):
        promote(lenient)


def test_missing_names_aliases_and_versions_list_what_exists(trained: Trained, store: Path) -> None:
    config = at(trained.good_config, store)
    with pytest.raises(LapseError, match=r"no registered model 'lapse' .*registered models: none"):
        load_bundle("models:/lapse@champion", config)
    log_training(trained.good, config, events_path=trained.train_events)
    with pytest.raises(LapseError, match=r"no registered model 'churn' .*registered models: lapse"):
        load_bundle("models:/churn@champion", config)
    with pytest.raises(
        LapseError,
        match=r"no alias 'gold' \(aliases: challenger -> version 1, champion -> version 1; "
        r"versions: 1\)",
    ):
        load_bundle("models:/lapse@gold", config)
    with pytest.raises(LapseError, match=r"no such version .*versions: 1"):
        load_bundle("models:/lapse/7", config)
    with pytest.raises(LapseError, match="models:/NAME@ALIAS"):
        load_bundle("models:/lapse", config)
    with pytest.raises(LapseError, match="nothing to review"):
        review(trained.full, config)
    with pytest.raises(LapseError, match="no alias 'previous-champion'"):
        promote(config, rollback=True)
    with pytest.raises(LapseError, match="no registered model 'other'"):
        promote(config, name="other")


def test_review_notes_a_version_without_replenishment(trained: Trained) -> None:
    from datetime import UTC, datetime

    from lapse.registry import _replenishment

    with_model = ChurnBundle.load(trained.good.bundle_path)
    assert "replenishment" in with_model.extras
    without = ChurnBundle.load(trained.weak.bundle_path)
    without.extras.pop("replenishment")
    events = read_events(trained.full, trained.good_config)
    found, note = _replenishment(
        [with_model, without], events, datetime(2024, 1, 1, tzinfo=UTC), trained.good_config
    )
    assert found is None
    assert note.startswith("replenishment was not compared: the challenger carries no")
