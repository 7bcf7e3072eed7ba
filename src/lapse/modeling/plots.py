"""Report plots as PNG (matplotlib, Agg backend): ROC, PR, calibration, gains, importance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.files import save_figure

__all__ = ["write_plots"]

FloatArray = npt.NDArray[np.float64]


def _gains(y: FloatArray, p: FloatArray) -> tuple[FloatArray, FloatArray]:
    order = np.argsort(-p, kind="stable")
    captured = np.concatenate([[0.0], np.cumsum(y[order]) / max(y.sum(), 1.0)])
    share = np.linspace(0.0, 1.0, y.size + 1)
    return share, captured


def _reliability(y: FloatArray, p: FloatArray, bins: int = 10) -> tuple[FloatArray, FloatArray]:
    order = np.argsort(p, kind="stable")
    parts = np.array_split(order, min(bins, y.size))
    return np.array([p[i].mean() for i in parts]), np.array([y[i].mean() for i in parts])


def write_plots(
    out_dir: Path,
    y: FloatArray,
    probas: dict[str, FloatArray],
    importance: pl.DataFrame | None = None,
    *,
    title: str = "",
    top_features: int = 20,
) -> dict[str, Path]:
    """Write ``roc.png``, ``pr.png``, ``calibration.png``, ``gains.png`` and
    ``importance.png`` (gain and mean |SHAP|) into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    suffix = f" ({title})" if title else ""

    def save(fig: object, name: str) -> None:
        path = out_dir / f"{name}.png"
        save_figure(fig, path)
        plt.close(fig)  # type: ignore[arg-type]
        paths[name] = path

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, p in probas.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC{suffix}")
    ax.legend(loc="lower right")
    save(fig, "roc")

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, p in probas.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=name)
    ax.axhline(float(y.mean()), color="k", ls=":", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall{suffix}")
    ax.legend(loc="upper right")
    save(fig, "pr")

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, p in probas.items():
        mp, fy = _reliability(y, p)
        ax.plot(mp, fy, marker="o", ms=3, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="mean predicted churn probability (10 equal-frequency bins)",
        ylabel="observed churn rate",
        title=f"Calibration{suffix}",
    )
    ax.legend(loc="upper left")
    save(fig, "calibration")

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, p in probas.items():
        share, captured = _gains(y, p)
        ax.plot(share, captured, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="share of users contacted (by risk)",
        ylabel="share of churners captured",
        title=f"Cumulative gains{suffix}",
    )
    ax.legend(loc="lower right")
    save(fig, "gains")

    if importance is not None and importance.height:
        top = importance.head(top_features).reverse()
        fig, axes = plt.subplots(1, 2, figsize=(12, max(4, 0.3 * top.height + 1)))
        names = top["feature"].to_list()
        axes[0].barh(names, top["gain"].to_numpy())
        axes[0].set(title="LightGBM importance: gain", xlabel="total gain")
        axes[1].barh(names, top["mean_abs_shap"].fill_nan(0.0).to_numpy())
        axes[1].set(title="mean |SHAP| (log-odds)", xlabel="mean |contribution|")
        fig.tight_layout()
        save(fig, "importance")
    return paths
