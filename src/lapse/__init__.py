"""lapse: churn and replenishment modeling from customer event streams."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lapse.config import LapseConfig, load_config
from lapse.exceptions import LapseError

try:
    __version__ = version("lapse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["LapseConfig", "LapseError", "__version__", "load_config"]
