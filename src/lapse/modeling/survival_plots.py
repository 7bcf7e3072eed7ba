"""Replenishment report plots as PNG: KM vs predicted by risk group, calibration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lapse.files import save_figure
from lapse.modeling.survival_metrics import HORIZONS, calibration_error, kaplan_meier

__all__ = ["write_survival_plots"]

FloatArray = npt.NDArray[np.float64]


def write_survival_plots(
    out_dir: Path,
    durations: FloatArray,
    observed: npt.NDArray[np.bool_],
    times: Sequence[float],
    curves: dict[str, FloatArray],
    medians: dict[str, FloatArray],
    selected: str,
    *,
    title: str = "",
) -> dict[str, Path]:
    """Write ``replenishment_km.png`` and ``replenishment_calibration.png``.

    ``curves[name]`` is ``P(no reorder by t)`` at ``times`` per row; the risk
    groups are the terciles of the selected model's predicted median days.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f" ({title})" if title else ""
    tt = np.asarray(times, dtype=np.float64)
    paths: dict[str, Path] = {}

    fig, ax = plt.subplots(figsize=(7, 5))
    order = np.argsort(medians[selected], kind="stable")
    labels = ("soonest third", "middle third", "latest third")
    for k, (idx, label) in enumerate(zip(np.array_split(order, 3), labels, strict=True)):
        if idx.size == 0:
            continue
        colour = f"C{k}"
        grid = np.concatenate([[0.0], tt])
        km = kaplan_meier(durations[idx], observed[idx], grid)
        ax.step(grid, km, where="post", color=colour, label=f"{label}: Kaplan-Meier (n={idx.size})")
        pred = np.concatenate([[1.0], curves[selected][idx].mean(axis=0)])
        ax.plot(grid, pred, color=colour, ls="--", label=f"{label}: {selected}")
    ax.set(
        xlabel="days after the cutoff",
        ylabel="share without a reorder",
        ylim=(0, 1.02),
        title=f"Observed vs predicted, by predicted risk{suffix}",
    )
    ax.legend(fontsize=7, loc="lower left")
    path = out_dir / "replenishment_km.png"
    save_figure(fig, path)
    plt.close(fig)
    paths["replenishment_km"] = path

    fig, axes = plt.subplots(1, len(HORIZONS), figsize=(5 * len(HORIZONS), 4.5))
    for ax, h in zip(axes, HORIZONS, strict=True):
        k = int(np.argmin(np.abs(tt - h)))
        for name, surv in curves.items():
            _, pred, obs = calibration_error(durations, observed, 1.0 - surv[:, k], h)
            ax.plot(pred, obs, marker="o", ms=3, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(
            xlabel=f"predicted P(reorder within {h} days)",
            ylabel="observed share (1 - KM)",
            title=f"{h} days{suffix}",
        )
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out_dir / "replenishment_calibration.png"
    save_figure(fig, path)
    plt.close(fig)
    paths["replenishment_calibration"] = path
    return paths
