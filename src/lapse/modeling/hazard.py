"""The horizon in two halves: a discrete-time hazard LightGBM churn candidate.

Non-contractual churn over the horizon ``h`` is no qualifying activity in
``[T, T + h)``: none in the first half, and none in the second given none in
the first. One LightGBM (:class:`~lapse.modeling.lgbm.LightGBMChurn`) learns
the chance of a quiet half from one row per (user, cutoff, half) at risk, with
the half as an input (:data:`HALF`); P(churn) is the product over the halves
(Singer & Willett's discrete-time survival, two periods).

A half's label window ends ``h / 2`` sooner than the whole horizon's, so the
first half also learns from the cutoffs of the last half horizon before the
label end that a plain classifier cannot use yet: fresher behaviour for the
same embargo. Out of time inside Online Retail's calibration period this
ranked above the plain and stacked LightGBM on every question tried
(docs/real-data.md); the halves trained on the same cutoffs gained nothing,
so the fresher cutoffs are the point.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.modeling.lgbm import LightGBMChurn, model_columns
from lapse.modeling.params import ParamsMixin

if TYPE_CHECKING:
    from lapse.modeling._treeshap import Moves

__all__ = ["DAYS_TO_NEXT", "HALF", "HalfMoves", "LightGBMHazard", "half_rows"]

FloatArray = npt.NDArray[np.float64]

#: The label column the halves come from (:func:`lapse.labels.churn_labels`).
DAYS_TO_NEXT: Final = "days_to_next"
#: The model's input saying which half a row is about: 0 (first) or 1 (second).
HALF: Final = "horizon_half"
_QUIET: Final = "_quiet"
_SPLITTING: Final = threading.Lock()


def half_rows(frame: pl.DataFrame, horizon_days: float, label_end: datetime) -> pl.DataFrame:
    """One row per (user, cutoff, half) whose half window ends by ``label_end``, with the
    user still at risk (no activity earlier in the horizon): ``frame``'s columns plus
    :data:`HALF` and ``_quiet`` (no activity in the half).

    >>> from datetime import UTC, datetime
    >>> rows = pl.DataFrame({"user_id": ["a", "b", "c"], "days_to_next": [3.0, 20.0, None],
    ...     "cutoff": [datetime(2024, 1, 1, tzinfo=UTC)] * 3})
    >>> half_rows(rows, 28, datetime(2024, 1, 29, tzinfo=UTC)).select("user_id", HALF, "_quiet").rows()
    [('a', 0, False), ('b', 0, True), ('c', 0, True), ('b', 1, False), ('c', 1, True)]
    """
    half = horizon_days / 2
    nxt = pl.col(DAYS_TO_NEXT)
    parts = []
    for k in (0, 1):
        start, end = k * half, (k + 1) * half
        parts.append(
            frame.filter(
                (pl.col("cutoff") + timedelta(days=end) <= label_end)
                & (nxt.is_null() | (nxt >= start))
            ).with_columns(
                pl.lit(k, pl.Int8).alias(HALF), (nxt.is_null() | (nxt >= end)).alias(_QUIET)
            )
        )
    return pl.concat(parts)


def _log_sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = -np.logaddexp(0.0, -z)
    return out


@dataclass(frozen=True)
class HalfMoves:
    """How moving one input changes log P(churn) (:meth:`LightGBMHazard.moves`): each
    half's raw-score change, from the trees that split on the input, through that half's
    sigmoid; the same interface as :class:`lapse.modeling._treeshap.Moves`.

    ``shared`` moves the trees that never split on :data:`HALF` (the same change in both
    halves), ``halves`` the others per half; ``raw`` is each half's raw score.
    """

    shared: Moves
    halves: tuple[Moves, Moves]
    raw: tuple[FloatArray, FloatArray]

    def delta(
        self, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64], values: FloatArray
    ) -> FloatArray:
        """Per ``rows[i]``, the change of log P(churn) when input ``cols[i]`` is set to
        ``values[i]``."""
        shared = self.shared.delta(rows, cols, values)
        out = np.zeros(len(rows))
        for moves, raw in zip(self.halves, self.raw, strict=True):
            before = raw[rows]
            after = before + (shared + moves.delta(rows, cols, values))
            out += _log_sigmoid(after) - _log_sigmoid(before)
        return out


class LightGBMHazard(ParamsMixin):
    """P(no activity in the horizon) as the product of two halves' chances (module docstring).

    Parameters
    ----------
    horizon_days
        The label horizon (``labels.horizon_days``).
    n_trees
        Fit exactly this many trees, without a holdout (a refit reusing a fitted
        hazard's ``model_.n_trees_``).
    random_state, n_jobs
        Passed to the inner :class:`~lapse.modeling.lgbm.LightGBMChurn`.

    Attributes
    ----------
    model_ : LightGBMChurn
        The fitted per-half model (inputs :data:`HALF` last).
    feature_names_, categories_, typical_
        The inputs without :data:`HALF` (what reasons explain, as for LightGBMChurn).
    """

    def __init__(
        self,
        *,
        horizon_days: float = 28.0,
        n_trees: int | None = None,
        random_state: int = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.horizon_days = horizon_days
        self.n_trees = n_trees
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, frame: pl.DataFrame, *, label_end: datetime) -> LightGBMHazard:
        """Fit on labelled rows (``cutoff``, :data:`DAYS_TO_NEXT`, features) of every cutoff
        that may train; a half trains only where its window ends by ``label_end``."""
        rows = half_rows(frame, self.horizon_days, label_end)
        y = rows[_QUIET].cast(pl.Float64).to_numpy()
        self.model_ = LightGBMChurn(
            columns=[*model_columns(frame), HALF],
            n_trees=self.n_trees,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
        ).fit(rows, y, groups=rows["cutoff"].dt.epoch("s").to_numpy())
        self.feature_names_ = self.model_.feature_names_[:-1]
        self.categories_ = self.model_.categories_
        self.typical_ = self.model_.typical_[:-1]
        return self

    def _fitted(self) -> LightGBMChurn:
        if not hasattr(self, "model_"):
            raise RuntimeError("LightGBMHazard is not fitted; call fit first")
        return self.model_

    def _parts(self) -> tuple[LightGBMChurn, LightGBMChurn]:
        """``(halved, shared)``: the trees that split on :data:`HALF`, and the others,
        whose output is the same in both halves (:meth:`LightGBMChurn.split_on`). Built on
        first use and kept on the instance, not in its pickled state."""
        model = self._fitted()
        with _SPLITTING:  # shards scored in threads split once
            cached: tuple[LightGBMChurn, tuple[LightGBMChurn, LightGBMChurn]] | None = (
                self.__dict__.get("_parts_cache")
            )
            if cached is None or cached[0] is not model:
                cached = (model, model.split_on(len(model.feature_names_) - 1))
                self.__dict__["_parts_cache"] = cached
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_parts_cache", None)
        return state

    def encode(self, frame: pl.DataFrame) -> FloatArray:
        """The input matrix without :data:`HALF` (see :meth:`LightGBMChurn.encode`)."""
        x = self._fitted().encode(frame.with_columns(pl.lit(0, pl.Int8).alias(HALF)))
        return x[:, :-1]

    @staticmethod
    def _half(x: FloatArray, k: int) -> FloatArray:
        return np.column_stack([x, np.full(len(x), float(k))])

    def _halves(self, x: FloatArray) -> tuple[FloatArray, FloatArray]:
        """``x`` in each half (the second a plain copy of the first: cheaper than
        stacking a column-major ``x`` twice)."""
        first = self._half(x, 0)
        second = first.copy()
        second[:, -1] = 1.0
        return first, second

    def predict_proba(self, frame: pl.DataFrame) -> FloatArray:
        """P(churn over the horizon) per row (before calibration)."""
        rows = self._fitted().encode(frame.with_columns(pl.lit(0, pl.Int8).alias(HALF)))
        return self._proba(rows)

    def predict_encoded(self, x: FloatArray, *, raw_score: bool = False) -> FloatArray:
        """:meth:`predict_proba` of rows already :meth:`encode`-d (its log with ``raw_score``).

        The trees that never split on :data:`HALF` predict once for both halves."""
        return self._proba(self._half(x, 0), raw_score=raw_score)

    def _proba(self, rows: FloatArray, *, raw_score: bool = False) -> FloatArray:
        first, second = self._raw(rows)
        log_p = _log_sigmoid(first) + _log_sigmoid(second)
        out: FloatArray = log_p if raw_score else np.exp(log_p)
        return out

    def _raw(self, rows: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Each half's raw score of encoded ``rows`` with :data:`HALF` 0 last (set to 1 in
        place for the second half: one copy of the inputs, not two); the shared trees
        predict once."""
        halved, shared = self._parts()
        both = shared.predict_encoded(rows, raw_score=True)
        first = both + halved.predict_encoded(rows, raw_score=True)
        rows[:, -1] = 1.0
        return first, both + halved.predict_encoded(rows, raw_score=True)

    def moves(self, x: FloatArray) -> HalfMoves | None:
        """Encoded rows ``x``, ready for :meth:`HalfMoves.delta` (what the reasons' check
        of a driver moved to its median reads on many rows); ``None`` when the trees
        split categorically (predict the moved rows instead)."""
        x0, x1 = self._halves(x)
        return self._moves(x0, x1, self._raw(x0.copy()))

    def _moves(
        self, x0: FloatArray, x1: FloatArray, raw: tuple[FloatArray, FloatArray]
    ) -> HalfMoves | None:
        halved, shared = self._parts()
        found = shared.moves(x0), halved.moves(x0), halved.moves(x1)
        if found[0] is None or found[1] is None or found[2] is None:
            return None
        return HalfMoves(found[0], (found[1], found[2]), raw)

    def contributions_encoded(self, x: FloatArray) -> FloatArray:
        """Each input's TreeSHAP value summed over the halves (log-odds), ``(n_rows,
        n_features + 1)``: it ranks the drivers; the last column makes each row add up to
        the log of P(churn) (``predict_encoded(raw_score=True)``, here from the SHAP values'
        own sums), the score a reason's check moves. The trees that never split on
        :data:`HALF` are explained once, counted for both halves."""
        return self.drivers(x, moves=False)[0]

    def drivers(self, x: FloatArray, *, moves: bool) -> tuple[FloatArray, HalfMoves | None]:
        """:meth:`contributions_encoded` of ``x`` and, with ``moves``, its :meth:`moves`:
        each half's raw score, which the moves need, is its SHAP values' sum (no
        prediction)."""
        halved, shared = self._parts()
        x0, x1 = self._halves(x)
        both = shared.contributions_encoded(x0)
        first, second = halved.contributions_encoded(x0), halved.contributions_encoded(x1)
        base = both.sum(axis=1)
        raw = base + first.sum(axis=1), base + second.sum(axis=1)
        shap = 2.0 * both[:, :-2] + first[:, :-2] + second[:, :-2]
        log_p = _log_sigmoid(raw[0]) + _log_sigmoid(raw[1])
        out: FloatArray = np.column_stack([shap, log_p - shap.sum(axis=1)])
        return out, self._moves(x0, x1, raw) if moves else None
