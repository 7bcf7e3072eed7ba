"""Deprecated: ``lapse.pipeline`` was split into :mod:`lapse.score.run` (``run_score``) and
:mod:`lapse.score.steps` (its delivery steps),
:mod:`lapse.score.trigger_run` (``run_triggers``) and :mod:`lapse.jobs` (the other
CLI jobs); this alias goes in lapse 0.3."""

from __future__ import annotations

import warnings

from lapse.jobs import *  # noqa: F403
from lapse.jobs import __all__ as _jobs
from lapse.score.run import *  # noqa: F403
from lapse.score.run import __all__ as _run
from lapse.score.steps import *  # noqa: F403
from lapse.score.steps import __all__ as _steps
from lapse.score.trigger_run import *  # noqa: F403
from lapse.score.trigger_run import __all__ as _trigger_run

__all__ = [*_jobs, *_run, *_steps, *_trigger_run]

warnings.warn(
    "lapse.pipeline was split: run_score lives in lapse.score.run, run_triggers in "
    "lapse.score.trigger_run, the other jobs in lapse.jobs (the old name goes in lapse 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
