"""The churn model race on one cutoff grid: fit, calibrate on validation, test.

Candidates, simplest first: ``recency`` (days since the last qualifying
activity), ``rules`` (fired churn triggers, ties by days since last usage),
``bgnbd`` and ``lightgbm`` (plus ``lightgbm_stacked`` and ``lightgbm_hazard``
when configured). The winner has the best validation ROC-AUC; a simpler model
within :data:`TIE_AUC` of the best wins the tie. Every candidate is calibrated
on the validation cutoff with the same method and evaluated on the test cutoff.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import FitWarning, LapseError
from lapse.modeling.bgnbd import BGNBD, btyd_arrays
from lapse.modeling.hazard import DAYS_TO_NEXT, LightGBMHazard
from lapse.modeling.lgbm import LightGBMChurn, model_columns
from lapse.modeling.metrics import Calibrator, binary_metrics
from lapse.modeling.rules import recency_days, rules_score

__all__ = [
    "COMPLEXITY",
    "TIE_AUC",
    "CandidateResult",
    "RaceResult",
    "RaceScorer",
    "degenerate_baselines",
    "run_race",
    "select",
]

FloatArray = npt.NDArray[np.float64]

COMPLEXITY: Final = (
    "recency",
    "rules",
    "bgnbd",
    "lightgbm",
    "lightgbm_stacked",
    "lightgbm_hazard",
)
TIE_AUC: Final = 0.001
_PROBABILISTIC: Final = frozenset({"bgnbd", "lightgbm", "lightgbm_stacked", "lightgbm_hazard"})


@dataclass
class RaceScorer:
    """Raw risk scores (higher = riskier) of every candidate from feature rows.

    Holds the fitted models; ``score(name, frame)`` works on any cutoff's rows.
    """

    config: LapseConfig
    lightgbm: LightGBMChurn
    bgnbd: BGNBD
    stacked: LightGBMChurn | None = None
    hazard: LightGBMHazard | None = None

    @property
    def names(self) -> list[str]:
        names = ["recency", "rules", "bgnbd", "lightgbm"]
        names += ["lightgbm_stacked"] if self.stacked is not None else []
        return names + (["lightgbm_hazard"] if self.hazard is not None else [])

    def _recency(self, frame: pl.DataFrame) -> FloatArray:
        days = recency_days(frame, self.config)
        # never active: riskier than anyone seen (the feature windows cap at a few hundred days)
        out: FloatArray = np.log1p(np.where(np.isfinite(days), days, 1e5))
        return out

    def _bgnbd(self, frame: pl.DataFrame) -> FloatArray:
        x, t, age = btyd_arrays(frame)
        horizon = float(self.config.labels.horizon_days)
        out: FloatArray = 1.0 - self.bgnbd.p_any_purchase(horizon, x, t, age)
        return out

    def with_scores(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` plus ``score_bgnbd`` and ``score_recency`` (inputs of the stacked model)."""
        return frame.with_columns(
            pl.Series("score_bgnbd", self._bgnbd(frame)),
            pl.Series("score_recency", self._recency(frame)),
        )

    def score(self, name: str, frame: pl.DataFrame) -> FloatArray:
        if name == "recency":
            return self._recency(frame)
        if name == "rules":
            return rules_score(frame, self.config)
        if name == "bgnbd":
            return self._bgnbd(frame)
        if name == "lightgbm":
            return self.lightgbm.predict_proba(frame)
        if name == "lightgbm_stacked" and self.stacked is not None:
            return self.stacked.predict_proba(self.with_scores(frame))
        if name == "lightgbm_hazard" and self.hazard is not None:
            return self.hazard.predict_proba(frame)
        raise KeyError(f"unknown candidate {name!r}")


@dataclass
class CandidateResult:
    """One candidate's validation AUC, calibrator and calibrated test metrics."""

    name: str
    validation_auc: float
    calibrator: Calibrator
    test_metrics: dict[str, float]
    test_proba: FloatArray


@dataclass
class RaceResult:
    """The race's outcome on one grid."""

    test_cutoff: datetime
    validation_cutoff: datetime
    training_cutoffs: list[datetime]
    candidates: dict[str, CandidateResult]
    selected: str
    why: str
    scorer: RaceScorer
    y_test: FloatArray
    n_train: int
    n_validation: int
    n_test: int
    test_base_rate: float
    oracle_auc: float | None = None
    notes: list[str] = field(default_factory=list)

    def metrics_json(self) -> dict[str, Any]:
        """The pinned ``{"churn": {...}}`` section of ``metrics.json``."""
        models: dict[str, Any] = {
            name: {k: _finite(v) for k, v in c.test_metrics.items()}
            for name, c in self.candidates.items()
        }
        if self.oracle_auc is not None:
            models["oracle"] = {"roc_auc": _finite(self.oracle_auc)}
        return {
            "churn": {
                "models": models,
                "selected": self.selected,
                "n_test": self.n_test,
                "test_cutoff": f"{self.test_cutoff:%Y-%m-%d}",
            }
        }


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def select(validation_auc: dict[str, float]) -> tuple[str, str]:
    """The winner and a sentence on why: best AUC, ties (within TIE_AUC) to the simpler."""
    ranked = [n for n in COMPLEXITY if n in validation_auc and np.isfinite(validation_auc[n])]
    if not ranked:
        raise ValueError("no candidate has a finite validation ROC-AUC")
    best = max(ranked, key=lambda n: validation_auc[n])
    winner = next(n for n in ranked if validation_auc[n] >= validation_auc[best] - TIE_AUC)
    listing = ", ".join(f"{n} {validation_auc[n]:.4f}" for n in ranked)
    if winner == best:
        why = f"{winner} has the best validation ROC-AUC ({listing})"
    else:
        why = (
            f"{winner} is within {TIE_AUC} ROC-AUC of the best ({best}) on validation and "
            f"simpler, so it wins the tie ({listing})"
        )
    return winner, why


