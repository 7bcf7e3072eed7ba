"""Point-in-time features: per-user rows as of a cutoff, with no leakage.

Everything here sees events with ``ts < cutoff`` only. The feature names,
meanings and dtypes live in :mod:`lapse.features.registry`.
"""

from __future__ import annotations

from lapse.features.build import FeatureSet, build, build_many
from lapse.features.registry import FEATURES, SKU_FEATURES, FeatureDef, expand, markdown_table
from lapse.features.sku import build_sku

__all__ = [
    "FEATURES",
    "SKU_FEATURES",
    "FeatureDef",
    "FeatureSet",
    "build",
    "build_many",
    "build_sku",
    "expand",
    "markdown_table",
]
