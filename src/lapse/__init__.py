"""lapse: churn and replenishment modeling from customer event streams."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from lapse.config import LapseConfig, load_config
from lapse.exceptions import LapseError

if TYPE_CHECKING:
    from lapse.model import ChurnModel, ReplenishmentModel

try:
    __version__ = version("lapse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ChurnModel",
    "LapseConfig",
    "LapseError",
    "ReplenishmentModel",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    """The estimators load on first use, so ``import lapse`` stays as light as the config."""
    if name in ("ChurnModel", "ReplenishmentModel"):
        from lapse import model

        return getattr(model, name)
    raise AttributeError(f"module 'lapse' has no attribute {name!r}")
