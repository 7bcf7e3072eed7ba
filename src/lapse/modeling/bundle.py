"""The churn bundle: everything scoring needs, saved locally with pickle.

Holds the config (feature settings, roles, rules, segments), the feature
schema, the training end date, the shipped churn scorer with its calibrator,
the race's LightGBM (for reasons), BG/NBD, and the training score
distribution (for percentiles and drift) with a sample of the most important
numeric features at the calibration cutoff (``feature_reference``, for drift),
and what it was trained on (``training_data``: the events' source, span and
event names; ``None`` in bundles saved before it was recorded).
``extras`` is where other tasks (replenishment) put their models.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.exceptions import LapseError
from lapse.features import build, build_many
from lapse.files import atomic_path
from lapse.labels import eligible
from lapse.modeling.bgnbd import rfm_summary
from lapse.modeling.lgbm import with_derived
from lapse.modeling.metrics import Calibrator
from lapse.modeling.race import RaceScorer
from lapse.modeling.reasons import reasons
from lapse.modeling.rules import triggers
from lapse.schema import ROLES
from lapse.segments import assign, percentile
from lapse.triggers import for_run

__all__ = ["BUNDLE_FORMAT", "ChurnBundle", "TrainingData", "listing"]

BUNDLE_FORMAT = 2  # 2: feature_reference (drift) and the config's trigger section


@dataclass(frozen=True)
class TrainingData:
    """The events a bundle was trained on: source, first and last event, rows per event name."""

    source: str
    first_event: datetime | None
    last_event: datetime | None
    events: dict[str, int]

    def describe(self, names: Sequence[str]) -> str:
        """``data/events.parquet, 2010-12-01 to 2011-12-09, events order_completed, return``."""
        span = (
            f"{self.first_event:%Y-%m-%d} to {self.last_event:%Y-%m-%d}"
            if self.first_event is not None and self.last_event is not None
            else "no events"
        )
        return f"{self.source}, {span}, events {listing(names)}"


def listing(names: Sequence[str], most: int = 8) -> str:
    """``a, b, c`` (at most ``most`` names, then how many more)."""
    shown = ", ".join(names[:most]) or "none"
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass
class ChurnBundle:
    """A trained churn model ready to score feature rows."""

    name: str
    config: LapseConfig
    feature_schema: dict[str, str]
    training_end: datetime
    selected: str
    scorer: RaceScorer
    calibrator: Calibrator
    score_reference: npt.NDArray[np.float64]
    metrics: dict[str, Any]
    cutoffs: dict[str, Any]
    created_at: datetime
    extras: dict[str, Any] = field(default_factory=dict)
    feature_reference: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    format: int = BUNDLE_FORMAT
    # a plain default (a class attribute): bundles pickled before it existed read None
    training_data: TrainingData | None = None

    def event_names(self) -> list[str]:
        """The event names the model learns from: its roles' names seen in training
        (every role name when the bundle does not record its training events)."""
        names = {n for role in ROLES for n in self.config.roles.of(role)}
        if self.training_data is not None:
            names &= set(self.training_data.events)
        return sorted(names)

    # -- inputs -------------------------------------------------------------------
    def prepare(
        self,
        events: pl.LazyFrame,
        as_of: datetime,
        *,
        attributes: pl.DataFrame | None = None,
        eligible_only: bool = True,
        keep: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        """Feature rows as of ``as_of`` with what every model needs (past events only).

        ``keep``: the eligible ``user_id, cutoff`` pairs when the caller has them
        already (:func:`lapse.labels.population`); else :func:`lapse.labels.eligible`'s.
        """
        # one cutoff: the single-cutoff builder, the same rows as build_many (tested), faster
        frame = (
            build(events, as_of, self.config, attributes=attributes)
            .with_columns(pl.lit(as_of).cast(pl.Datetime("us", "UTC")).alias("cutoff"))
            .select("user_id", "cutoff", pl.exclude("user_id", "cutoff"))
        )
        if eligible_only:
            pairs = keep if keep is not None else eligible(events, [as_of], self.config)
            frame = frame.join(pairs, on=["user_id", "cutoff"], how="semi")
        rfm = rfm_summary(events, [as_of], self.config)
        return with_derived(frame.join(rfm, on=["user_id", "cutoff"], how="left"))

    def prepare_many(
        self,
        events: pl.LazyFrame,
        cutoffs: Sequence[datetime],
        *,
        attributes: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        """:meth:`prepare` at several cutoffs at once: eligible ``(user, cutoff)`` rows.

        One roll-up serves every cutoff (:func:`lapse.features.build_many`); the rows
        equal :meth:`prepare`'s at each cutoff.
        """
        frame = build_many(events, cutoffs, self.config, attributes=attributes)
        frame = frame.with_columns(pl.col("cutoff").cast(pl.Datetime("us", "UTC")))
        keep = eligible(events, cutoffs, self.config)
        frame = frame.join(keep, on=["user_id", "cutoff"], how="semi")
        rfm = rfm_summary(events, cutoffs, self.config)
        return with_derived(frame.join(rfm, on=["user_id", "cutoff"], how="left"))

    def check_schema(self, frame: pl.DataFrame) -> None:
        """Raise when ``frame`` lacks a feature of the bundle or has a changed dtype."""
        problems = []
        for name, dtype in self.feature_schema.items():
            if name not in frame.columns:
                problems.append(f"{name} is missing")
            elif str(frame.schema[name]) != dtype:
                problems.append(f"{name} is {frame.schema[name]}, the model was trained on {dtype}")
        if problems:
            raise LapseError(
                f"the feature rows do not match model {self.name!r}: "
                + "; ".join(problems[:10])
                + ("" if len(problems) <= 10 else f" (and {len(problems) - 10} more)")
                + "; score with the config the model was trained with, or retrain"
            )

    # -- outputs --------------------------------------------------------------------
    def predict_proba(self, frame: pl.DataFrame) -> npt.NDArray[np.float64]:
        """Calibrated churn probability per row (the shipped model)."""
        return self.calibrator.predict(self.scorer.score(self.selected, frame))

    def percentile(self, churn_risk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Percentile of each risk in the training score distribution, in [0, 1]."""
        return percentile(churn_risk, self.score_reference)

    def segments(self, churn_risk: npt.ArrayLike) -> pl.Series:
        """``risk_segment`` per row from the config's segments section."""
        return assign(churn_risk, self.config.segments, reference=self.score_reference)

    def triggers(self, frame: pl.DataFrame, run: LapseConfig | None = None) -> pl.DataFrame:
        """Key columns, one boolean column per trigger, ``triggers`` (fired ids) and
        ``cooldown_keys``.

        With ``run`` (the run's config) the triggers are the run's: its ``rules``,
        ``triggers`` and ``milestones`` (:func:`lapse.triggers.for_run`); ``frame``
        then holds the features those triggers read.
        """
        return triggers(frame, self.config if run is None else for_run(self.config, run))

    def reasons(self, frame: pl.DataFrame, *, top: int = 3) -> pl.DataFrame:
        """Top risk drivers of the given rows from the shipped model, in words (costly:
        pass only rows you send; see :mod:`lapse.modeling.reasons`)."""
        return reasons(self.scorer, self.selected, frame, top=top)

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Pickle the bundle to ``path`` (parents created); written atomically."""
        p = Path(path)
        with atomic_path(p) as tmp, tmp.open("wb") as fh:
            pickle.dump(self, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return p

    @classmethod
    def load(cls, path: str | Path) -> ChurnBundle:
        """Load a bundle saved by :meth:`save` (only load files you trust: it is a pickle)."""
        p = Path(path)
        try:
            with p.open("rb") as fh:
                obj = pickle.load(fh)
        except FileNotFoundError:
            raise LapseError(f"{p}: no model bundle there; run `lapse train` first") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as exc:
            raise LapseError(f"{p}: not a lapse model bundle ({exc})") from None
        if not isinstance(obj, cls):
            raise LapseError(f"{p}: not a lapse churn bundle (found {type(obj).__name__})")
        if obj.format != BUNDLE_FORMAT:
            raise LapseError(
                f"{p}: bundle format {obj.format}, this lapse reads {BUNDLE_FORMAT}; retrain"
            )
        return obj
