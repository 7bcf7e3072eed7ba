"""Replenishment report figures: KM vs predicted by risk group, calibration.

Built with matplotlib's object API like :mod:`lapse.modeling.plots` (the
backend is never changed); :func:`lapse.modeling.plots.save_figures` writes the PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from lapse.modeling.plots import new_figure
from lapse.modeling.survival_metrics import HORIZONS, calibration_error, kaplan_meier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["survival_figures"]

FloatArray = npt.NDArray[np.float64]


def survival_figures(
    durations: FloatArray,
    observed: npt.NDArray[np.bool_],
    times: Sequence[float],
    curves: dict[str, FloatArray],
    medians: dict[str, FloatArray],
    selected: str,
    *,
    title: str = "",
) -> dict[str, Figure]:
    """``replenishment_km`` and ``replenishment_calibration``.

    ``curves[name]`` is ``P(no reorder by t)`` at ``times`` per row; the risk
    groups are the terciles of the selected model's predicted median days.
    """
    suffix = f" ({title})" if title else ""
    tt = np.asarray(times, dtype=np.float64)

    km_fig = new_figure((7, 5))
    ax = km_fig.subplots()
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

    cal_fig = new_figure((5 * len(HORIZONS), 4.5))
    axes = cal_fig.subplots(1, len(HORIZONS))
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
    cal_fig.tight_layout()
    return {"replenishment_km": km_fig, "replenishment_calibration": cal_fig}
