"""Deprecated: ``lapse.training`` moved to :mod:`lapse.train`; this alias goes in lapse 0.3."""

from __future__ import annotations

import warnings

from lapse.train.churn import *  # noqa: F403
from lapse.train.churn import __all__ as __all__

warnings.warn(
    "lapse.training moved to lapse.train: import from there (the old name goes in lapse 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
