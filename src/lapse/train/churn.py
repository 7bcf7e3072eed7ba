"""Composition of the churn race for ``lapse train`` and ``lapse backtest``.

``train`` reads the events, lays the cutoff grid, builds labelled feature
frames, runs the race (fit on training cutoffs, calibrate and select on the
validation cutoff, evaluate on the test cutoff), writes the report folder
(``metrics.json``, ``report.md`` linking the PNG plots, a self-contained
``report.html``), refits the shipped model on all complete cutoffs and saves
the bundle. No printing: results carry what the CLI shows, and the figures
(matplotlib ``Figure`` objects, the backend left alone) for a notebook.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig, SegmentsConfig
from lapse.datasets import scan_truth
from lapse.events import ValidationReport, load_attributes, validate_with_links
from lapse.events.identity import at_each_cutoff
from lapse.events.readers import EventSource
from lapse.exceptions import LapseError, NotEnoughEpisodes
from lapse.features import build_many
from lapse.files import atomic_path
from lapse.labels import CutoffGrid, churn_labels, cutoff_grid, data_span, fit_grid, grid_for_test
from lapse.modeling.bgnbd import rfm_summary
from lapse.modeling.bundle import ChurnBundle, TrainingData
from lapse.modeling.drift import reference_sample
from lapse.modeling.lgbm import with_derived
from lapse.modeling.metrics import METRIC_NAMES
from lapse.modeling.plots import save_figures, segment_figure
from lapse.modeling.race import RaceResult, fit_calibrator, fit_scorer, run_race
from lapse.segments import assign, describe_sizes, sizes
from lapse.train.replenishment import ReplenishmentResult, report_section
from lapse.train.report import report_html
from lapse.train.worker import ChurnFigures, Race, ReplenishmentWorker
from lapse.train.worker import start as start_worker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BacktestResult", "TrainResult", "backtest", "build_frame", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What ``lapse train`` produced.

    ``table`` has one row per candidate (plus ``oracle``): ``model``,
    ``validation_auc``, the test metrics and ``selected``. ``segments``: the
    shipped model's users per risk segment at the calibration cutoff (its
    training score distribution). ``figures``: the report's figures by name
    (``roc``, ``pr``, ``calibration``, ``gains``, ``importance``, ``segments``
    and the replenishment ones), matplotlib ``Figure`` objects a notebook shows
    inline; ``plots`` their PNGs, ``html_path`` the self-contained ``report.html``.
    """

    metrics: dict[str, Any]
    table: pl.DataFrame
    selected: str
    why: str
    test_cutoff: datetime
    validation_cutoff: datetime
    training_cutoffs: list[datetime]
    refit_cutoffs: list[datetime]
    calibration_cutoff: datetime
    data_end: datetime
    n_train: int
    n_validation: int
    n_test: int
    test_base_rate: float
    oracle_auc: float | None
    out_dir: Path
    metrics_path: Path
    report_path: Path
    plots: dict[str, Path]
    bundle_path: Path
    notes: list[str] = field(default_factory=list)
    replenishment: ReplenishmentResult | None = None
    segments: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    html_path: Path | None = None


@dataclass(frozen=True)
class BacktestResult:
    """Per-cutoff metrics of the race on the last K complete cutoffs, and their spread.

    ``per_cutoff``: ``test_cutoff, model, selected`` and the metrics;
    ``spread``: per ``model``, the mean, std, min and max of each metric.
    """

    per_cutoff: pl.DataFrame
    spread: pl.DataFrame
    selected: dict[str, str]
    notes: list[str] = field(default_factory=list)


# -- frames ---------------------------------------------------------------------------


