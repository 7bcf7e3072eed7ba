"""Replenishment: time to the next order, raced and shipped next to the churn model.

Layout of one race (``F = replenishment.follow_up_days``)::

    episodes censored at T_v | T_v ... F days ... | T_t ... F days ... | data_end
        fit (selection)        validation episodes   test episodes

Each candidate is fitted on the episodes that started before a cutoff
(censored at it) and scored on the episodes that start in the ``F`` days
after it (censored at the window's end, so validation never sees the test
window). The survival model with the best validation concordance wins (ties
within :data:`TIE_C` go to the best mean calibration at 7/14/30 days); the
test metrics come from refits at the test cutoff, and the shipped model is
refit on every episode up to the end of the data. Scoring
(:func:`predict_open`) predicts the episodes still open at a date,
conditional on the days they have already lasted.

The point estimate of every survival model (``mae_days``, concordance, the
depletion and prompt dates) is the median time to the next order *among the
episodes that reorder within* ``F`` *days* (``horizon=F`` in
:meth:`lapse.modeling.survival.SurvivalModel.predict_median`): ``F`` is the
window the metrics observe a reorder in, and the chance of no reorder at all
is already what ``P(reorder within 7/14/30d)`` expresses, so the point
estimate does not also price it in (the plain median runs into the long
right tail of customers who never reorder). The baselines are point
estimates already and are unaffected.

With identity links (:mod:`lapse.events.identity`) every cutoff sees the ids
of the links observed before it, as the churn features and labels do: the
episodes fitted or scored at a cutoff (censored at it), their covariates and
the consumables are computed on the events resolved as of that cutoff, so an
anonymous visitor's orders join the customer's only at cutoffs after it
identified. The reorder outcomes of the review follow the person (every link).

Review (:func:`predict_outcomes`, :func:`evaluate_model`) scores a shipped model the way it is used:
the episodes open at a later cutoff, conditional on the days they have
lasted, against their next order in the ``F`` days after it (labels from
:func:`lapse.labels.episodes.reorder_outcomes`), with the race's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.datasets import scan_truth
from lapse.events.identity import resolved
from lapse.exceptions import ConvergenceProblem, NotEnoughEpisodes
from lapse.features.episodes_covariates import COVARIATES, Target, order_covariates, purchase_orders
from lapse.labels.cutoffs import data_span
from lapse.labels.episodes import (
    check_target,
    consumable_skus,
    consumable_table,
    episodes,
    open_episodes,
    reorder_outcomes,
)
from lapse.modeling.plots import save_figures
from lapse.modeling.survival import (
    BASELINES,
    CANDIDATES,
    DepletionRule,
    LastGap,
    Predictor,
    SurvivalModel,
)
from lapse.modeling.survival_metrics import HORIZONS, METRIC_NAMES, survival_metrics
from lapse.modeling.survival_plots import survival_figures
from lapse.schema import DAY, utc_cutoff

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "TIE_C",
    "NotEnoughEpisodes",
    "ReplenishmentModel",
    "ReplenishmentResult",
    "consumables_table",
    "evaluate_model",
    "predict_open",
    "predict_outcomes",
    "run_replenishment",
]

FloatArray = npt.NDArray[np.float64]
TIE_C: Final = 0.005
_KEYS: Final = ["user_id", "sku"]
_MIN_OBSERVED: Final = 20


@dataclass
class ReplenishmentModel:
    """The shipped time-to-next-order model and what it needs to score open episodes."""

    selected: str
    model: SurvivalModel
    rule: DepletionRule
    target: Target
    skus: dict[str, float]
    config: LapseConfig
    trained_until: datetime

    def predict_open(self, events: pl.LazyFrame, as_of: datetime) -> pl.DataFrame:
        """One row per open episode as of ``as_of`` (see :func:`predict_open`)."""
        return predict_open(self, events, as_of)


def _no_consumables() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"sku": pl.String, "repeat_buyers": pl.Int64, "units_per_pack": pl.Float64}
    )


@dataclass(frozen=True)
class ReplenishmentResult:
    """What the replenishment race produced (``metrics`` is the ``replenishment`` section).

    ``figures`` holds the report's figures by name (``replenishment_km``,
    ``replenishment_calibration``), ``plots`` their PNGs when an ``out_dir`` was given.
    """

    metrics: dict[str, Any]
    table: pl.DataFrame
    selected: str
    why: str
    model: ReplenishmentModel
    plots: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    consumables: pl.DataFrame = field(default_factory=_no_consumables)
    """The consumables of the race, ranked: ``sku, repeat_buyers, units_per_pack``."""
    figures: dict[str, Figure] = field(default_factory=dict)


# -- frames -----------------------------------------------------------------------------


def _with_covariates(rows: pl.DataFrame, covariates: pl.DataFrame) -> pl.DataFrame:
    return rows.join(
        covariates.rename({"ts": "start"}), on=[*_KEYS, "start"], how="left", maintain_order="left"
    )


def _covariates(
    events: pl.LazyFrame,
    config: LapseConfig,
    until: datetime,
    skus: dict[str, float],
    target: Target,
) -> pl.DataFrame:
    orders = purchase_orders(events, config, until=until, skus=skus, target=target)
    return order_covariates(events, orders, config)


@dataclass
class _AsOf:
    """The race's events with their ids resolved as at a cutoff (identity ``links``), and
    the order covariates of each view; without links one view serves every cutoff.

    Covariates are computed once per view, SKU set and target, up to ``until``.
    """

    events: pl.LazyFrame
    links: pl.DataFrame | None
    config: LapseConfig
    until: datetime
    _views: dict[datetime, pl.LazyFrame] = field(default_factory=dict)
    _covs: dict[tuple[Any, ...], pl.DataFrame] = field(default_factory=dict)

    def _key(self, t: datetime) -> datetime | None:
        return None if self.links is None or self.links.is_empty() else t

    def at(self, t: datetime) -> pl.LazyFrame:
        """The events with the ids of the links observed before ``t``."""
        if self._key(t) is None:
            return self.events
        if t not in self._views:
            self._views[t] = resolved(self.events, self.links, t).collect().lazy()
        return self._views[t]

    def covariates(self, t: datetime, skus: dict[str, float], target: Target) -> pl.DataFrame:
        """The order covariates of :meth:`at` ``t``."""
        key = (self._key(t), tuple(sorted(skus.items())), target)
        if key not in self._covs:
            self._covs[key] = _covariates(self.at(t), self.config, self.until, skus, target)
        return self._covs[key]


def _times(days: float) -> list[float]:
    """The survival-curve grid of a follow-up window: every whole day in it plus the horizons."""
    return sorted({float(t) for t in range(1, int(days))} | {float(h) for h in HORIZONS})


def _score(
    model: Predictor,
    rows: pl.DataFrame,
    elapsed: FloatArray,
    durations: FloatArray,
    observed: npt.NDArray[np.bool_],
    times: list[float],
    horizon: float,
) -> tuple[dict[str, float], FloatArray, FloatArray]:
    """``(metrics, medians, curves)`` of one model on ``rows`` (durations counted from elapsed).

    ``medians`` are the point estimates: the median remaining days among the
    episodes that reorder within ``horizon`` more days (see the module docstring).
    """
    medians = model.predict_median(rows, elapsed, horizon=horizon)
    curves = model.predict_survival(rows, elapsed, times)
    return survival_metrics(durations, observed, medians, curves, times), medians, curves


def _open_frame(model: ReplenishmentModel, events: pl.LazyFrame, t: datetime) -> pl.DataFrame:
    """The episodes open at ``t`` with their covariates (events before ``t`` only)."""
    cfg = model.config
    orders = purchase_orders(events, cfg, until=t, skus=model.skus, target=model.target)
    open_eps = open_episodes(
        events, cfg, as_of=t, skus=model.skus, target=model.target, orders=orders
    )
    starts = open_eps.select(*_KEYS, pl.col("start").alias("ts"))
    return _with_covariates(open_eps, order_covariates(events, orders, cfg, only=starts))


def predict_open(model: ReplenishmentModel, events: pl.LazyFrame, as_of: datetime) -> pl.DataFrame:
    """Predictions for every open episode as of ``as_of`` (events before it only).

    Returns
    -------
    pl.DataFrame
        ``user_id, sku, last_order_ts, days_since_order, median_days_to_next_order``
        (the median days from ``as_of`` to the next order among the customers who
        reorder within ``replenishment.follow_up_days``; whether they reorder at
        all is what the ``p_reorder_*`` columns say),
        ``depletion_date`` (``as_of`` plus the median), ``p_reorder_7d/14d/30d``,
        ``prompt_date`` (depletion minus ``replenishment.lead_time_days``, not before
        ``as_of``) and ``supply_days_left`` (the telemetry rule; null without it).
    """
    cfg = model.config
    t = as_of.astimezone(UTC)
    frame = _open_frame(model, events, t)
    elapsed = frame["elapsed_days"].to_numpy()
    median = model.model.predict_median(frame, elapsed, horizon=cfg.replenishment.follow_up_days)
    surv = model.model.predict_survival(frame, elapsed, HORIZONS)
    supply = frame["supply_days"].cast(pl.Float64) - frame["elapsed_days"]
    lead = timedelta(days=cfg.replenishment.lead_time_days)
    day = pl.duration(microseconds=(pl.col("median_days_to_next_order") * 86_400e6).cast(pl.Int64))
    return frame.select(
        *_KEYS,
        pl.col("start").alias("last_order_ts"),
        pl.col("elapsed_days").alias("days_since_order"),
        pl.Series("median_days_to_next_order", median),
        *(pl.Series(f"p_reorder_{h}d", 1.0 - surv[:, k]) for k, h in enumerate(HORIZONS)),
        supply.clip(0.0).alias("supply_days_left"),
    ).with_columns(
        (pl.lit(t) + day).alias("depletion_date"),
        pl.max_horizontal(pl.lit(t) + day - lead, pl.lit(t)).alias("prompt_date"),
    )


# -- the race ---------------------------------------------------------------------------


@dataclass
class _Stage:
    """Fits at one cutoff and predictions for the episodes open at it."""

    models: dict[str, Predictor]
    open: pl.DataFrame
    metrics: dict[str, dict[str, float]]
    curves: dict[str, FloatArray]
    medians: dict[str, FloatArray]
    notes: list[str]


def _fit_all(
    train: pl.DataFrame,
    config: LapseConfig,
    names: tuple[str, ...],
    start: dict[str, Predictor] | None = None,
) -> tuple[dict[str, Predictor], list[str]]:
    """Fit ``names`` on ``train``; each survival model starts from its fit in ``start``
    (the previous stage's, see :meth:`SurvivalModel.fit`)."""
    t = train["duration_days"].to_numpy()
    e = train["observed"].to_numpy()
    cols = [c for c in COVARIATES if c in train.columns]
    models: dict[str, Predictor] = {}
    notes: list[str] = []
    for name in names:
        if name == "depletion_rule":
            models[name] = DepletionRule().fit(train, t, e)
        elif name == "last_gap":
            models[name] = LastGap().fit(train, t, e)
        else:
            kind = next(k for k in CANDIDATES if k == name)
            prev = (start or {}).get(name)
            try:
                m = SurvivalModel(kind, config.replenishment.penalizer, cols).fit(
                    train, t, e, start=prev if isinstance(prev, SurvivalModel) else None
                )
            except ConvergenceProblem as exc:
                notes.append(str(exc))
                continue
            notes += m.fit_warnings_
            models[name] = m
    return models, notes


def _stage(
    view: _AsOf,
    config: LapseConfig,
    *,
    cutoff: datetime,
    until: datetime,
    skus: dict[str, float],
    target: Target,
    names: tuple[str, ...],
    times: list[float],
    start: dict[str, Predictor] | None = None,
) -> _Stage:
    """Fit on the episodes before ``cutoff`` (ids as of it), score those starting in
    ``[cutoff, until)`` (ids as of ``until``, censored there)."""
    train = _with_covariates(
        episodes(view.at(cutoff), config, cutoff=cutoff, skus=skus, target=target),
        view.covariates(cutoff, skus, target),
    )
    n_obs = int(train["observed"].sum())
    if n_obs < _MIN_OBSERVED:
        raise NotEnoughEpisodes(
            f"only {n_obs} observed reorders before {cutoff:%Y-%m-%d} (need {_MIN_OBSERVED}); "
            "supply more history, or set replenishment.target: any"
        )
    models, notes = _fit_all(train, config, names, start)
    rows = _with_covariates(
        episodes(view.at(until), config, cutoff=until, skus=skus, target=target).filter(
            pl.col("start") >= cutoff
        ),
        view.covariates(until, skus, target),
    )
    if rows.height == 0 or not rows["observed"].any():
        raise NotEnoughEpisodes(
            f"no episode starting in [{cutoff:%Y-%m-%d}, {until:%Y-%m-%d}) has an observed "
            "reorder by the end of that window; nothing to evaluate"
        )
    d = rows["duration_days"].to_numpy()
    e = rows["observed"].to_numpy()
    a = np.zeros(rows.height)
    metrics, curves, medians = {}, {}, {}
    for name, m in models.items():
        metrics[name], medians[name], curves[name] = _score(
            m, rows, a, d, e, times, config.replenishment.follow_up_days
        )
    return _Stage(models, rows, metrics, curves, medians, notes)


def select(validation: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Best validation concordance; within :data:`TIE_C`, the best mean calibration."""
    ranked: dict[str, dict[str, float]] = {
        n: m for n, m in validation.items() if n in CANDIDATES and np.isfinite(m["concordance"])
    }
    if not ranked:
        raise NotEnoughEpisodes("no survival model could be fitted and scored on validation")
    best = max(ranked, key=lambda n: ranked[n]["concordance"])

    def cal(n: str) -> float:
        return float(np.mean([ranked[n][f"cal_{h}d"] for h in HORIZONS]))

    close = [n for n in ranked if ranked[n]["concordance"] >= ranked[best]["concordance"] - TIE_C]
    winner = min(close, key=cal)
    listing = ", ".join(f"{n} C={m['concordance']:.4f} cal={cal(n):.4f}" for n, m in ranked.items())
    if winner == best:
        why = f"{winner} has the best validation concordance ({listing})"
    else:
        why = (
            f"{winner} is within {TIE_C} concordance of {best} on validation and better "
            f"calibrated at 7/14/30 days ({listing})"
        )
    return winner, why


def _truth_error(truth_dir: Path, stage: _Stage, target: Target) -> dict[str, Any] | None:
    if target != "sku":
        return None
    truth = (
        scan_truth(truth_dir, "truth")
        .select("user_id", "depletions")
        .explode("depletions")
        .unnest("depletions")
        .drop_nulls("depletion_date")
        .select("user_id", "sku", pl.col("order_ts").alias("start"), "depletion_date")
        .collect()
    )
    rows = stage.open.with_row_index("_i").join(truth, on=[*_KEYS, "start"], how="inner")
    if rows.height == 0:
        return None
    idx = rows["_i"].to_numpy()
    start_us = rows["start"].dt.epoch("us").to_numpy().astype(np.float64)
    true_day = rows["depletion_date"].cast(pl.Int64).to_numpy().astype(np.float64)
    out: dict[str, Any] = {"n": int(rows.height)}
    for name, med in stage.medians.items():
        # the predicted depletion date is the order time plus the median, as a UTC date
        pred_day = np.floor((start_us + med[idx] * 86_400e6) / 86_400e6)
        out[name] = {"mae_days": float(np.mean(np.abs(pred_day - true_day)))}
    return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def run_replenishment(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    data_end: datetime,
    out_dir: Path | None = None,
    truth_dir: Path | None = None,
    links: pl.DataFrame | None = None,
) -> ReplenishmentResult:
    """Race the survival models and baselines, write the plots, refit the shipped model.

    Parameters
    ----------
    events
        Canonical events (collected once by the caller is best).
    data_end
        End of the observed data (exclusive, midnight).
    out_dir
        Where the PNG plots go; ``None`` writes none (the result holds the
        figures either way).
    truth_dir
        ``lapse generate``'s folder: adds the error against the true depletion dates.
    links
        Identity links (:mod:`lapse.events.identity`): each cutoff's episodes,
        covariates and consumables use the ids of the links observed before it.

    Raises
    ------
    NotEnoughEpisodes
        Too few orders or too little history for the two follow-up windows.
    """
    rep = config.replenishment
    notes: list[str] = []
    follow = timedelta(days=rep.follow_up_days)
    test, validation = data_end - follow, data_end - 2 * follow
    target = check_target(rep.target)
    skus: dict[str, float] = {}
    ranked = _no_consumables()
    view = _AsOf(events, links, config, data_end)
    if target == "sku":
        ranked = consumable_table(view.at(validation), config, until=validation)
        skus = dict(zip(ranked["sku"].to_list(), ranked["units_per_pack"].to_list(), strict=True))
        if not skus:
            notes.append(
                "no SKU has replenishment.min_repeat_buyers repeat buyers before the validation "
                "cutoff: the target is the next order of anything (target: any)"
            )
            target = "any"
    names = (*CANDIDATES, *BASELINES)
    times = _times(rep.follow_up_days)
    kw: dict[str, Any] = {"skus": skus, "target": target, "names": names, "times": times}
    val = _stage(view, config, cutoff=validation, until=test, **kw)
    selected, why = select(val.metrics)
    tst = _stage(view, config, cutoff=test, until=data_end, start=val.models, **kw)
    notes += [f"validation fit: {n}" for n in val.notes] + [f"test fit: {n}" for n in tst.notes]
    gap = tst.models["last_gap"]
    if isinstance(gap, LastGap):
        notes.append(
            f"last_gap used the population median gap for {gap.n_fallback(tst.open)} of "
            f"{tst.open.height} test episodes; depletion_rule had no telemetry rate for "
            f"{tst.models['depletion_rule'].n_fallback(tst.open)} and fell back to last_gap"  # type: ignore[attr-defined]
        )
    models_json: dict[str, Any] = {}
    for name in names:
        m = tst.metrics.get(name)
        models_json[name] = {
            k: (None if m is None else (int(m[k]) if k == "n" else _finite(m[k])))
            for k in METRIC_NAMES
        }
    metrics: dict[str, Any] = {
        "models": models_json,
        "selected": selected,
        "target": target,
        "consumables": skus,
        "validation_cutoff": f"{validation:%Y-%m-%d}",
        "test_cutoff": f"{test:%Y-%m-%d}",
        "follow_up_days": rep.follow_up_days,
        "validation_concordance": {n: _finite(m["concordance"]) for n, m in val.metrics.items()},
        "calibration": {
            n: {f"{h}d": _finite(m[f"cal_{h}d"]) for h in HORIZONS} for n, m in tst.metrics.items()
        },
    }
    if truth_dir is not None:
        truth = _truth_error(Path(truth_dir), tst, target)
        if truth is not None:
            metrics["true_depletion"] = truth
    table = pl.DataFrame(
        [
            {"model": n, **{k: models_json[n][k] for k in METRIC_NAMES}, "selected": n == selected}
            for n in names
        ],
        schema_overrides={k: pl.Float64 for k in METRIC_NAMES if k != "n"},
    )

    keep = [n for n in (selected, *BASELINES) if n in tst.curves]
    figures = survival_figures(
        tst.open["duration_days"].to_numpy(),
        tst.open["observed"].to_numpy(),
        times,
        {n: tst.curves[n] for n in keep},
        {n: tst.medians[n] for n in keep},
        selected,
        title=f"test cutoff {test:%Y-%m-%d}",
    )
    plots = save_figures(figures, out_dir) if out_dir is not None else {}
    # the shipped model: the winner refit on every episode up to the end of the data
    latest = view.at(data_end)
    ship_skus = consumable_skus(latest, config, until=data_end) if target == "sku" else skus
    everything = _with_covariates(
        episodes(latest, config, cutoff=data_end, skus=ship_skus, target=target),
        view.covariates(data_end, ship_skus, target),
    )
    shipped, fit_notes = _fit_all(everything, config, (selected, "depletion_rule"), tst.models)
    notes += [f"shipped fit: {n}" for n in fit_notes]
    model = shipped.get(selected)
    rule = shipped["depletion_rule"]
    if not isinstance(model, SurvivalModel) or not isinstance(rule, DepletionRule):
        raise NotEnoughEpisodes(f"the shipped {selected} refit failed: {'; '.join(fit_notes)}")
    return ReplenishmentResult(
        metrics=metrics,
        table=table,
        selected=selected,
        why=why,
        model=ReplenishmentModel(
            selected=selected,
            model=model,
            rule=rule,
            target=target,
            skus=ship_skus,
            config=config,
            trained_until=data_end,
        ),
        plots=plots,
        notes=notes,
        consumables=ranked,
        figures=figures,
    )


def _outcome_rows(
    model: ReplenishmentModel,
    events: pl.LazyFrame,
    cutoff: datetime,
    config: LapseConfig,
    data_end: datetime | None,
    links: pl.DataFrame | None,
) -> tuple[pl.DataFrame, float]:
    """``(rows, days)``: the episodes open at ``cutoff`` (ids as of it) with their next
    order in the follow-up window of ``days`` (see :func:`evaluate_model`)."""
    t = utc_cutoff(cutoff, "cutoff")
    end = data_span(events)[1] if data_end is None else utc_cutoff(data_end, "data_end")
    until = min(t + timedelta(days=config.replenishment.follow_up_days), end)
    days = (until - t) / DAY
    if days <= 0:
        raise NotEnoughEpisodes(
            f"the events end {end:%Y-%m-%d}, not after the cutoff {t:%Y-%m-%d}: no follow-up"
        )
    known = resolved(events, links, t)
    rows = reorder_outcomes(
        events,
        _open_frame(model, known, t),
        config,
        as_of=t,
        until=until,
        skus=model.skus,
        target=model.target,
        links=links,
    )
    if rows.height == 0 or not rows["observed"].any():
        raise NotEnoughEpisodes(
            f"{rows.height} episodes open at {t:%Y-%m-%d} and none reordered by "
            f"{until:%Y-%m-%d}; nothing to evaluate"
        )
    return rows, float(days)


def evaluate_model(
    model: ReplenishmentModel,
    events: pl.LazyFrame,
    cutoff: datetime,
    config: LapseConfig,
    *,
    data_end: datetime | None = None,
    links: pl.DataFrame | None = None,
) -> dict[str, float]:
    """The shipped model's metrics at a cutoff it has not seen.

    The rows are what :func:`predict_open` would score at ``cutoff``: the open
    episode of each consumable SKU the model knows (``model.skus``, its target
    and its config), predicted conditional on the days already lasted from
    events before ``cutoff``. Their outcome is the next order in the
    ``config.replenishment.follow_up_days`` after ``cutoff`` (from
    :func:`lapse.labels.episodes.reorder_outcomes` under ``config``, so two
    models share one definition of a reorder), censored at the window's end
    or at ``data_end`` when the data stops sooner. Durations are the days
    after ``cutoff``; the metrics are the race's (:func:`survival_metrics`), on
    the point estimate :func:`predict_open` ships (horizon: the model's own
    ``replenishment.follow_up_days``).

    Parameters
    ----------
    data_end
        End of the observed data (exclusive); ``None`` reads it from ``events``.
    links
        Identity links: the open episodes get the ids of the links before
        ``cutoff``, their next order follows the person (every link).

    Returns
    -------
    dict[str, float]
        Every key of :data:`METRIC_NAMES` (``concordance``, ``mae_days``, ``n``, ...),
        ``cal_{h}d`` and ``follow_up_days`` (the window actually observed).

    Raises
    ------
    NotEnoughEpisodes
        No data after ``cutoff``, no open episode at it, or no reorder in the window.
    """
    rows, days = _outcome_rows(model, events, cutoff, config, data_end, links)
    metrics, _, _ = _score(
        model.model,
        rows,
        rows["elapsed_days"].to_numpy(),
        rows["residual_days"].to_numpy(),
        rows["observed"].to_numpy(),
        _times(days),
        model.config.replenishment.follow_up_days,
    )
    return {**metrics, "follow_up_days": days}


def predict_outcomes(
    model: ReplenishmentModel,
    events: pl.LazyFrame,
    cutoff: datetime,
    config: LapseConfig,
    *,
    data_end: datetime | None = None,
    links: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The rows of :func:`evaluate_model` (``links`` as there), one per open episode, with
    the model's prediction (what ``lapse review`` pairs across two models).

    Returns
    -------
    pl.DataFrame
        ``user_id, sku, days`` (to the reorder, or to the end of the follow-up),
        ``observed`` (the reorder was seen), ``predicted_days`` (the point
        estimate :func:`predict_open` ships) and ``follow_up_days``.

    Raises
    ------
    NotEnoughEpisodes
        As :func:`evaluate_model`.
    """
    rows, days = _outcome_rows(model, events, cutoff, config, data_end, links)
    predicted = model.model.predict_median(
        rows, rows["elapsed_days"].to_numpy(), horizon=model.config.replenishment.follow_up_days
    )
    return rows.select(
        *_KEYS,
        pl.col("residual_days").cast(pl.Float64).alias("days"),
        "observed",
        pl.Series("predicted_days", predicted, dtype=pl.Float64),
        pl.lit(days).alias("follow_up_days"),
    )


#: Consumables listed in the report; the rest are counted.
CONSUMABLES_SHOWN: Final = 10


def consumables_table(ranked: pl.DataFrame, shown: int = CONSUMABLES_SHOWN) -> list[str]:
    """Markdown lines: the top ``shown`` consumables by repeat buyers, then "and N more"."""
    if ranked.is_empty():
        return []
    lines = [
        "",
        f"Consumables, most repeat buyers first (before the validation cutoff; "
        f"{ranked.height} in all):",
        "",
        "| SKU | repeat buyers | units per pack |",
        "|---|---|---|",
    ]
    for sku, buyers, units in ranked.head(shown).iter_rows():
        cell = str(sku).replace("|", "\\|")
        lines.append(f"| {cell} | {buyers:,} | {units:g} |")
    if ranked.height > shown:
        lines += ["", f"and {ranked.height - shown:,} more."]
    return lines


def report_section(result: ReplenishmentResult) -> str:
    """The replenishment part of ``report.md``."""
    m = result.metrics
    lines = [
        "## Replenishment",
        "",
        f"- target: {m['target']}"
        + (f" ({len(m['consumables'])} consumables, below)" if m["consumables"] else "")
        + f"; validation cutoff {m['validation_cutoff']}, test cutoff {m['test_cutoff']}, "
        f"episodes starting in the {m['follow_up_days']} days after each are scored, "
        "censored at the window's end",
        f"- selected: **{result.selected}**. {result.why}.",
        "",
        "| model | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for row in result.table.iter_rows(named=True):
        cells = [row["model"] + (" *" if row["selected"] else "")]
        for k in METRIC_NAMES:
            v = row[k]
            cells.append("" if v is None else (f"{int(v)}" if k == "n" else f"{v:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += consumables_table(result.consumables)
    if result.plots:  # the PNGs sit next to report.md
        lines += ["", *(f"![{name}]({path.name})" for name, path in result.plots.items())]
    truth = m.get("true_depletion")
    if truth:
        errs = ", ".join(
            f"{n} {v['mae_days']:.2f}" for n, v in truth.items() if isinstance(v, dict)
        )
        lines += ["", f"Error against the true depletion dates (MAE days, n={truth['n']}): {errs}."]
    if result.notes:
        lines += ["", *(f"- {n}" for n in result.notes)]
    return "\n".join(lines) + "\n"
