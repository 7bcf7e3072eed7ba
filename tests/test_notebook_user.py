"""The notebook user (issue #25): events in memory, the estimators, figures inline, report.html.

One small source-shaped log (its own column names, integer customer ids, timestamps as
text, two rows without a customer, three duplicates) is read as a Parquet file and as a
Polars DataFrame, a Polars LazyFrame and a pandas DataFrame: every entry point that takes
events must give the file's answer. Every public call that plots runs on the ``svg``
backend and must leave it (and pyplot) untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import polars as pl
import pytest
from matplotlib.figure import Figure
from polars.testing import assert_frame_equal
from sklearn.base import clone

import lapse
from lapse.config import LapseConfig, load_config
from lapse.datasets import generate
from lapse.events import event_files, read_events, read_user_events, validate_events
from lapse.events.readers import frame_digest
from lapse.exceptions import EventsError, LapseError, MissingColumnsError, ReadError
from lapse.features import build, build_many
from lapse.score.records import score_users
from lapse.score.run import run_score
from lapse.score.trigger_run import run_triggers
from lapse.train.churn import TrainResult, _load, backtest, train

FORMS: dict[str, Callable[[pl.DataFrame], Any]] = {
    "polars": lambda df: df,
    "lazy": lambda df: df.lazy(),
    "pandas": lambda df: df.to_pandas(),
}
NAMES = {"polars": "events DataFrame", "lazy": "events LazyFrame", "pandas": "events DataFrame"}
PNG = b"\x89PNG\r\n\x1a\n"


def source_frame() -> pl.DataFrame:
    """The generator's events shaped like a warehouse export, with rows validation drops."""
    events = generate(n_users=300, n_days=150, seed=2).events
    src = events.select(
        pl.col("user_id").str.slice(1).cast(pl.Int64).alias("customer"),
        pl.col("ts").dt.strftime("%Y-%m-%d %H:%M:%S").alias("when"),
        "event",
        "sku",
        "quantity",
        "revenue",
    )
    nobody = src.head(2).with_columns(pl.lit(None, pl.Int64).alias("customer"))
    return pl.concat([src, src.slice(10, 3), nobody])


def small_config(**replenishment: object) -> LapseConfig:
    """The default config mapping the export's columns, with a cheap race."""
    config = load_config()
    config.source.columns = {"user_id": "customer", "ts": "when"}
    config.models.stacked_lightgbm = False
    config.labels.train_cutoffs = 3
    config.replenishment.enabled = bool(replenishment)
    for key, value in replenishment.items():
        setattr(config.replenishment, key, value)
    return config


