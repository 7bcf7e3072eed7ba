"""Stickiness drivers: the generator's planted sticky behavior is found, its neutral one is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import load_config
from lapse.datasets import SyntheticData, generate, write
from lapse.drivers import stickiness_drivers

STICKY, NEUTRAL = "second_device_added", "theme_changed"  # planted in lapse.datasets


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(n_users=3000, n_days=240, seed=7)


def test_drivers_recover_the_sticky_behavior_and_not_the_neutral_one(data: SyntheticData) -> None:
    result = stickiness_drivers(data.events.lazy(), load_config())
    table = result.table
    rows = {r["behavior"]: r for r in table.iter_rows(named=True)}
    assert table["behavior"][0] == STICKY and rows[STICKY]["driver"]
    assert rows[STICKY]["ci_low"] > 0
    assert not rows[NEUTRAL]["driver"]
    assert rows[NEUTRAL]["ci_low"] < 0 < rows[NEUTRAL]["ci_high"]
    # compared at similar activity: the raw gap of theme changers is mostly selection
    raw = rows[NEUTRAL]["retained_adopters"] - rows[NEUTRAL]["retained_non_adopters"]
    assert abs(rows[NEUTRAL]["lift"]) < raw
    # the activity roles are the outcome, never a behavior
    assert "app_open" not in rows and "order_completed" not in rows
    assert len(result.cutoffs) == 4 and all(c <= result.as_of for c in result.cutoffs)


def test_drivers_command_prints_the_table_and_the_caveat(
    data: SyntheticData, tmp_path: Path, _isolated_home: Path
) -> None:
    files = write(data, tmp_path / "data")
    res = CliRunner().invoke(app, ["drivers", str(files["events"])])
    assert res.exit_code == 0, res.output
    assert STICKY in res.output and "proof of cause" in res.output
    late = CliRunner().invoke(app, ["drivers", str(files["events"]), "--as-of", "2026-08-20"])
    assert late.exit_code != 0 and "label window runs past the end" in late.output
