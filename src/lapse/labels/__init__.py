"""Churn labels, eligibility and the cutoff grid.

The only package allowed to read events at or after a cutoff.
"""

from __future__ import annotations

from lapse.labels.churn import (
    EXCLUSIONS,
    activity_events,
    churn_labels,
    describe_exclusions,
    eligible,
    outcomes,
    population,
    role_events,
)
from lapse.labels.cutoffs import (
    MIN_TRAIN_CUTOFFS,
    CutoffGrid,
    GridFit,
    customer_quantile,
    cutoff_grid,
    data_span,
    fit_grid,
    grid_for_test,
    propose_labels,
    repeat_gaps,
    training_cutoffs_fit,
)

__all__ = [
    "EXCLUSIONS",
    "MIN_TRAIN_CUTOFFS",
    "CutoffGrid",
    "GridFit",
    "activity_events",
    "churn_labels",
    "customer_quantile",
    "cutoff_grid",
    "data_span",
    "describe_exclusions",
    "eligible",
    "fit_grid",
    "grid_for_test",
    "outcomes",
    "population",
    "propose_labels",
    "repeat_gaps",
    "role_events",
    "training_cutoffs_fit",
]
