"""Deprecated: ``lapse.scoring`` moved to :mod:`lapse.score.records`; this alias goes in lapse 0.3."""

from __future__ import annotations

import warnings

from lapse.score.records import *  # noqa: F403
from lapse.score.records import __all__ as __all__

warnings.warn(
    "lapse.scoring moved to lapse.score.records: import from there (the old name goes in lapse 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
