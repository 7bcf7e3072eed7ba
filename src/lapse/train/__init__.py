"""Training jobs: the churn race and refit, replenishment survival models, the review.

``from lapse.train import train`` is the entry point a notebook uses; the
modules are :mod:`lapse.train.churn` (race, refit, backtest),
:mod:`lapse.train.replenishment` (time to next order) and
:mod:`lapse.train.review` (challenger against champion on the latest cutoffs).
"""

from __future__ import annotations

from lapse.train.churn import BacktestResult, TrainResult, backtest, build_frame, train

__all__ = ["BacktestResult", "TrainResult", "backtest", "build_frame", "train"]
