"""Churn models, the race, evaluation and reasons.

Heavy libraries (LightGBM, SciPy, scikit-learn, matplotlib) are imported
inside the functions that use them, so importing this package stays cheap.
"""

from __future__ import annotations

from lapse.exceptions import FitWarning
from lapse.modeling.bgnbd import BGNBD, rfm_summary
from lapse.modeling.bundle import ChurnBundle
from lapse.modeling.lgbm import LightGBMChurn, model_columns
from lapse.modeling.metrics import METRIC_NAMES, Calibrator, binary_metrics
from lapse.modeling.race import RaceResult, RaceScorer, run_race, select
from lapse.modeling.reasons import describe, reasons
from lapse.modeling.rules import CHURN_TRIGGERS, TRIGGERS, rules_score, triggers

__all__ = [
    "BGNBD",
    "CHURN_TRIGGERS",
    "METRIC_NAMES",
    "TRIGGERS",
    "Calibrator",
    "ChurnBundle",
    "FitWarning",
    "LightGBMChurn",
    "RaceResult",
    "RaceScorer",
    "binary_metrics",
    "describe",
    "model_columns",
    "reasons",
    "rfm_summary",
    "rules_score",
    "run_race",
    "select",
    "triggers",
]