def build_frame(
    events: pl.LazyFrame,
    cutoffs: list[datetime],
    config: LapseConfig,
    *,
    data_end: datetime,
    attributes: pl.DataFrame | None = None,
    links: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(labelled, rfm)``: eligible users' features, labels (``churned``, ``days_to_next``)
    and ``btyd_*`` at each cutoff, and the BG/NBD summary of every active user (BG/NBD
    fits on the latter).

    With identity ``links`` each cutoff sees the ids of the links before it
    (:mod:`lapse.events.identity`)."""
    labels = churn_labels(
        events, cutoffs, config, data_end=data_end, links=links, days_to_next=True
    )
    features = build_many(events, cutoffs, config, attributes=attributes, links=links)
    if links is None or links.is_empty():
        rfm = rfm_summary(events, cutoffs, config)
    else:
        rfm = at_each_cutoff(lambda ev, cuts: rfm_summary(ev, cuts, config), events, links, cutoffs)
    frame = (
        labels.join(features, on=["user_id", "cutoff"], how="left")
        .join(rfm, on=["user_id", "cutoff"], how="left")
        .sort("cutoff", "user_id")
    )
    return with_derived(frame), rfm


def _cutoffs(frame: pl.DataFrame, first: datetime, last: datetime | None = None) -> pl.DataFrame:
    """The rows of the cutoffs from ``first`` to ``last`` (both in; ``first`` alone without
    ``last``) of a frame sorted by cutoff (:func:`build_frame`'s): a slice, no copy."""
    cutoff = frame["cutoff"]
    start = cutoff.search_sorted(first, side="left")
    end = cutoff.search_sorted(first if last is None else last, side="right")
    return frame.slice(start, end - start)


def _oracle(truth_dir: Path | None, test: datetime) -> pl.DataFrame | None:
    if truth_dir is None:
        return None

    return (
        scan_truth(truth_dir, "truth_hazard")
        .filter(pl.col("date") == test.date())
        .select("user_id", pl.col("p_churn_28d").cast(pl.Float64).alias("p_churn"))
        .collect()
    )


# Below this many eligible users at the validation or test cutoff, AUCs move by
# several points between neighbouring cutoffs; the report says so.
SMALL_CUTOFF = 500


def _load(
    events_path: EventSource, config: LapseConfig, until: datetime | None = None
) -> tuple[pl.LazyFrame, ValidationReport, list[str], pl.DataFrame]:
    """Read and validate once (labels, features and BG/NBD each scan the events), the
    identity links from the same read.

    Returns the kept events (those before ``until`` when given), the validation
    report, a note on what validation dropped, so a training report never
    hides rejected rows, and the identity links (before ``until`` too).
    """
    events, report, links = validate_with_links(events_path, config)
    if until is not None:
        events = events.filter(pl.col("ts") < until)
        links = links.filter(pl.col("ts") < until)
    notes = []
    if report.rows_rejected or report.duplicates or report.guest_rows:
        reasons = ", ".join(f"{k} {v:,}" for k, v in report.rejected_by_reason.items() if v)
        rejected = f"{report.rows_rejected:,} rejected"
        if report.rows_rejected:
            rejected += f" ({reasons}; the rows are in {report.rejects_path})"
        guests = f", {report.guest_rows:,} guest rows set aside" if report.guest_rows else ""
        notes.append(
            f"events: {report.rows_read:,} rows read, {rejected}, "
            f"{report.duplicates:,} duplicates dropped{guests}"
        )
    return events.lazy(), report, notes, links


def _fit_grid(events: pl.LazyFrame, config: LapseConfig) -> tuple[LapseConfig, list[str]]:
    """``config`` with the cutoff grid fitted to the events' span (:func:`fit_grid`), and
    the note saying what was adapted, so a short history never trains silently on a
    handful of cutoffs."""
    start, end = data_span(events)
    fit = fit_grid(config.labels, (end - start).days)
    return config.model_copy(update={"labels": fit.labels}), [fit.note] if fit.note else []


# -- train ----------------------------------------------------------------------------


def _training_data(
    report: ValidationReport, events: pl.LazyFrame, until: datetime | None
) -> TrainingData:
    """What the bundle was trained on; recounted from the kept events when cut at ``until``."""
    if until is None:
        return TrainingData(report.path, report.ts_min, report.ts_max, report.events_per_name)
    span = events.select(pl.col("ts").min().alias("a"), pl.col("ts").max().alias("b")).collect()
    per_name = events.group_by("event").len().collect()
    return TrainingData(
        report.path,
        span["a"].item(),
        span["b"].item(),
        {str(e): int(n) for e, n in sorted(per_name.iter_rows())},
    )


def _table(race: Any) -> pl.DataFrame:
    rows = []
    for name, cand in race.candidates.items():
        rows.append(
            {
                "model": name,
                "validation_auc": cand.validation_auc,
                **{k: cand.test_metrics[k] for k in METRIC_NAMES},
                "selected": name == race.selected,
            }
        )
    if race.oracle_auc is not None:
        rows.append(
            {
                "model": "oracle",
                "validation_auc": None,
                "roc_auc": race.oracle_auc,
                "selected": False,
            }
        )
    return pl.DataFrame(
        rows, schema_overrides={"validation_auc": pl.Float64}, infer_schema_length=None
    )


def _report_md(result_bits: dict[str, Any]) -> str:
    r = result_bits
    lines = [
        "# lapse churn report",
        "",
        f"- events: `{r['events']}`; data end (exclusive): {r['data_end']:%Y-%m-%d}",
        f"- label: {r['kind']}, horizon {r['horizon']} days; eligibility: {r['eligibility']}",
        f"- training cutoffs ({len(r['training'])}): {', '.join(f'{c:%Y-%m-%d}' for c in r['training'])}"
        f" ({r['n_train']} rows)",
        f"- validation cutoff: {r['validation']:%Y-%m-%d} ({r['n_validation']} users); "
        f"test cutoff: {r['test']:%Y-%m-%d} ({r['n_test']} users, churn rate {r['base_rate']:.3f})",
        "",
        "## Selection",
        "",
        f"Selected: **{r['selected']}**. {r['why'][0].upper()}{r['why'][1:]}. Every candidate was "
        f"calibrated ({r['calibration']}) on the validation cutoff, never on the test.",
        "",
        "## Test metrics (after calibration)",
        "",
        "| model | val AUC | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 2) + "|",
    ]
    for row in r["table"].iter_rows(named=True):
        cells = [row["model"] + (" *" if row["selected"] else "")]
        for key in ("validation_auc", *METRIC_NAMES):
            v = row.get(key)
            cells.append("" if v is None or not np.isfinite(v) else f"{v:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_image_links(r["plots"], ("roc", "pr", "calibration", "gains", "importance"))]
    lines += [
        "",
        "## Shipped model",
        "",
        f"After the race, the shipped {r['selected']} was refit with the same recipe shifted to the "
        "end of the data (LightGBM with the race model's number of trees and parameters): "
        f"fitted on {len(r['refit'])} cutoffs "
        f"({r['refit'][0]:%Y-%m-%d} to {r['refit'][-1]:%Y-%m-%d}, every complete cutoff whose label "
        f"window ends by {r['calibration_cutoff']:%Y-%m-%d}) and calibrated on the latest complete "
        f"cutoff, {r['calibration_cutoff']:%Y-%m-%d}. The metrics above are the race model's; the "
        "refit model has no held-out evaluation of its own.",
        "",
        "## Segments",
        "",
        f"The shipped model's users at the calibration cutoff, {r['calibration_cutoff']:%Y-%m-%d}, "
        f"by risk segment ({_segments_rule(r['segments_config'])}): "
        f"{describe_sizes(r['segments'])}. Observed churn rate in the label window after it: "
        f"{_describe_rates(r['segment_table'])}.",
        "",
        *_image_links(r["plots"], ("segments",)),
    ]
    if r["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in r["notes"])]
    return "\n".join(lines) + "\n"


def _image_links(plots: dict[str, Path], names: tuple[str, ...]) -> list[str]:
    """Markdown image links (one line each) to the PNGs of ``names`` that were written."""
    return [f"![{name}]({plots[name].name})" for name in names if name in plots]


def _describe_rates(table: pl.DataFrame) -> str:
    """``high 0.612, medium 0.304, low 0.081`` (``-`` for an empty segment)."""
    return ", ".join(
        f"{seg} {'-' if rate is None else f'{rate:.3f}'}"
        for seg, rate in table.select("segment", "churn_rate").iter_rows()
    )


def _segments_rule(cfg: SegmentsConfig) -> str:
    """``segments.method quantile: high above the 0.9 percentile, medium above 0.7``."""
    if cfg.method == "quantile":
        return (
            f"segments.method quantile: high above the {cfg.high:g} percentile of the training "
            f"scores, medium above {cfg.medium:g}"
        )
    return (
        f"segments.method probability: high at a churn probability of {cfg.high:g} or more, "
        f"medium at {cfg.medium:g} or more"
    )


def _segment_table(
    risk: npt.NDArray[np.float64], churned: npt.NDArray[np.float64], config: LapseConfig
) -> pl.DataFrame:
    """``segment, customers, churn_rate``: the shipped model's users per risk segment at the
    calibration cutoff (ranked within their own scores, the training score distribution)
    and the share of each that churned in the label window after it (null when empty)."""
    segment = assign(risk, config.segments, reference=np.sort(risk))
    rates = (
        pl.DataFrame({"segment": segment.cast(pl.String), "churned": churned})
        .group_by("segment")
        .agg(pl.col("churned").mean().alias("churn_rate"))
    )
    counts = sizes(segment)
    return (
        pl.DataFrame({"segment": list(counts), "customers": list(counts.values())})
        .join(rates, on="segment", how="left", maintain_order="left")
        .cast({"customers": pl.Int64})
    )


def _segment_sizes(
    table: pl.DataFrame,
    config: LapseConfig,
    cutoff: datetime,
    metrics: dict[str, Any],
    notes: list[str],
) -> dict[str, int]:
    """Users per segment (:func:`_segment_table`); into ``metrics["segments"]``, with a
    note when probability cut-offs put most users in one segment."""
    counts = dict(zip(table["segment"].to_list(), table["customers"].to_list(), strict=True))
    total = sum(counts.values())
    metrics["segments"] = {
        "method": config.segments.method,
        "high": config.segments.high,
        "medium": config.segments.medium,
        "cutoff": f"{cutoff:%Y-%m-%d}",
        "counts": counts,
        "shares": {k: round(n / total, 4) if total else 0.0 for k, n in counts.items()},
    }
    crowded = [k for k, n in counts.items() if total and n / total > 0.5 and k != "low"]
    if config.segments.method == "probability" and crowded:
        notes.append(
            f"segments: {counts[crowded[0]] / total:.0%} of the users are {crowded[0]} under "
            "probability cut-offs; segments.method quantile ranks them instead (top 10% high)"
        )
    return counts


def _race_at(
    grid: CutoffGrid,
    frame: pl.DataFrame,
    rfm: pl.DataFrame,
    config: LapseConfig,
    *,
    oracle: pl.DataFrame | None = None,
) -> RaceResult:
    """The race on one cutoff grid: BG/NBD fitted at its validation cutoff."""
    return run_race(
        frame,
        rfm.filter(pl.col("cutoff") == grid.validation),
        training=list(grid.training),
        validation=grid.validation,
        test=grid.test,
        config=config,
        oracle=oracle,
    )


def train(
    events_path: EventSource,
    config: LapseConfig,
    *,
    out_dir: str | Path,
    truth_dir: str | Path | None = None,
    models_dir: str | Path | None = None,
    until: datetime | None = None,
    parallel: bool = False,
    meanwhile: Callable[[], object] | None = None,
) -> TrainResult:
    """Run the churn race, write the report folder, refit and save the bundle.

    Parameters
    ----------
    events_path
        Event file, folder or glob, or the events in memory: a source-shaped
        Polars DataFrame or LazyFrame or pandas DataFrame (read with the
        config's source mapping, like a file).
    out_dir
        Report folder: ``metrics.json``, ``report.md`` (linking the PNG plots), a
        self-contained ``report.html`` (plots embedded) and the PNG plots.
    truth_dir
        ``lapse generate``'s output folder; adds the oracle's AUC.
    models_dir
        Where the bundle goes (``<models.name>.pkl``); default ``models/``
        resolved like every relative config path.
    until
        Train as of this instant: events at or after it are left out, as if
        the data ended there (an out-of-time evaluation holds them back).
    parallel
        Run the replenishment race in a child process beside the churn race
        (:mod:`lapse.train.worker`; on a machine with two or more cores), as
        ``lapse train`` does: the same results, less wall time, more memory
        in all (two processes).
    meanwhile
        Called once while the churn side waits for that child (``lapse train
        --register`` opens the MLflow store there); not called without one.

    Raises
    ------
    LapseError
        Unreadable events, too little history, or a cutoff without both classes.
    """
    worker = start_worker() if parallel and config.replenishment.enabled else None
    try:
        return _train(events_path, config, out_dir, truth_dir, models_dir, until, worker, meanwhile)
    finally:
        if worker is not None:
            worker.close()


def _train(
    events_path: EventSource,
    config: LapseConfig,
    out_dir: str | Path,
    truth_dir: str | Path | None,
    models_dir: str | Path | None,
    until: datetime | None,
    worker: ReplenishmentWorker | None,
    meanwhile: Callable[[], object] | None,
) -> TrainResult:
    out = Path(out_dir)
    events, validation, read_notes, links = _load(events_path, config, until)
    config, grid_notes = _fit_grid(events, config)
    read_notes += grid_notes
    grid = cutoff_grid(events, config)
    horizon = grid.horizon
    race_args = Race(
        events,
        config,
        data_end=grid.data_end,
        out_dir=out,
        truth_dir=Path(truth_dir) if truth_dir is not None else None,
        links=links,
    )
    if worker is not None:
        worker.send(race_args)
    used = [c for c in grid.complete if c >= grid.training[0]]
    frame, rfm = build_frame(
        events,
        used,
        config,
        data_end=grid.data_end,
        attributes=load_attributes(config),
        links=links,
    )
    oracle = _oracle(Path(truth_dir) if truth_dir is not None else None, grid.test)
    if oracle is not None and config.labels.horizon_days != 28:
        warnings.warn(
            "the oracle's probabilities are for 28 days; the label horizon differs", stacklevel=2
        )
    race = _race_at(grid, frame, rfm, config, oracle=oracle)
    notes = [*read_notes, *race.notes]
    if min(race.n_validation, race.n_test) < SMALL_CUTOFF:
        notes.append(
            f"only {race.n_validation:,} validation and {race.n_test:,} test users: "
            "the metrics and the model choice are noisy at this size"
        )
    lgb = race.candidates["lightgbm"].test_metrics["roc_auc"]
    rec = race.candidates["recency"].test_metrics["roc_auc"]
    if lgb < rec:
        notes.append(
            f"LightGBM's test ROC-AUC ({lgb:.4f}) is below plain recency's ({rec:.4f}) on the "
            "out-of-time test"
        )

    # report
    out.mkdir(parents=True, exist_ok=True)
    metrics = race.metrics_json()
    if config.replenishment.enabled:
        metrics["replenishment"] = None  # its place in metrics.json, filled below
    at = len(notes)  # and the place of a "replenishment skipped" note
    replenishment = (
        _skipped(race_args.run, notes, at)
        if worker is None and config.replenishment.enabled
        else None  # the worker's, joined once the churn side is done
    )
    tst = _cutoffs(frame, grid.test)
    sample = tst.sample(n=min(5000, tst.height), seed=config.models.random_state)
    importance = race.scorer.lightgbm.importance(sample)
    drawing = ChurnFigures(
        race.y_test,
        {n: c.test_proba for n, c in race.candidates.items()},
        importance,
        title=f"test cutoff {grid.test:%Y-%m-%d}",
        out_dir=out,
    )
    # the child draws them when its race is done first (a core idle), else they are drawn here
    handed = worker is not None and worker.draw(drawing)
    drawn = None if handed else drawing.draw()
    with atomic_path(out / "importance.csv") as tmp:
        importance.write_csv(tmp)

    # refit the shipped model: same recipe, shifted so the calibration cutoff is the latest
    refit = [c for c in used if c + horizon <= grid.test]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = fit_scorer(
            _cutoffs(frame, refit[0], refit[-1]),  # refit: the first cutoffs of used
            rfm.filter(pl.col("cutoff") == grid.test),
            config,
            recent=_cutoffs(frame, refit[0], max(c for c in used if c < grid.test)),
            label_end=grid.test,
            like=race.scorer,
            selected=race.selected,
        )
    notes += [f"refit: {w.message}" for w in caught]
    y_cal = tst["churned"].cast(pl.Float64).to_numpy()
    s_cal = scorer.score(race.selected, tst)
    calibrator = fit_calibrator(race.selected, s_cal, y_cal, config)
    risk = calibrator.predict(s_cal)
    score_reference = np.sort(risk)
    segment_table = _segment_table(risk, y_cal, config)
    segments = _segment_sizes(segment_table, config, grid.test, metrics, notes)
    segments_figure = segment_figure(
        segment_table, title=f"calibration cutoff {grid.test:%Y-%m-%d}"
    )
    segments_plot = save_figures({"segments": segments_figure}, out)
    if worker is not None:
        if meanwhile is not None:
            meanwhile()
        replenishment = _skipped(worker.result, notes, at)
        if handed:
            drawn = worker.drawn(drawing)
    assert drawn is not None  # drawn here, or by the child it was handed to
    figures = {**drawn[0], "segments": segments_figure}
    plots = {**drawn[1], **segments_plot}
    if replenishment is None:
        metrics.pop("replenishment", None)
    else:
        metrics["replenishment"] = replenishment.metrics
        figures.update(replenishment.figures)
        plots.update(replenishment.plots)
    metrics_path = out / "metrics.json"
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    table = _table(race)
    report = _report_md(
        {
            "events": validation.path,
            "data_end": grid.data_end,
            "kind": config.labels.kind,
            "horizon": config.labels.horizon_days,
            "eligibility": config.labels.eligibility,
            "training": list(grid.training),
            "validation": grid.validation,
            "test": grid.test,
            "n_train": race.n_train,
            "n_validation": race.n_validation,
            "n_test": race.n_test,
            "base_rate": race.test_base_rate,
            "selected": race.selected,
            "why": race.why,
            "calibration": config.models.calibration,
            "table": table,
            "refit": refit,
            "calibration_cutoff": grid.test,
            "segments": segments,
            "segment_table": segment_table,
            "segments_config": config.segments,
            "plots": plots,
            "notes": notes,
        }
    )
    if replenishment is not None:
        report += "\n" + report_section(replenishment)
    report_path = out / "report.md"
    with atomic_path(report_path) as tmp:
        tmp.write_text(report, encoding="utf-8")
    html_path = out / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(report_html(report, out, title="lapse churn report"), encoding="utf-8")

    feature_cols = [c for c in frame.columns if c not in ("churned", "days_to_next")]
    bundle = ChurnBundle(
        name=config.models.name,
        config=config,
        feature_schema={
            c: str(frame.schema[c]) for c in feature_cols if c not in ("user_id", "cutoff")
        },
        training_end=grid.data_end,
        selected=race.selected,
        scorer=scorer,
        calibrator=calibrator,
        score_reference=score_reference,
        metrics=metrics,
        cutoffs={
            "training": list(grid.training),
            "validation": grid.validation,
            "test": grid.test,
            "refit": refit,
            "calibration": grid.test,
            "data_end": grid.data_end,
        },
        created_at=datetime.now(UTC),
        feature_reference=_feature_reference(tst, importance, config),
        training_data=_training_data(validation, events, until),
    )
    if replenishment is not None:
        bundle.extras["replenishment"] = replenishment.model
    models = Path(models_dir) if models_dir is not None else config.resolve("models")
    bundle_path = bundle.save(models / f"{config.models.name}.pkl")
    return TrainResult(
        metrics=metrics,
        table=table,
        selected=race.selected,
        why=race.why,
        test_cutoff=grid.test,
        validation_cutoff=grid.validation,
        training_cutoffs=list(grid.training),
        refit_cutoffs=refit,
        calibration_cutoff=grid.test,
        data_end=grid.data_end,
        n_train=race.n_train,
        n_validation=race.n_validation,
        n_test=race.n_test,
        test_base_rate=race.test_base_rate,
        oracle_auc=race.oracle_auc,
        out_dir=out,
        metrics_path=metrics_path,
        report_path=report_path,
        plots=plots,
        bundle_path=bundle_path,
        notes=notes,
        replenishment=replenishment,
        segments=segments,
        figures=figures,
        html_path=html_path,
    )


def _skipped(
    race: Callable[[], ReplenishmentResult], notes: list[str], at: int
) -> ReplenishmentResult | None:
    """``race()``, or ``None`` with a note (inserted at ``at``) when there are too few
    episodes."""
    try:
        return race()
    except NotEnoughEpisodes as exc:
        notes.insert(at, f"replenishment skipped: {exc}")
        return None


# -- backtest -------------------------------------------------------------------------


def backtest(events_path: EventSource, config: LapseConfig, *, k: int = 6) -> BacktestResult:
    """The race on each of the last ``k`` complete cutoffs as the test cutoff.

    ``events_path`` is a file, folder or glob, or a source-shaped frame, as for
    :func:`train`.

    Each repetition lays its own validation and training cutoffs before its
    test cutoff (same embargo); features are built once for all of them.
    """
    if k < 1:
        raise LapseError(f"--k must be at least 1, got {k}")
    events, _, read_notes, links = _load(events_path, config)
    config, grid_notes = _fit_grid(events, config)
    read_notes += grid_notes
    start, end = data_span(events)
    step = timedelta(days=config.labels.cutoff_every_days)
    latest = end - timedelta(days=config.labels.horizon_days)
    grids = []
    for i in range(k):
        try:
            grids.append(
                grid_for_test(latest - i * step, data_start=start, data_end=end, config=config)
            )
        except LapseError:
            break
    if not grids:
        raise LapseError("the events are too short for even one backtest cutoff")
    notes = read_notes
    if len(grids) < k:
        notes.append(f"only {len(grids)} of {k} cutoffs have enough history")
    # every grid cutoff from the first training one: the hazard LightGBM also learns from
    # those between a grid's training cutoffs and its validation cutoff
    racing = {c for g in grids for c in g.all_race}
    used = sorted({c for g in grids for c in g.complete if min(racing) <= c <= max(racing)})
    frame, rfm = build_frame(
        events, used, config, data_end=end, attributes=load_attributes(config), links=links
    )
    rows: list[dict[str, Any]] = []
    selected: dict[str, str] = {}
    for g in sorted(grids, key=lambda g: g.test):
        race = _race_at(g, frame, rfm, config)
        day = f"{g.test:%Y-%m-%d}"
        selected[day] = race.selected
        notes += [f"{day}: {n}" for n in race.notes]
        for name, cand in race.candidates.items():
            rows.append(
                {
                    "test_cutoff": day,
                    "model": name,
                    "selected": name == race.selected,
                    "n_test": race.n_test,
                    "validation_auc": cand.validation_auc,
                    **cand.test_metrics,
                }
            )
    per_cutoff = pl.DataFrame(rows)
    spread = per_cutoff.group_by("model", maintain_order=True).agg(
        pl.len().alias("n_cutoffs"),
        pl.col("selected").sum().alias("times_selected"),
        *(
            agg
            for m in METRIC_NAMES
            for agg in (
                pl.col(m).mean().alias(f"{m}_mean"),
                pl.col(m).std().alias(f"{m}_std"),
                pl.col(m).min().alias(f"{m}_min"),
                pl.col(m).max().alias(f"{m}_max"),
            )
        ),
    )
    return BacktestResult(per_cutoff=per_cutoff, spread=spread, selected=selected, notes=notes)


def _feature_reference(
    rows: pl.DataFrame, importance: pl.DataFrame, config: LapseConfig
) -> dict[str, npt.NDArray[np.float64]]:
    """Samples of the most important numeric features at the calibration cutoff (drift)."""
    top = importance.sort("mean_abs_shap", descending=True)["feature"].to_list()
    numeric = [f for f in top if f in rows.columns and rows.schema[f].is_numeric()]
    return {
        f: reference_sample(
            rows[f].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
            seed=config.models.random_state,
        )
        for f in numeric[: config.score.drift_features]
    }
