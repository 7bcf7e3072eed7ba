"""Churn labels, eligibility and the cutoff grid.

The only package allowed to read events at or after a cutoff.
"""

from __future__ import annotations

from lapse.labels.churn import activity_events, churn_labels, eligible, outcomes, role_events
from lapse.labels.cutoffs import CutoffGrid, cutoff_grid, data_span, grid_for_test

__all__ = [
    "CutoffGrid",
    "activity_events",
    "churn_labels",
    "cutoff_grid",
    "data_span",
    "eligible",
    "grid_for_test",
    "outcomes",
    "role_events",
]