def _same_ranking(a: FloatArray, b: FloatArray) -> bool:
    from scipy.stats import rankdata

    return bool(np.array_equal(rankdata(a), rankdata(b)))


def degenerate_baselines(
    scores: dict[str, tuple[FloatArray, FloatArray]],
    results: dict[str, CandidateResult],
    validation: pl.DataFrame,
    config: LapseConfig,
) -> list[str]:
    """One line per baseline that cannot rank on this data, and why.

    ``scores``: each candidate's raw ``(validation, test)`` scores. ``rules``
    ranking every user exactly as ``recency`` does on both cutoffs means no
    churn trigger fired (without a ``usage`` role none can: its tie-break is
    then recency itself); ``recency`` near 0.5 validation ROC-AUC means the
    eligible users' recency spans too little to rank them.
    """
    notes: list[str] = []
    if "rules" in scores and all(
        _same_ranking(r, c) for r, c in zip(scores["rules"], scores["recency"], strict=True)
    ):
        why = (
            "no usage role (no churn trigger can fire and its tie-break is recency); list usage "
            "events under roles.usage to give it signals of its own"
            if not config.roles.usage
            else "no churn trigger fired on the validation or test users"
        )
        notes.append(f"rules = recency: {why}")
    auc = results["recency"].validation_auc
    if abs(auc - 0.5) < 0.02:
        days = recency_days(validation, config)
        days = days[np.isfinite(days)]
        spread = f"{days.min():.0f}-{days.max():.0f}" if days.size else "no"
        hint = (
            f"; labels.eligibility active keeps only users active in the last "
            f"{config.labels.eligibility_days} days: widen labels.eligibility_days or use "
            "any_history"
            if config.labels.eligibility == "active"
            else ""
        )
        notes.append(
            f"recency ranks nothing (validation ROC-AUC {auc:.3f}; days since the last activity "
            f"span {spread} days among eligible users){hint}"
        )
    return notes


def fit_scorer(
    train: pl.DataFrame,
    btyd_fit: pl.DataFrame,
    config: LapseConfig,
    *,
    recent: pl.DataFrame | None = None,
    label_end: datetime | None = None,
    like: RaceScorer | None = None,
    selected: str | None = None,
) -> RaceScorer:
    """Fit LightGBM on ``train`` (labelled rows of the training cutoffs) and BG/NBD on
    ``btyd_fit`` (the activity summary of every active user at the fit cutoff).

    The hazard LightGBM (``models.hazard_lightgbm``, non-contractual labels) fits on
    ``recent``: the labelled rows (with ``days_to_next``) of every cutoff from the first
    training one to ``label_end``, the end its label windows must respect.

    ``like``: a fitted scorer (the race's) whose LightGBM tree counts and tuned
    parameters the new models reuse, without a holdout of their own (the refit of
    the shipped model). With ``selected`` (the race's winner) only that LightGBM is
    fit again; the other LightGBMs are ``like``'s own, kept so the bundle can still
    score them (BG/NBD, cheap, is always fit again)."""
    y = train["churned"].cast(pl.Float64).to_numpy()
    groups = train["cutoff"].dt.epoch("s").to_numpy()
    m = config.models

    def kept(name: str) -> bool:  # like's fitted `name` is kept, not fit again
        return selected is not None and name != selected

    def lightgbm(columns: list[str] | None, model: LightGBMChurn | None) -> LightGBMChurn:
        return LightGBMChurn(
            columns=columns,
            search=m.lightgbm_search and model is None,
            n_trees=None if model is None else model.n_trees_,
            tuned=None if model is None else model.best_params_,
            random_state=m.random_state,
            n_jobs=m.n_jobs,
        )

    if like is not None and kept("lightgbm"):
        lgbm = like.lightgbm
    else:
        lgbm = lightgbm(None, None if like is None else like.lightgbm).fit(train, y, groups=groups)
    x, t, age = btyd_arrays(btyd_fit)
    bgnbd = BGNBD().fit(x, t, age)
    scorer = RaceScorer(config=config, lightgbm=lgbm, bgnbd=bgnbd)
    if like is not None and kept("lightgbm_stacked"):
        scorer.stacked = like.stacked
    elif m.stacked_lightgbm:
        stacked_frame = scorer.with_scores(train)
        cols = model_columns(stacked_frame, extra=("score_bgnbd", "score_recency"))
        scorer.stacked = lightgbm(cols, None if like is None else like.stacked).fit(
            stacked_frame, y, groups=groups
        )
    if like is not None and kept("lightgbm_hazard"):
        scorer.hazard = like.hazard
    elif (
        m.hazard_lightgbm
        and config.labels.kind == "non_contractual"
        and recent is not None
        and DAYS_TO_NEXT in recent.columns
    ):
        assert label_end is not None, "the hazard LightGBM needs the label end"
        hazard = None if like is None else like.hazard
        scorer.hazard = LightGBMHazard(
            horizon_days=config.labels.horizon_days,
            n_trees=None if hazard is None else hazard.model_.n_trees_,
            random_state=m.random_state,
            n_jobs=m.n_jobs,
        ).fit(recent, label_end=label_end)
    return scorer