@contextlib.contextmanager
def svg_backend() -> Iterator[None]:
    """Run on the svg backend; what runs inside must neither switch it nor use pyplot."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    assert matplotlib.get_backend() == "svg", "a lapse call switched the matplotlib backend"
    assert plt.get_fignums() == [], "a lapse call left pyplot figures open"
    matplotlib.use(before)


@pytest.fixture(autouse=True)
def _svg_backend() -> Iterator[None]:
    with svg_backend():
        yield


@pytest.fixture(scope="module")
def src() -> pl.DataFrame:
    return source_frame()


@pytest.fixture(scope="module")
def src_file(src: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "export.parquet"
    src.write_parquet(path)
    return path


@pytest.fixture(scope="module")
def trained(src_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """``lapse train`` on the file (replenishment on, next order of anything)."""
    root = tmp_path_factory.mktemp("trained")
    with svg_backend():
        return train(
            src_file,
            small_config(target="any", follow_up_days=31),
            out_dir=root / "report",
            models_dir=root / "m",
        )


@pytest.fixture(scope="module")
def model(src: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> lapse.ChurnModel:
    """The estimator fitted on the pandas DataFrame (replenishment off: the churn race only)."""
    out = tmp_path_factory.mktemp("model")
    with svg_backend():
        return lapse.ChurnModel(small_config(), out_dir=out).fit(src.to_pandas())


def _report(report: Any) -> dict[str, Any]:
    out = dataclasses.asdict(report)
    return {k: v for k, v in out.items() if k not in ("path", "rejects_path")}


# -- events in memory ----------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_validate_and_read_events_take_each_frame_like_the_file(
    form: str, src: pl.DataFrame, src_file: Path, tmp_path: Path
) -> None:
    config = small_config()
    kept, report = validate_events(src_file, config, rejects_path=tmp_path / "file.parquet")
    assert report.rows_rejected == 2 and report.duplicates == 3
    frame = FORMS[form](src)
    got, got_report = validate_events(frame, config, rejects_path=tmp_path / "frame.parquet")
    assert_frame_equal(got, kept)
    assert _report(got_report) == _report(report)
    assert got_report.path == NAMES[form]
    assert_frame_equal(
        pl.read_parquet(tmp_path / "frame.parquet"), pl.read_parquet(tmp_path / "file.parquet")
    )
    # without a rejects path a frame's rejects go next to the config (LAPSE_HOME here)
    _, default = validate_events(frame, config)
    assert default.rejects_path == config.resolve("dataframe.rejects.parquet")
    assert_frame_equal(
        read_events(frame, config).collect(), read_events(src_file, config).collect()
    )


@pytest.mark.parametrize("form", FORMS)
def test_features_take_each_form_through_the_source_mapping(
    form: str, src: pl.DataFrame, src_file: Path
) -> None:
    config = small_config()
    canonical = read_events(src_file, config)
    as_of = datetime(2026, 4, 1, tzinfo=UTC)
    expected = build(canonical, as_of, config)
    assert expected.height > 100
    assert_frame_equal(build(FORMS[form](src), as_of, config), expected)
    assert_frame_equal(build(src_file, as_of, config), expected)
    cuts = [as_of - timedelta(days=14), as_of]
    assert_frame_equal(
        build_many(FORMS[form](src), cuts, config), build_many(canonical, cuts, config)
    )


def test_bad_frames_fail_in_one_line_naming_the_frame_and_the_fix(src: pl.DataFrame) -> None:
    config = small_config()
    mixed = src.head(5).to_pandas()
    mixed["customer"] = mixed["customer"].astype(object)
    mixed.loc[0, "customer"] = "C17850"
    with pytest.raises(ReadError, match=r"pandas DataFrame: column 'customer' mixes types.*astype"):
        validate_events(mixed, config)
    with pytest.raises(ReadError, match=r"events must be a path, a Polars DataFrame .* got a dict"):
        validate_events(src.to_dict(), config)  # type: ignore[arg-type]
    with pytest.raises(ReadError, match="events DataFrame: the frame has no rows"):
        validate_events(src.clear(), config)
    with pytest.raises(MissingColumnsError, match=r"^events LazyFrame: missing columns: ts"):
        read_events(src.lazy().drop("when"), config)
    for call in (event_files, lambda f: read_user_events(f, config)):
        with pytest.raises(EventsError, match="append-only folder of event files"):
            call(src)


def test_a_frame_digest_is_its_content() -> None:
    a = pl.DataFrame({"id": [1, 2, None], "name": ["x", None, "z"]})
    chunked = pl.concat([a.head(1), a.tail(2)], rechunk=False)
    assert len(frame_digest(a)) == 16
    assert frame_digest(a) == frame_digest(chunked) == frame_digest(a.lazy())
    assert frame_digest(a) != frame_digest(a.with_columns(pl.col("name").fill_null("y")))
    assert frame_digest(a) != frame_digest(a.rename({"name": "label"}))


@pytest.mark.parametrize("form", FORMS)
def test_train_and_backtest_read_each_frame_like_the_file(
    form: str, src: pl.DataFrame, src_file: Path
) -> None:
    # what train and backtest read (their one reading step): kept events, report, links
    config = small_config()
    events, report, notes, links = _load(FORMS[form](src), config)
    f_events, f_report, f_notes, f_links = _load(src_file, config)
    assert_frame_equal(events.collect(), f_events.collect())
    assert _report(report) == _report(f_report) and report.path == NAMES[form]
    assert notes == [
        n.replace(str(f_report.rejects_path), str(report.rejects_path)) for n in f_notes
    ]
    assert "2 rejected" in notes[0]
    assert_frame_equal(links, f_links)


def test_backtest_reads_a_lazyframe_like_the_file(src: pl.DataFrame, src_file: Path) -> None:
    config = small_config()
    a = backtest(src_file, config, k=1)
    b = backtest(src.lazy(), config, k=1)
    assert a.per_cutoff.height > 0
    assert_frame_equal(b.per_cutoff, a.per_cutoff)


@pytest.mark.parametrize("form", FORMS)
def test_score_users_takes_each_form(
    form: str, trained: TrainResult, src: pl.DataFrame, src_file: Path
) -> None:
    from lapse.modeling import ChurnBundle

    bundle = ChurnBundle.load(trained.bundle_path)
    config = small_config()

    def records(events: Any) -> pl.DataFrame:
        kw = {"score_run_id": "t", "model_version": "local"}
        return score_users(bundle, events, trained.data_end, config, **kw).records  # type: ignore[arg-type]

    expected = records(read_events(src_file, config))
    assert expected.height > 100
    assert_frame_equal(records(FORMS[form](src)), expected)


def test_run_score_and_triggers_take_frames_like_the_file(
    trained: TrainResult, src: pl.DataFrame, src_file: Path, tmp_path: Path
) -> None:
    outputs = {}
    for name, events in (("file", src_file), ("polars", src), ("pandas", src.to_pandas())):
        config = small_config()
        config.audit.path = tmp_path / f"audit-{name}"  # its own ledger each
        run = run_score(
            events,
            config,
            as_of=trained.data_end,
            model=str(trained.bundle_path),
            sink="file",
            out=tmp_path / f"{name}.parquet",
        )
        assert run.validation is not None and run.validation.rows_rejected == 2
        outputs[name] = pl.read_parquet(tmp_path / f"{name}.parquet").drop("score_run_id")
    assert outputs["file"].height > 100
    assert_frame_equal(outputs["polars"], outputs["file"])
    assert_frame_equal(outputs["pandas"], outputs["file"])
    # a full trigger run reads a frame; an incremental one needs files to watch
    config = small_config()
    kw: dict[str, Any] = {"as_of": trained.data_end, "model": str(trained.bundle_path)}
    full = run_triggers(src, config, sink="file", out=tmp_path / "t.parquet", dry_run=True, **kw)
    by_file = run_triggers(
        src_file, config, sink="file", out=tmp_path / "u.parquet", dry_run=True, **kw
    )
    assert full.mode == "full" and full.fired == by_file.fired > 0
    with pytest.raises(EventsError, match="events DataFrame: incremental trigger runs watch"):
        run_triggers(src, config, incremental=True, sink="file", out=tmp_path / "v.parquet", **kw)


# -- figures and the report --------------------------------------------------------------


def test_train_returns_its_figures_and_writes_a_self_contained_html_report(
    trained: TrainResult,
) -> None:
    expected = {"roc", "pr", "calibration", "gains", "importance", "segments"}
    expected |= {"replenishment_km", "replenishment_calibration"}
    assert set(trained.figures) == set(trained.plots) == expected
    assert all(isinstance(f, Figure) for f in trained.figures.values())
    # Jupyter shows them as PNG whatever the backend: they carry a PNG repr
    assert trained.figures["calibration"]._repr_png_()[:8] == PNG
    for name, path in trained.plots.items():
        assert path.read_bytes()[:8] == PNG, name
    report = trained.report_path.read_text()
    for path in trained.plots.values():  # report.md links every PNG, by relative path
        assert f"]({path.name})" in report
    # the segment plot: customers per segment at the test cutoff, their observed churn
    segments = trained.figures["segments"].axes
    bars = [round(p.get_height()) for p in segments[0].patches]
    assert bars == list(trained.segments.values())
    rates = segments[1].lines[0].get_ydata()
    assert rates[0] > rates[-1]  # high-risk users churned more than low-risk ones
    assert "Observed churn rate in the label window after it: high" in report
    html = trained.html_path.read_text() if trained.html_path else ""
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert html.count('src="data:image/png;base64,') == len(expected)
    assert ".png)" not in html and 'src="roc.png"' not in html  # nothing left to fetch


def test_report_html_renders_the_report_markdown_and_embeds_its_images(tmp_path: Path) -> None:
    from lapse.train.report import report_html

    (tmp_path / "roc.png").write_bytes(PNG + b"rest")
    markdown = "\n".join(
        [
            "# Report <b>",
            "",
            "- one `code`",
            "- two **bold**",
            "",
            "| model | a\\|b |",
            "|---|---|",
            "| x * | 1 |",
            "",
            "text that",
            "wraps",
            "",
            "![roc](roc.png)",
            "![gone](gone.png)",
        ]
    )
    page = report_html(markdown, tmp_path, title="t")
    body = page.split("<body>")[1]
    assert "<h1>Report &lt;b&gt;</h1>" in body
    assert "<ul><li>one <code>code</code></li><li>two <strong>bold</strong></li></ul>" in body
    assert "<th>model</th><th>a|b</th>" in body and "<td>x *</td><td>1</td>" in body
    assert "<p>text that wraps</p>" in body
    assert 'src="data:image/png;base64,iVBORw0KGgpyZXN0"' in body
    assert "gone.png: not found" in body


# -- the estimators ------------------------------------------------------------------------


def test_churn_model_is_train_and_predicts_what_lapse_score_sends(
    model: lapse.ChurnModel, trained: TrainResult, src: pl.DataFrame, src_file: Path, tmp_path: Path
) -> None:
    assert model.result_ is not None and model.bundle_ is not None
    # fitted on the pandas frame: the churn race of the file
    fitted, by_file = (json.loads(r.metrics_path.read_text()) for r in (model.result_, trained))
    assert fitted["churn"] == by_file["churn"] and fitted["segments"] == by_file["segments"]
    assert set(model.figures_) == set(trained.figures) - {
        "replenishment_km",
        "replenishment_calibration",
    }
    as_of = trained.data_end
    risk = model.predict_proba(src.to_pandas(), as_of)
    config = small_config()
    config.audit.path = tmp_path / "audit"
    run_score(
        src_file,
        config,
        as_of=as_of,
        model=str(model.result_.bundle_path),
        sink="file",
        out=tmp_path / "scores.parquet",
    )
    sent = pl.read_parquet(tmp_path / "scores.parquet")
    assert risk.height > 100
    assert_frame_equal(risk, sent.select("user_id", "churn_risk").sort("user_id"))
    # a date means its midnight UTC, as on the command line
    assert_frame_equal(model.predict_proba(src, as_of.date()), risk)
    segments = model.segments(src, as_of)
    assert_frame_equal(segments, sent.select(segments.columns).sort("user_id"), check_dtypes=False)
    some = risk.sort("churn_risk", descending=True)["user_id"].head(3).to_list()
    why = model.reasons(src, as_of, users=some)
    assert sorted(why["user_id"].to_list()) == sorted(some)
    assert all(1 <= len(r) <= 3 for r in why["reasons"].to_list())


def test_churn_model_saves_loads_and_clones_like_an_estimator(
    model: lapse.ChurnModel, src: pl.DataFrame, tmp_path: Path
) -> None:
    as_of = datetime(2026, 4, 1, tzinfo=UTC)
    risk = model.predict_proba(src, as_of)
    path = model.save(tmp_path / "churn.pkl")
    assert_frame_equal(lapse.ChurnModel.load(path).predict_proba(src, as_of), risk)
    twin = clone(model)
    assert twin.get_params() == model.get_params() and twin.get_params()["config"] is not None
    assert not hasattr(twin, "bundle_") or getattr(twin, "bundle_", None) is None
    assert twin.set_params(out_dir=tmp_path) is twin and twin.out_dir == tmp_path
    fitted = [k for k in vars(model) if k not in model.get_params()]
    assert fitted and all(k.endswith("_") for k in fitted)
    with pytest.raises(LapseError, match="not fitted yet"):
        lapse.ChurnModel().predict_proba(src, as_of)
    with pytest.raises(LapseError, match="no timezone"):
        model.predict_proba(src, datetime(2026, 4, 1))
    with pytest.raises(ValueError, match="no parameter 'depth'"):
        model.set_params(depth=3)


def test_churn_model_loads_the_registered_champion_of_a_frame_trained_run(
    model: lapse.ChurnModel, src: pl.DataFrame, tmp_path: Path
) -> None:
    from mlflow import MlflowClient  # noqa: TID251  # the test reads the store like a user

    from lapse.registry import log_training, tracking_uri

    config = small_config()
    config.registry.tracking_uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    assert model.result_ is not None
    version = log_training(model.result_, config, events_path=src.to_pandas())
    loaded = lapse.ChurnModel.load(f"models:/{version.name}@champion", config)
    assert loaded.version_ == version.version
    as_of = datetime(2026, 4, 1, tzinfo=UTC)
    assert_frame_equal(loaded.predict_proba(src, as_of), model.predict_proba(src, as_of))
    uri = tracking_uri(config)
    run = MlflowClient(tracking_uri=uri, registry_uri=uri).get_run(version.run_id)
    digest = frame_digest(src.to_pandas())  # what it was trained on, as the tag says
    assert run.data.tags["lapse.events_source"] == f"events DataFrame (digest {digest})"
    assert run.data.params["data.events"] == "events DataFrame"
    assert "report/report.html" in {
        a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(version.run_id, "report")
    }


def test_replenishment_model_is_the_race_of_train_and_predicts_the_scored_next_order(
    trained: TrainResult, model: lapse.ChurnModel, src: pl.DataFrame, tmp_path: Path
) -> None:
    assert trained.replenishment is not None and model.result_ is not None
    config = small_config(target="any", follow_up_days=31)
    fitted = lapse.ReplenishmentModel(config).fit(src)
    assert fitted.result_ is not None and fitted.model_ is not None
    assert fitted.result_.metrics == trained.replenishment.metrics
    assert set(fitted.figures_) == {"replenishment_km", "replenishment_calibration"}
    # the replenishment model a bundle ships predicts the next order `lapse score` sends
    shipped = lapse.ReplenishmentModel.load(trained.bundle_path)
    as_of = trained.data_end
    predicted = shipped.predict_next_order(src.lazy(), as_of).select(
        "user_id", pl.col("depletion_date").dt.date().alias("predicted")
    )
    config.audit.path = tmp_path / "audit"
    out = tmp_path / "s.parquet"
    run_score(src, config, as_of=as_of, model=str(trained.bundle_path), sink="file", out=out)
    sent = pl.read_parquet(out).drop_nulls("next_order_date")
    both = sent.join(predicted, on="user_id", how="left")
    assert sent.height > 20 and both.height == sent.height
    assert (both["next_order_date"] == both["predicted"]).all()
    path = fitted.save(tmp_path / "next.pkl")
    again = lapse.ReplenishmentModel.load(path).predict_next_order(src, as_of)
    assert_frame_equal(again, fitted.predict_next_order(src, as_of))
    with pytest.raises(LapseError, match="not a lapse replenishment model"):
        lapse.ReplenishmentModel.load(_pickle(tmp_path / "other.pkl", {"a": 1}))
    with pytest.raises(LapseError, match="has no replenishment model"):
        lapse.ReplenishmentModel.load(model.result_.bundle_path)  # trained without it


def _pickle(path: Path, obj: object) -> Path:
    import pickle

    path.write_bytes(pickle.dumps(obj))
    return path
