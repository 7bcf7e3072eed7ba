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
from lapse.labels.cutoffs import CutoffGrid, cutoff_grid, data_span, grid_for_test

__all__ = [
    "EXCLUSIONS",
    "CutoffGrid",
    "activity_events",
    "churn_labels",
    "cutoff_grid",
    "data_span",
    "describe_exclusions",
    "eligible",
    "grid_for_test",
    "outcomes",
    "population",
    "role_events",
]
