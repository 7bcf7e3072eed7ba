"""The figure class of lapse's plots: a matplotlib ``Figure`` that shows itself in Jupyter.

A bare ``Figure`` (object API, no pyplot) displays only as text in a kernel that
has not drawn with pyplot yet; ``_repr_png_`` makes the figures lapse returns
show inline whatever the backend, which lapse never changes. Imported on first
plot (it imports matplotlib).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["ReportFigure"]


class ReportFigure(Figure):
    """A ``Figure`` with an Agg canvas (to save it) and a PNG repr (to show it)."""

    def __init__(self, figsize: tuple[float, float]) -> None:
        super().__init__(figsize=figsize)
        FigureCanvasAgg(self)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return buffer.getvalue()
