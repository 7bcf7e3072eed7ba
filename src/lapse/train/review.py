"""The review: champion vs challenger on the same users at the same recent cutoffs.

:func:`review` loads both registered versions, scores them on the latest
complete cutoffs after both models' label windows (up to
``registry.review_cutoffs`` of them, every ``labels.cutoff_every_days``,
pooled so that a small shop still has enough rows), and compares them:

- churn: ROC-AUC, PR-AUC, Brier, ECE and top-decile lift of the users
  eligible under both models' configs, labelled under the review's config;
  with identity links, ids as of each cutoff and labels following the person,
  as in training (:mod:`lapse.events.identity`);
- replenishment, when both versions carry a model: concordance and MAE days of
  the episodes open at each cutoff under both models' consumables, followed for
  ``replenishment.follow_up_days`` or to the end of the events.

Every primary metric (``registry.primary_metrics``) gets a paired bootstrap
interval of its difference and the verdict follows the rule of
:mod:`lapse.modeling.compare` (promote / refuse / inconclusive, and which rule
decided). The comparison is logged as an MLflow run through
:mod:`lapse.registry`; this module never imports mlflow.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

from lapse.config import LapseConfig
from lapse.events import load_attributes, read_events, read_links
from lapse.events.identity import resolved
from lapse.exceptions import LapseError, NotEnoughEpisodes, WriteFailed
from lapse.labels import churn_labels, data_span
from lapse.modeling.bundle import ChurnBundle
from lapse.modeling.compare import (
    LEVEL,
    LOWER_IS_BETTER,
    METRICS,
    RESAMPLES,
    SEED,
    Interval,
    Paired,
    Verdict,
    decide,
    metric_value,
    paired_interval,
)
from lapse.modeling.plots import write_plots
from lapse.registry import CHALLENGER, CHAMPION, ReviewPair, log_review, review_pair
from lapse.schema import run_day
from lapse.train.replenishment import ReplenishmentModel, predict_outcomes

__all__ = ["REVIEW_METRICS", "ReviewResult", "review", "review_cutoffs"]

#: The metrics the review table shows per task (a primary metric is added when missing).
REVIEW_METRICS: Final = {
    "churn": ("roc_auc", "pr_auc", "brier", "ece", "top_decile_lift"),
    "replenishment": ("concordance", "mae_days"),
}
_SIDES: Final = (CHAMPION, CHALLENGER)


@dataclass(frozen=True)
class ReviewResult:
    """Challenger vs champion on the same users at the same cutoffs.

    ``table``: ``task, metric, champion, challenger, delta, low, high, better``
    (``higher`` or ``lower``), ``primary``; ``low``/``high`` bound the
    :data:`lapse.modeling.compare.LEVEL` bootstrap interval of ``delta`` (primary
    metrics only, else null). ``verdict`` is ``promote``, ``refuse`` or
    ``inconclusive``; ``rule`` says which rule decided, ``reasons`` one line per
    primary metric.
    """

    name: str
    champion: int
    challenger: int
    cutoffs: list[datetime]
    n_users: int
    n_rows: int
    churn_rate: float
    table: pl.DataFrame
    verdict: Verdict
    rule: str
    reasons: list[str]
    run_id: str
    plots: dict[str, Path]
    notes: list[str] = field(default_factory=list)

    @property
    def cutoff(self) -> datetime:
        """The latest review cutoff."""
        return self.cutoffs[-1]


def _label_end(bundle: ChurnBundle) -> datetime:
    """End of the last label window the bundle was fitted or calibrated on."""
    end = bundle.cutoffs.get("data_end", bundle.training_end)
    return end if isinstance(end, datetime) else bundle.training_end


def review_cutoffs(
    events: pl.LazyFrame, config: LapseConfig, bundles: tuple[ChurnBundle, ...]
) -> list[datetime]:
    """The review's cutoffs, oldest first: the latest complete one and those every
    ``labels.cutoff_every_days`` before it, up to ``registry.review_cutoffs``, none
    before the end of either model's last label window.

    Raises
    ------
    LapseError
        The events do not reach a complete label window after both models'.
    """
    _, data_end = data_span(events)
    horizon = timedelta(days=config.labels.horizon_days)
    latest = data_end - horizon
    seen = max(_label_end(b) for b in bundles)
    if latest < seen:
        raise LapseError(
            f"the events end {run_day(data_end)}, so the latest cutoff with a complete "
            f"{config.labels.horizon_days}-day label window is {run_day(latest)}, but the newer "
            f"model saw labels up to {run_day(seen)}; review on events that reach at least "
            f"{run_day(seen + horizon)}"
        )
    step = timedelta(days=config.labels.cutoff_every_days)
    pooled = (latest - k * step for k in range(config.registry.review_cutoffs))
    return sorted(c for c in pooled if c >= seen)


def _churn_rows(
    pair: ReviewPair,
    events: pl.LazyFrame,
    cutoffs: list[datetime],
    config: LapseConfig,
    links: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, list[str]]:
    """``user_id, cutoff, churned, champion, challenger`` of the users eligible under both
    (ids as of each cutoff, labels following the person, as in training)."""
    labels = churn_labels(events, cutoffs, config, data_end=data_span(events)[1], links=links)
    attributes = [load_attributes(bundle.config) for bundle in pair.bundles]
    scores: dict[str, list[pl.DataFrame]] = {side: [] for side in _SIDES}
    for cutoff in cutoffs:
        known = resolved(events, links, cutoff)  # once per cutoff, for both models
        for bundle, side, attrs in zip(pair.bundles, _SIDES, attributes, strict=True):
            rows = bundle.prepare(known, cutoff, attributes=attrs)
            bundle.check_schema(rows)
            scores[side].append(
                rows.select("user_id", "cutoff").with_columns(
                    pl.Series(side, bundle.predict_proba(rows), dtype=pl.Float64)
                )
            )
    scored = labels
    for side in _SIDES:
        scored = scored.join(pl.concat(scores[side]), on=["user_id", "cutoff"], how="inner")
    notes = []
    if scored.height < labels.height:
        notes.append(
            f"{labels.height - scored.height} of {labels.height} labelled user-cutoffs are not "
            "eligible under both models' configs and were left out"
        )
    if scored.height == 0:
        days = ", ".join(str(run_day(c)) for c in cutoffs)
        raise LapseError(f"no user at the review cutoffs {days} is eligible under both models")
    return scored.sort("cutoff", "user_id"), notes


def _replenishment_rows(
    pair: ReviewPair,
    events: pl.LazyFrame,
    cutoffs: list[datetime],
    config: LapseConfig,
    links: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame | None, str]:
    """``user_id, sku, cutoff, days, observed, champion, challenger`` of the episodes open
    under both models' consumables (or None), and a note for the review."""
    found = [b.extras.get("replenishment") for b in pair.bundles]
    missing = [
        s for s, m in zip(_SIDES, found, strict=True) if not isinstance(m, ReplenishmentModel)
    ]
    if missing:
        return None, (
            f"replenishment was not compared: the {' and the '.join(missing)} "
            f"{'carries' if len(missing) == 1 else 'carry'} no replenishment model (trained "
            "with replenishment disabled, or its race was skipped)"
        )
    models = [m for m in found if isinstance(m, ReplenishmentModel)]
    frames: list[pl.DataFrame] = []
    skipped: list[str] = []
    for cutoff in cutoffs:
        try:
            sides = [
                predict_outcomes(m, events, cutoff, config, links=links).rename(
                    {"predicted_days": side}
                )
                for m, side in zip(models, _SIDES, strict=True)
            ]
        except NotEnoughEpisodes as exc:
            skipped.append(f"{run_day(cutoff)}: {exc}")
            continue
        keys = ["user_id", "sku", "days", "observed", "follow_up_days"]
        frames.append(
            sides[0]
            .join(sides[1], on=keys, how="inner")
            .with_columns(pl.lit(cutoff).cast(pl.Datetime("us", "UTC")).alias("cutoff"))
        )
    rows = pl.concat(frames) if frames else None
    if rows is None or rows.height == 0 or not rows["observed"].any():
        reason = "; ".join(skipped) or "no episode is open under both models' consumables"
        return None, f"replenishment was not compared: {reason}"
    follow = rows["follow_up_days"].unique().sort().to_list()
    note = (
        f"replenishment: {rows.height} episodes open at {rows['cutoff'].n_unique()} cutoff(s) "
        f"under both models' consumables, followed for {', '.join(f'{d:g}' for d in follow)} "
        f"days ({int(rows['observed'].sum())} reordered)"
    )
    if skipped:
        note += "; not compared at " + "; ".join(skipped)
    return rows, note


