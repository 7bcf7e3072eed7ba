"""MLflow tracking and registry on a real, temporary SQLite store per test.

Three models are trained once per module on the first 200 days of synthetic data:
``good`` with the default config, ``weak`` without the usage role (it sees
purchases only), so a review on the full 240 days has a known loser, and
``isotonic``, the good model calibrated with isotonic regression instead of Platt:
its tied scores cost about 0.004 ROC-AUC, the issue's slightly worse challenger
that the old point-delta check promoted. All run the replenishment race (the
default ``min_repeat_buyers`` of 20 finds both pod SKUs), so the review compares it
too. The review pools the two cutoffs after the models' label windows (482 users).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from lapse.config import LapseConfig, load_config
from lapse.datasets import generate, write
from lapse.events import read_events
from lapse.exceptions import LapseError, PromotionRefused
from lapse.jobs import run_forget
from lapse.modeling import ChurnBundle
from lapse.registry import (
    ReviewPair,
    flatten_metrics,
    history,
    load_bundle,
    log_training,
    promote,
    tracking_uri,
)
from lapse.train.churn import TrainResult, train
from lapse.train.review import review


@dataclass(frozen=True)
class Trained:
    full: Path
    train_events: Path
    good: TrainResult
    good_config: LapseConfig
    weak: TrainResult
    weak_config: LapseConfig
    isotonic: TrainResult
    isotonic_config: LapseConfig


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
    iso_config = load_config()
    iso_config.models.calibration = "isotonic"
    iso = train(train_events, iso_config, out_dir=root / "iso", models_dir=root / "iso_models")
    return Trained(
        files["events"], train_events, good, good_config, weak, weak_config, iso, iso_config
    )


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


def test_importing_the_registry_or_the_review_does_not_import_mlflow() -> None:
    code = "import sys, lapse.registry, lapse.train.review; print('mlflow' in sys.modules)"
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


def test_mlflow_as_the_reviewer_sees_it(trained: Trained, store: Path) -> None:
    """Run names and descriptions say what happened; versions carry provenance that never
    changes; no customer's row is an input example. Read back through MlflowClient."""
    import mlflow  # noqa: TID251  # the tests inspect the store like a user

    config = at(trained.good_config, store)
    first = log_training(trained.good, config, events_path=trained.train_events)
    second = log_training(
        trained.isotonic, at(trained.isotonic_config, store), events_path=trained.train_events
    )
    client = client_for(config)
    end = f"{trained.good.data_end:%Y-%m-%d}"

    run = client.get_run(first.run_id)
    assert run.info.run_name == f"train {end} {trained.good.selected}"
    description = run.data.tags["mlflow.note.content"]
    bundle = ChurnBundle.load(trained.good.bundle_path)
    assert bundle.training_data is not None
    span = bundle.training_data.describe(bundle.event_names())
    assert description.startswith(f"Data: {span} (data end {end}, exclusive).")
    assert "first_200_days.parquet, " in span
    assert "| model | validation_auc | roc_auc |" in description  # the race table
    assert f"Selected: **{trained.good.selected}**" in description
    auc = trained.good.metrics["churn"]["models"][trained.good.selected]["roc_auc"]
    assert f"roc_auc {auc:.4f}" in description
    assert "Replenishment race:" in description

    mv = client.get_model_version("lapse", "1")
    provenance = {k: v for k, v in mv.tags.items() if k.startswith("lapse.")}
    assert set(provenance) == {
        "lapse.version",
        "lapse.churn.selected",
        "lapse.data_fingerprint",
        "lapse.config_hash",
        "lapse.data_end",
    }
    assert provenance["lapse.data_fingerprint"] == run.inputs.dataset_inputs[0].dataset.digest
    other = client.get_model_version("lapse", "2").tags
    assert other["lapse.data_fingerprint"] == provenance["lapse.data_fingerprint"]
    assert other["lapse.config_hash"] != provenance["lapse.config_hash"]  # isotonic vs platt
    assert mv.description.startswith(f"lapse churn model {trained.good.selected} with ")
    assert first.run_id in mv.description and f"test ROC-AUC {auc:.4f}" in mv.description
    assert f"Trained on {span}" in mv.description
    assert second.version == 2
    before = {v: client.get_model_version("lapse", v) for v in ("1", "2")}

    # the example is synthetic: no id of the training data appears in it
    for name in ("input_example.json", "serving_input_example.json"):
        text = mlflow.artifacts.load_text(f"models:/lapse/1/{name}")
        assert '"example"' in text
    users = set(pl.read_parquet(trained.train_events)["user_id"].unique().to_list())
    example = json.loads(mlflow.artifacts.load_text("models:/lapse/1/input_example.json"))
    assert not users & {str(v) for row in example["data"] for v in row}

    # promotion and rollback change aliases and the log, never a version
    promote(config, force=True, reason="provenance check")
    promote(config, rollback=True)
    for version, then in before.items():
        now = client.get_model_version("lapse", version)
        assert (now.tags, now.description) == (then.tags, then.description)


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
    assert len(result.cutoffs) == 2, "the two weekly cutoffs after both label windows are pooled"
    assert min(result.cutoffs) >= max(trained.good.data_end, trained.weak.data_end)
    assert result.cutoff == max(result.cutoffs)
    churn = result.table.filter(pl.col("task") == "churn")
    assert set(churn["metric"]) == {"roc_auc", "pr_auc", "brier", "ece", "top_decile_lift"}
    auc = churn.filter(pl.col("metric") == "roc_auc").row(0, named=True)
    assert auc["primary"] and auc["delta"] == pytest.approx(auc["challenger"] - auc["champion"])
    assert auc["low"] <= auc["delta"] <= auc["high"] < -config.registry.tolerance, (
        "the purchase-only model should lose, all of its interval"
    )
    assert churn.filter(~pl.col("primary"))["low"].is_null().all()
    assert result.verdict == "refuse"
    assert result.rule.startswith("refuse: the whole 95% interval of churn.roc_auc (")
    assert result.reasons[0].startswith("churn.roc_auc -0.")
    replen = result.table.filter(pl.col("task") == "replenishment")
    assert replen["metric"].to_list() == ["concordance", "mae_days"]
    for row in replen.iter_rows(named=True):
        assert 0 < row["champion"] < 1e3 and 0 < row["challenger"] < 1e3, row
        assert row["delta"] == pytest.approx(row["challenger"] - row["champion"])
    concord = replen.filter(pl.col("metric") == "concordance").row(0, named=True)
    assert concord["primary"] and 0.5 < concord["champion"] <= 1.0
    assert concord["low"] <= concord["delta"] <= concord["high"]
    assert any(n.startswith("replenishment: ") and "2 cutoff(s)" in n for n in result.notes)
    for plot in ("roc", "calibration"):
        assert result.plots[plot].read_bytes()[:4] == b"\x89PNG"
    markdown = (store / "review" / "review.md").read_text()
    assert f"| churn | roc_auc | {auc['champion']:.4f} |" in markdown
    assert f"{auc['low']:+.4f} to {auc['high']:+.4f}" in markdown
    assert "Verdict: **refuse**" in markdown

    client = client_for(config)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "review lapse v2 vs v1: refuse"
    assert run.data.tags["mlflow.note.content"] == markdown
    assert run.data.tags["lapse.champion_version"] == "1"
    assert run.data.tags["lapse.challenger_version"] == "2"
    assert run.data.tags["lapse.verdict"] == "refuse"
    assert run.data.metrics["delta.churn.roc_auc"] == pytest.approx(auc["delta"])
    assert run.data.metrics["low.churn.roc_auc"] == pytest.approx(auc["low"])
    assert run.data.metrics["high.churn.roc_auc"] == pytest.approx(auc["high"])
    assert run.data.metrics["delta.replenishment.concordance"] == pytest.approx(concord["delta"])
    assert run.data.params["bootstrap"] == (
        "1000 paired resamples of users, seed 0, 95% percentile interval"
    )
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"roc.png", "calibration.png", "review.csv", "review.md"} <= logged

    # the refusal shows the interval, exits 4 on the command line, and is logged
    interval = f"({auc['low']:+.4f} to {auc['high']:+.4f})"
    with pytest.raises(PromotionRefused, match=re.escape(interval)) as refused:
        promote(config)
    assert refused.value.exit_code == 4
    assert "the champion stays version 1" in str(refused.value)
    assert int(client.get_model_version_by_alias("lapse", "champion").version) == 1

    forced = promote(config, force=True, reason="testing the weak model")
    assert (forced.action, forced.champion, forced.previous_champion) == ("forced", 2, 1)
    assert forced.reason.startswith("testing the weak model: forced; refuse: the whole")
    assert forced.user == getpass.getuser()
    assert "churn.roc_auc" in forced.checks
    assert int(client.get_model_version_by_alias("lapse", "previous-champion").version) == 1

    back = promote(config, rollback=True)
    assert (back.action, back.champion, back.previous_champion) == ("rolled_back", 1, None)
    assert int(client.get_model_version_by_alias("lapse", "champion").version) == 1
    assert "previous-champion" not in client.get_registered_model("lapse").aliases

    lenient = at(trained.good_config, store, tolerance=1.0)  # the stored interval, judged again
    accepted = promote(lenient)
    assert (accepted.action, accepted.champion, accepted.review_run_id) == (
        "promoted",
        2,
        result.run_id,
    )
    with pytest.raises(LapseError, match="already the champion"):
        promote(lenient)
    assert [(e.action, e.version, e.previous) for e in history(config)] == [
        ("registered", 1, None),
        ("refused", 2, 1),
        ("forced", 2, 1),
        ("rolled_back", 1, 2),
        ("promoted", 2, 1),
    ]
    (entry,) = [e for e in history(config) if e.action == "refused"]
    assert entry.verdict == "refuse" and entry.review_run == result.run_id


