"""Evaluation metrics for churn scores and the calibrators fitted on validation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from lapse.modeling.params import ParamsMixin

__all__ = [
    "METRIC_NAMES",
    "Calibrator",
    "binary_metrics",
    "expected_calibration_error",
    "top_decile",
]

FloatArray = npt.NDArray[np.float64]

METRIC_NAMES = (
    "roc_auc",
    "pr_auc",
    "brier",
    "log_loss",
    "ece",
    "top_decile_lift",
    "top_decile_capture",
)
_EPS = 1e-6


def _check(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    ya = np.asarray(y, dtype=np.float64)
    pa = np.asarray(p, dtype=np.float64)
    if ya.shape != pa.shape or ya.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-d of equal length, got {ya.shape}, {pa.shape}"
        )
    if ya.size == 0:
        raise ValueError("no rows to evaluate")
    if not np.all(np.isfinite(pa)):
        raise ValueError("scores contain NaN or infinite values")
    return ya, pa


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> float:
    """ECE over ``n_bins`` equal-frequency bins of the predicted probability.

    Rows are sorted by probability and split into bins of (nearly) equal size;
    ECE is the size-weighted mean of ``|mean(p) - mean(y)|`` per bin.
    """
    ya, pa = _check(y, p)
    order = np.argsort(pa, kind="stable")
    total = 0.0
    for idx in np.array_split(order, min(n_bins, ya.size)):
        total += idx.size * abs(float(pa[idx].mean()) - float(ya[idx].mean()))
    return total / ya.size


def top_decile(y: npt.ArrayLike, score: npt.ArrayLike) -> tuple[float, float]:
    """``(lift, capture)`` of the top 10% by score (ties broken by row order).

    Lift is the positive rate in the top decile over the base rate; capture is
    the share of all positives that fall in it.
    """
    ya, sa = _check(y, score)
    k = max(1, int(np.ceil(ya.size / 10)))
    top = np.argsort(-sa, kind="stable")[:k]
    positives = float(ya.sum())
    if positives == 0:
        return float("nan"), float("nan")
    rate = float(ya[top].mean())
    return rate / (positives / ya.size), float(ya[top].sum()) / positives


def binary_metrics(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for probabilities ``p`` of ``y == 1``.

    Ranking metrics are NaN when only one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    ya, pa = _check(y, p)
    if np.any((pa < 0) | (pa > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    both = 0 < ya.sum() < ya.size
    pc = np.clip(pa, _EPS, 1 - _EPS)
    lift, capture = top_decile(ya, pa)
    return {
        "roc_auc": float(roc_auc_score(ya, pa)) if both else float("nan"),
        "pr_auc": float(average_precision_score(ya, pa)) if both else float("nan"),
        "brier": float(np.mean((pa - ya) ** 2)),
        "log_loss": float(-np.mean(ya * np.log(pc) + (1 - ya) * np.log(1 - pc))),
        "ece": expected_calibration_error(ya, pa),
        "top_decile_lift": lift,
        "top_decile_capture": capture,
    }


def _logit(p: FloatArray) -> FloatArray:
    pc = np.clip(p, _EPS, 1 - _EPS)
    out: FloatArray = np.log(pc / (1 - pc))
    return out


class Calibrator(ParamsMixin):
    """Maps a risk score (higher = riskier) to a calibrated churn probability.

    Parameters
    ----------
    method
        ``"platt"``: logistic regression on the score (on its logit when
        ``probability`` is true), strictly monotone, so rankings and AUC are
        unchanged; ``"isotonic"``: a monotone step function (may tie scores).
    probability
        The score is already a probability in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> cal = Calibrator().fit(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    >>> bool(np.all(np.diff(cal.predict(np.array([0.1, 0.5, 0.9]))) > 0))
    True
    """

    def __init__(
        self, method: Literal["platt", "isotonic"] = "platt", probability: bool = True
    ) -> None:
        self.method = method
        self.probability = probability

    def _x(self, score: npt.ArrayLike) -> FloatArray:
        s = np.asarray(score, dtype=np.float64)
        return _logit(s) if self.probability else s

    def fit(self, score: npt.ArrayLike, y: npt.ArrayLike) -> Calibrator:
        """Fit on validation scores and labels."""
        x = self._x(score)
        ya = np.asarray(y, dtype=np.float64)
        if x.shape != ya.shape or x.size == 0:
            raise ValueError("score and y must be non-empty and of equal length")
        if self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            self.isotonic_ = iso.fit(x, ya)
            return self
        if self.method != "platt":
            raise ValueError(f"unknown calibration method {self.method!r}")
        # standardise for a well-conditioned fit; a tiny ridge keeps it finite on separable data
        self.center_ = float(x.mean())
        self.scale_ = float(x.std()) or 1.0
        z = (x - self.center_) / self.scale_
        w = np.zeros(2)
        for _ in range(100):  # Newton steps on the L2-penalised log-likelihood
            eta = w[0] + w[1] * z
            p = 1.0 / (1.0 + np.exp(-np.clip(eta, -35, 35)))
            g = np.array([np.sum(p - ya), np.sum((p - ya) * z)]) + 1e-6 * w
            h = p * (1 - p)
            hess = np.array([[h.sum(), (h * z).sum()], [(h * z).sum(), (h * z * z).sum()]])
            step = np.linalg.solve(hess + 1e-6 * np.eye(2), g)
            w = w - step
            if np.max(np.abs(step)) < 1e-10:
                break
        self.coef_ = (float(w[0]), float(w[1]))
        return self

    def predict(self, score: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities."""
        x = self._x(score)
        if self.method == "isotonic":
            if not hasattr(self, "isotonic_"):
                raise RuntimeError("Calibrator is not fitted")
            out: FloatArray = np.asarray(self.isotonic_.predict(x), dtype=np.float64)
            return out
        if not hasattr(self, "coef_"):
            raise RuntimeError("Calibrator is not fitted")
        z = (x - self.center_) / self.scale_
        eta = self.coef_[0] + self.coef_[1] * z
        out = 1.0 / (1.0 + np.exp(-np.clip(eta, -35, 35)))
        return out