def _paired(task: str, rows: pl.DataFrame) -> Paired:
    users = rows.select(pl.col("user_id").rank("dense") - 1).to_series().to_numpy()
    if task == "churn":
        truth, observed = rows["churned"].cast(pl.Float64).to_numpy(), None
    else:
        truth, observed = rows["days"].to_numpy(), rows["observed"].to_numpy()
    return Paired(
        truth=truth,
        champion=rows[CHAMPION].to_numpy(),
        challenger=rows[CHALLENGER].to_numpy(),
        users=users.astype(np.int64),
        observed=observed,
    )


def _compare(
    found: dict[str, pl.DataFrame], config: LapseConfig
) -> tuple[pl.DataFrame, dict[str, Interval], list[str]]:
    """The table, the primary metrics' intervals, and notes on primaries not compared."""
    primary = dict(config.registry.primary_metrics)
    rows: list[dict[str, Any]] = []
    intervals: dict[str, Interval] = {}
    notes: list[str] = []
    for task, frame in found.items():
        paired = _paired(task, frame)
        wanted = list(REVIEW_METRICS.get(task, ()))
        if primary.get(task) in METRICS[task] and primary[task] not in wanted:
            wanted.append(primary[task])
        for metric in wanted:
            a = metric_value(task, metric, paired, CHAMPION)
            b = metric_value(task, metric, paired, CHALLENGER)
            low = high = None
            if primary.get(task) == metric:
                low, high = paired_interval(task, metric, paired)
                intervals[f"{task}.{metric}"] = Interval(
                    key=f"{task}.{metric}",
                    delta=b - a,
                    low=low,
                    high=high,
                    users=int(paired.users.max()) + 1,
                    cutoffs=frame["cutoff"].n_unique(),
                )
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    CHAMPION: a,
                    CHALLENGER: b,
                    "delta": b - a,
                    "low": low,
                    "high": high,
                    "better": "lower" if metric in LOWER_IS_BETTER else "higher",
                    "primary": primary.get(task) == metric,
                }
            )
    for task, metric in primary.items():
        key = f"{task}.{metric}"
        if key in intervals:
            continue
        if task in METRICS and metric not in METRICS[task]:
            known = ", ".join(f"{task}.{m}" for m in METRICS[task])
            notes.append(f"{key} was not compared: the review measures {known}")
        else:
            notes.append(f"{key} was not compared (not measured for both versions)")
    schema = {"low": pl.Float64, "high": pl.Float64}
    return pl.DataFrame(rows, schema_overrides=schema), intervals, notes