def test_a_slightly_worse_challenger_is_kept_and_a_better_one_promoted(
    trained: Trained, store: Path
) -> None:
    """The isotonic twin is slightly worse in ROC-AUC (about the 0.005 tolerance): its
    interval straddles the tolerance, so it is neither promoted nor refused; it stays out."""
    good = at(trained.good_config, store)
    log_training(trained.good, good, events_path=trained.train_events)
    log_training(
        trained.isotonic, at(trained.isotonic_config, store), events_path=trained.train_events
    )

    kept = review(trained.full, good)
    auc = kept.table.filter(pl.col("metric") == "roc_auc").row(0, named=True)
    assert -3 * good.registry.tolerance < auc["delta"] < 0
    assert auc["low"] < -good.registry.tolerance <= auc["high"]
    assert kept.verdict == "inconclusive"
    assert kept.rule.startswith("inconclusive: the 95% interval of churn.roc_auc (")
    settles = re.search(r"about ([\d,]+) more users, or (\d+) more cutoffs at this size", kept.rule)
    assert settles is not None and int(settles[1].replace(",", "")) > kept.n_users, kept.rule
    with pytest.raises(PromotionRefused, match="verdict is inconclusive"):
        promote(good)
    client = client_for(good)
    assert int(client.get_model_version_by_alias("lapse", "champion").version) == 1

    # the other way round: the Platt model over the isotonic champion is a clear promote
    promote(good, force=True, reason="set up the isotonic champion")
    log_training(trained.good, good, events_path=trained.train_events)  # version 3, Platt
    better = review(trained.full, good)
    assert (better.champion, better.challenger, better.verdict) == (2, 3, "promote")
    assert better.rule.startswith("promote: the worse-side bound of every primary metric")
    done = promote(good)
    assert (done.action, done.champion, done.previous_champion) == ("promoted", 3, 2)
    assert done.reason.startswith("promote: ") and better.run_id in done.reason


