"""Deprecated: ``lapse.replenishment`` moved to :mod:`lapse.train.replenishment`; this alias goes in lapse 0.3."""

from __future__ import annotations

import warnings

from lapse.train.replenishment import *  # noqa: F403
from lapse.train.replenishment import __all__ as __all__

warnings.warn(
    "lapse.replenishment moved to lapse.train.replenishment: import from there (the old name goes in lapse 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