def review(
    events_path: str | Path,
    config: LapseConfig,
    *,
    name: str | None = None,
    out_dir: str | Path | None = None,
) -> ReviewResult:
    """Score ``challenger`` and ``champion`` on the same users and cutoffs; decide; log it.

    The comparison is an MLflow run named ``review NAME vCHALLENGER vs
    vCHAMPION: VERDICT``, tagged with both versions and the verdict, holding the
    table (``review.csv``, ``review.md``, also its description) and overlaid ROC
    and calibration plots of the pooled churn rows (also written to ``out_dir``
    when given). :func:`lapse.registry.promote` reads it back.

    Raises
    ------
    LapseError
        A missing model or alias, only one version to compare, or events that do
        not reach past both models' label windows.
    WriteFailed
        ``out_dir`` cannot be written.
    """
    pair = review_pair(config, name)
    events = read_events(events_path, config).collect().lazy()
    links = read_links(events_path, config)
    cutoffs = review_cutoffs(events, config, pair.bundles)
    churn, notes = _churn_rows(pair, events, cutoffs, config, links)
    found = {"churn": churn}
    replen, replen_note = _replenishment_rows(pair, events, cutoffs, config, links)
    if replen is not None:
        found["replenishment"] = replen
    notes.append(replen_note)
    if len(cutoffs) < config.registry.review_cutoffs:
        notes.append(
            f"{len(cutoffs)} of registry.review_cutoffs {config.registry.review_cutoffs} "
            "cutoffs pooled: the others would fall inside a model's label window"
        )
    table, intervals, missing = _compare(found, config)
    notes += missing
    if not intervals:
        raise LapseError(
            "no primary metric could be compared ("
            + "; ".join(missing)
            + "); set registry.primary_metrics to metrics both versions measure"
        )
    decision = decide(intervals, config.registry.tolerance)
    y = churn["churned"].cast(pl.Float64).to_numpy()
    result = ReviewResult(
        name=pair.name,
        champion=pair.champion,
        challenger=pair.challenger,
        cutoffs=cutoffs,
        n_users=churn["user_id"].n_unique(),
        n_rows=churn.height,
        churn_rate=float(y.mean()),
        table=table,
        verdict=decision.verdict,
        rule=decision.rule,
        reasons=decision.lines,
        run_id="",
        plots={},
        notes=notes,
    )
    with _folder(out_dir) as folder:
        try:
            plots = write_plots(
                folder,
                y,
                {
                    f"champion v{pair.champion}": churn[CHAMPION].to_numpy(),
                    f"challenger v{pair.challenger}": churn[CHALLENGER].to_numpy(),
                },
                title=f"review cutoffs {run_day(cutoffs[0])} to {run_day(cutoffs[-1])}",
            )
            table.write_csv(folder / "review.csv")
            markdown = review_markdown(result)
            (folder / "review.md").write_text(markdown, encoding="utf-8")
        except OSError as exc:
            raise WriteFailed.from_os_error(exc.filename or folder, exc) from None
        run_id = log_review(
            config,
            pair,
            verdict=decision.verdict,
            cutoffs=cutoffs,
            intervals=intervals,
            table=table,
            params={
                "cutoffs": ",".join(str(run_day(c)) for c in cutoffs),
                "n_users": str(result.n_users),
                "n_rows": str(result.n_rows),
                "tolerance": str(config.registry.tolerance),
                "primary_metrics": ",".join(
                    f"{t}.{m}" for t, m in config.registry.primary_metrics.items()
                ),
                "bootstrap": f"{RESAMPLES} paired resamples of users, seed {SEED}, "
                f"{LEVEL:.0%} percentile interval",
                "rule": decision.rule[:500],
                "events": str(events_path),
            },
            description=markdown,
            files=[*plots.values(), folder / "review.csv", folder / "review.md"],
            events_path=events_path,
        )
    return replace(result, run_id=run_id, plots=plots if out_dir is not None else {})