def test_two_rollbacks_walk_back_the_promotion_log(trained: Trained, store: Path) -> None:
    config = at(trained.good_config, store)
    for result in (trained.good, trained.isotonic, trained.weak, trained.good):
        log_training(result, config, events_path=trained.train_events)  # versions 1-4
    client = client_for(config)

    def champion() -> int:
        return int(client.get_model_version_by_alias("lapse", "champion").version)

    for version in (2, 3, 4):
        promote(config, version=version, force=True)
    assert champion() == 4
    first = promote(config, rollback=True)
    assert (first.champion, first.previous_champion) == (3, 2)
    second = promote(config, rollback=True)  # a swap would bring 4 back; the log goes to 2
    assert (second.champion, second.previous_champion, champion()) == (2, 1, 2)

    # never back to an archived version: promote 4 over 2, archive 2, roll back: version 1
    promote(config, version=4, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # MLflow deprecates stages, still honours them
        client.transition_model_version_stage("lapse", "2", "Archived")
    third = promote(config, rollback=True)
    assert (third.champion, third.previous_champion) == (1, None)
    with pytest.raises(LapseError, match="nothing to roll back to: the promotion log of 'lapse'"):
        promote(config, rollback=True)
    assert [(e.action, e.version) for e in history(config)] == [
        ("registered", 1),
        ("forced", 2),
        ("forced", 3),
        ("forced", 4),
        ("rolled_back", 3),
        ("rolled_back", 2),
        ("forced", 4),
        ("rolled_back", 1),
    ]


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
    with pytest.raises(LapseError, match="nothing to roll back to"):
        promote(config, rollback=True)
    with pytest.raises(LapseError, match="no registered model 'other'"):
        promote(config, name="other")
    with pytest.raises(LapseError, match="no registered model 'other'"):
        history(config, "other")


def test_each_config_uses_its_own_store_in_one_process(trained: Trained, store: Path) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; lapse must not then send the next
    config (a notebook's second project) to the first store."""
    log_training(trained.good, at(trained.good_config, store), events_path=trained.train_events)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    other = at(trained.good_config, store / "other")
    assert tracking_uri(other) == f"sqlite:///{(store / 'other').as_posix()}/mlflow.db"


def test_review_notes_a_version_without_replenishment(trained: Trained) -> None:
    from lapse.train.review import _replenishment_rows

    with_model = ChurnBundle.load(trained.good.bundle_path)
    assert "replenishment" in with_model.extras
    without = ChurnBundle.load(trained.weak.bundle_path)
    without.extras.pop("replenishment")
    events = read_events(trained.full, trained.good_config)
    pair = ReviewPair("lapse", 1, 2, (with_model, without))
    found, note = _replenishment_rows(
        pair, events, [datetime(2024, 1, 1, tzinfo=UTC)], trained.good_config
    )
    assert found is None
    assert note.startswith("replenishment was not compared: the challenger carries no")


def test_forget_reports_input_examples_it_cannot_rewrite(
    trained: Trained, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version logged with real rows as its example (as lapse did before, or by hand):
    `forget` names it, since MLflow artifacts cannot be rewritten (lapse's own examples are
    synthetic: test_mlflow_as_the_reviewer_sees_it)."""
    import mlflow  # noqa: TID251  # an older logger, writing a real input example

    config = at(trained.good_config, store)
    assert run_forget(config, ["u1"]).kept == []  # no store yet, and none is created
    assert not (store / "mlflow.db").exists()
    bundle = ChurnBundle.load(trained.good.bundle_path)
    rows = bundle.prepare(read_events(trained.train_events, config), trained.good.data_end)
    real = rows.head(3).select("user_id", *bundle.feature_schema)
    uri = tracking_uri(config)
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(variable, uri)  # mlflow exports them; undone after the test
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="lapse.registry",
            data_path=str(trained.good.bundle_path),
            input_example=real.to_pandas(),
        )
    mlflow.register_model(info.model_uri, "lapse")
    someone = str(real["user_id"][0])
    result = run_forget(config, [someone, "nobody"])
    assert len(result.kept) == 2, result.kept
    assert result.kept[0].startswith("models:/lapse/1 input_example.json holds 1 of these users")
    assert "serving_input_example.json" in result.kept[1]
    assert "delete that model version" in result.kept[0]
    assert run_forget(config, ["nobody"]).kept == []