def fit_calibrator(name: str, score: FloatArray, y: FloatArray, config: LapseConfig) -> Calibrator:
    return Calibrator(config.models.calibration, probability=name in _PROBABILISTIC).fit(score, y)


def run_race(
    frame: pl.DataFrame,
    btyd_fit: pl.DataFrame,
    *,
    training: list[datetime],
    validation: datetime,
    test: datetime,
    config: LapseConfig,
    oracle: pl.DataFrame | None = None,
) -> RaceResult:
    """Fit every candidate on ``training``, calibrate on ``validation``, evaluate on ``test``.

    Parameters
    ----------
    frame
        Labelled feature rows (``user_id, cutoff, churned``, features, ``btyd_*``; and
        ``days_to_next`` for the hazard LightGBM, which also learns from the cutoffs
        between the training ones and the validation cutoff).
    btyd_fit
        BG/NBD's fitting summary (``btyd_*`` of every active user at the
        validation cutoff: past data only).
    oracle
        ``user_id, p_churn`` at the test cutoff (the generator's truth).
    """
    train = frame.filter(pl.col("cutoff").is_in(pl.lit(pl.Series(training)).implode()))
    recent = (  # the hazard LightGBM's rows only: a copy of most of the frame
        frame.filter(pl.col("cutoff").is_between(min(training), validation, closed="left"))
        if config.models.hazard_lightgbm
        else None
    )
    val = frame.filter(pl.col("cutoff") == validation)
    tst = frame.filter(pl.col("cutoff") == test)
    for part, rows in (("training", train), ("validation", val), ("test", tst)):
        if rows.height == 0 or rows["churned"].n_unique() < 2:
            raise LapseError(
                f"the {part} cutoff(s) have {rows.height} eligible users and need both churned "
                "and retained ones; supply more users or history, or widen labels.eligibility"
            )
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        scorer = fit_scorer(train, btyd_fit, config, recent=recent, label_end=validation)
    for w in caught:
        notes.append(str(w.message))
        warnings.warn(w.message, w.category, stacklevel=2)
    from sklearn.metrics import roc_auc_score

    y_val = val["churned"].cast(pl.Float64).to_numpy()
    y_test = tst["churned"].cast(pl.Float64).to_numpy()
    results: dict[str, CandidateResult] = {}
    scores: dict[str, tuple[FloatArray, FloatArray]] = {}
    for name in scorer.names:
        s_val, s_test = scorer.score(name, val), scorer.score(name, tst)
        scores[name] = (s_val, s_test)
        cal = fit_calibrator(name, s_val, y_val, config)
        p_test = cal.predict(s_test)
        results[name] = CandidateResult(
            name=name,
            validation_auc=float(roc_auc_score(y_val, s_val)),
            calibrator=cal,
            test_metrics=binary_metrics(y_test, p_test),
            test_proba=p_test,
        )
    selected, why = select({n: r.validation_auc for n, r in results.items()})
    notes += degenerate_baselines(scores, results, val, config)
    oracle_auc = None
    if oracle is not None:
        joined = tst.select("user_id", "churned").join(oracle, on="user_id", how="left")
        missing = joined["p_churn"].null_count()
        if missing:
            notes.append(
                f"oracle: {missing} eligible test users have no truth row (past their latent "
                "churn date); they count as p_churn = 1"
            )
        p = joined["p_churn"].fill_null(1.0).cast(pl.Float64).to_numpy()
        oracle_auc = float(roc_auc_score(joined["churned"].cast(pl.Float64).to_numpy(), p))
    return RaceResult(
        test_cutoff=test,
        validation_cutoff=validation,
        training_cutoffs=list(training),
        candidates=results,
        selected=selected,
        why=why,
        scorer=scorer,
        y_test=y_test,
        n_train=train.height,
        n_validation=val.height,
        n_test=tst.height,
        test_base_rate=float(y_test.mean()),
        oracle_auc=oracle_auc,
        notes=notes,
    )
