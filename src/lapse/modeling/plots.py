"""Report figures: ROC, PR, calibration, gains, importance and segments.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`),
never through pyplot and never by switching the backend: a notebook keeps its
own backend and shows the returned figures inline (they carry a PNG repr).
:func:`save_figures` writes them as PNG through the Agg canvas.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.files import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["churn_figures", "new_figure", "save_figures", "segment_figure", "write_plots"]

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


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure of the object API (no pyplot): saved through its Agg canvas, shown
    inline in Jupyter by its PNG repr (:class:`lapse.modeling._figure.ReportFigure`)."""
    from lapse.modeling._figure import ReportFigure  # loads matplotlib: only to draw

    return ReportFigure(figsize)


def save_figures(figures: Mapping[str, Figure], out_dir: Path) -> dict[str, Path]:
    """Write each figure as ``out_dir/<name>.png`` (atomically: :func:`lapse.files.save_figure`);
    return the paths by name."""
    return {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}


def churn_figures(
    y: FloatArray,
    probas: dict[str, FloatArray],
    importance: pl.DataFrame | None = None,
    *,
    title: str = "",
    top_features: int = 20,
) -> dict[str, Figure]:
    """``roc``, ``pr``, ``calibration``, ``gains`` and (with ``importance``) ``importance``
    (gain and mean |SHAP|) of the candidates' probabilities ``probas`` against ``y``."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    figures: dict[str, Figure] = {}
    suffix = f" ({title})" if title else ""

    fig = figures["roc"] = new_figure((6, 5))
    ax = fig.subplots()
    for name, p in probas.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC{suffix}")
    ax.legend(loc="lower right")

    fig = figures["pr"] = new_figure((6, 5))
    ax = fig.subplots()
    for name, p in probas.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=name)
    ax.axhline(float(y.mean()), color="k", ls=":", lw=1)
    ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall{suffix}")
    ax.legend(loc="upper right")

    fig = figures["calibration"] = new_figure((6, 5))
    ax = fig.subplots()
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

    fig = figures["gains"] = new_figure((6, 5))
    ax = fig.subplots()
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

    if importance is not None and importance.height:
        top = importance.head(top_features).reverse()
        fig = figures["importance"] = new_figure((12, max(4, 0.3 * top.height + 1)))
        axes = fig.subplots(1, 2)
        names = top["feature"].to_list()
        axes[0].barh(names, top["gain"].to_numpy())
        axes[0].set(title="LightGBM importance: gain", xlabel="total gain")
        axes[1].barh(names, top["mean_abs_shap"].fill_nan(0.0).to_numpy())
        axes[1].set(title="mean |SHAP| (log-odds)", xlabel="mean |contribution|")
        fig.tight_layout()
    return figures


def segment_figure(table: pl.DataFrame, *, title: str = "") -> Figure:
    """Customers per risk segment (bars) and each segment's observed churn rate (dots).

    ``table`` has ``segment``, ``customers`` and ``churn_rate`` (null for an empty
    segment), one row per segment in display order.
    """
    fig = new_figure((6, 4))
    ax = fig.subplots()
    names = table["segment"].to_list()
    bars = ax.bar(names, table["customers"].to_numpy(), color="0.75")
    ax.bar_label(bars, labels=[f"{n:,}" for n in table["customers"]], fontsize=8)
    ax.set(ylabel="customers", title=f"Risk segments{f' ({title})' if title else ''}")
    rate = ax.twinx()
    rate.plot(names, table["churn_rate"].fill_null(float("nan")).to_numpy(), "o-", color="C3")
    rate.set_ylim(0, 1)
    rate.set_ylabel("observed churn rate", color="C3")
    return fig


def write_plots(
    out_dir: Path,
    y: FloatArray,
    probas: dict[str, FloatArray],
    importance: pl.DataFrame | None = None,
    *,
    title: str = "",
    top_features: int = 20,
) -> dict[str, Path]:
    """Write :func:`churn_figures` as ``roc.png``, ``pr.png``, ``calibration.png``,
    ``gains.png`` and ``importance.png`` into ``out_dir``; return their paths."""
    figures = churn_figures(y, probas, importance, title=title, top_features=top_features)
    return save_figures(figures, out_dir)