@contextlib.contextmanager
def _folder(out_dir: str | Path | None) -> Iterator[Path]:
    """``out_dir`` (created), or a temporary folder removed afterwards."""
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="lapse-review-") as tmp:
            yield Path(tmp)
        return
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed.from_os_error(folder, exc) from None
    yield folder


def _interval(row: dict[str, Any]) -> str:
    if row["low"] is None:
        return ""
    return f"{row['low']:+.4f} to {row['high']:+.4f}"


def review_markdown(result: ReviewResult) -> str:
    """The review as Markdown: the table with the intervals, the verdict, the rule, notes."""
    lines = [
        f"# Review of {result.name}: challenger v{result.challenger} vs champion "
        f"v{result.champion}",
        "",
        f"Cutoffs {', '.join(str(run_day(c)) for c in result.cutoffs)}: "
        f"{result.n_users} users "
        f"({result.n_rows} user-cutoffs), churn rate {result.churn_rate:.3f}.",
        "",
        f"| task | metric | champion | challenger | delta | {LEVEL:.0%} interval | better "
        "| primary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.table.iter_rows(named=True):
        lines.append(
            f"| {r['task']} | {r['metric']} | {r[CHAMPION]:.4f} | {r[CHALLENGER]:.4f} | "
            f"{r['delta']:+.4f} | {_interval(r)} | {r['better']} | "
            f"{'yes' if r['primary'] else ''} |"
        )
    lines += [
        "",
        f"Verdict: **{result.verdict}**. Rule: {result.rule}.",
        "",
        *(f"- {line}" for line in result.reasons),
        *(f"- {n}" for n in result.notes),
        "",
        f"Intervals: {RESAMPLES} paired bootstrap resamples of the users (both models on "
        f"the same draw, a user with all their rows), seed {SEED}, the central {LEVEL:.0%} "
        "of the differences.",
    ]
    return "\n".join(lines) + "\n"
