"""Every test gets its own LAPSE_HOME, so default outputs (rejects files, the
MLflow store) never land in the working tree; tests about LAPSE_HOME override it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path_factory.mktemp("lapse_home")
    monkeypatch.setenv("LAPSE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
