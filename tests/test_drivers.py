"""Stickiness drivers: the generator's planted sticky behavior is found, its neutral one is not;
declared behaviors rank like the event types they restate; the plot and the encourage triggers."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from lapse.cli import app
from lapse.config import LapseConfig, load_config
from lapse.datasets import SyntheticData, generate, write
from lapse.exceptions import ConfigError
from lapse.features import build
from lapse.insights.drivers import (
    DriversResult,
    drivers_figure,
    encourage_snippet,
    stickiness_drivers,
    write_plot,
)
from lapse.triggers import ExprError, evaluate, resolve

STICKY, NEUTRAL = "second_device_added", "theme_changed"  # planted in lapse.datasets
PNG = b"\x89PNG\r\n\x1a\n"
# count-only milestones (at_counts: []) give lifetime counts of the planted events, and the
# declared behaviors restate the event types as conditions over those features
DECLARED: dict[str, Any] = {
    "milestones": [
        {"name": "devices", "event": STICKY, "at_counts": []},
        {"name": "themes", "event": NEUTRAL, "at_counts": []},
    ],
    "drivers": {
        "behaviors": {
            "two_devices": "milestone_devices_count >= 1",
            "themed": "milestone_themes_count > 0",
            "repeat_buyer": "order_count >= 2",
            "basic_plan": 'plan == "basic"',
        }
    },
}


def _default_raw() -> dict[str, Any]:
    text = resources.files("lapse").joinpath("default.yaml").read_text(encoding="utf-8")
    raw: dict[str, Any] = yaml.safe_load(text)
    return raw


def _config(tmp: Path, *parts: dict[str, Any]) -> LapseConfig:
    """The default config with ``parts`` merged in (milestones appended), loaded from a file."""
    raw = _default_raw()
    for part in parts:
        for key, value in part.items():
            if key == "milestones":
                raw["milestones"] = [*raw.get("milestones", []), *value]
            elif isinstance(value, dict):
                raw[key] = {**(raw.get(key) or {}), **value}
            else:
                raw[key] = value
    path = tmp / "lapse.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_config(path)


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(n_users=3000, n_days=240, seed=7)


@pytest.fixture(scope="module")
def declared(
    data: SyntheticData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LapseConfig, DriversResult]:
    config = _config(tmp_path_factory.mktemp("declared"), DECLARED)
    return config, stickiness_drivers(data.events.lazy(), config, attributes=data.users)


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
    assert set(table["kind"]) == {"event"}


def test_declared_behaviors_rank_like_the_event_types_they_restate(
    declared: tuple[LapseConfig, DriversResult],
) -> None:
    _, result = declared
    rows = {r["behavior"]: r for r in result.table.iter_rows(named=True)}
    assert {rows[n]["kind"] for n in DECLARED["drivers"]["behaviors"]} == {"condition"}
    assert rows[STICKY]["kind"] == "event"
    # adopted on the point-in-time feature rows: the same users at the same cutoffs
    for name, event in (("two_devices", STICKY), ("themed", NEUTRAL)):
        for col in ("adopters", "non_adopters", "lift", "ci_low", "ci_high"):
            assert rows[name][col] == pytest.approx(rows[event][col]), (name, col)
    assert rows["two_devices"]["driver"] and rows["two_devices"]["ci_low"] > 0
    assert not rows["themed"]["driver"]
    assert rows["themed"]["ci_low"] < 0 < rows["themed"]["ci_high"]
    assert set(result.table["behavior"][:2]) == {STICKY, "two_devices"}
    # an attribute condition is a behavior too; the planted plans do not make anyone stick
    assert not rows["basic_plan"]["driver"]


def test_forest_plot_is_a_png(declared: tuple[LapseConfig, DriversResult], tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's backend: drawing and saving must leave it alone
    try:
        figure = drivers_figure(declared[1])
        path = write_plot(declared[1], tmp_path / "plots" / "drivers.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
    assert len(figure.axes) == 1 and len(figure.axes[0].get_yticks()) == declared[1].table.height
    head = path.read_bytes()[:24]
    assert head[:8] == PNG and head[12:16] == b"IHDR"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 400 and height > 400


@pytest.mark.parametrize("which", ["event_types", "declared"])
def test_encourage_triggers_load_and_fire_exactly_for_non_adopters(
    which: str,
    data: SyntheticData,
    declared: tuple[LapseConfig, DriversResult],
    tmp_path: Path,
) -> None:
    if which == "declared":
        config, result = declared
        parts: tuple[dict[str, Any], ...] = (DECLARED,)
    else:
        config = load_config()
        result = stickiness_drivers(data.events.lazy(), config)
        parts = ()
    snippet = encourage_snippet(result, config)
    text = yaml.safe_dump(snippet, sort_keys=False)
    drivers = result.table.filter(pl.col("driver"))
    names = [f"encourage_{b}" for b in drivers["behavior"][: config.drivers.encourage_top]]
    assert list(snippet["triggers"]) == names and len(names) == (2 if not parts else 3)
    if which == "event_types":  # an event without a milestone gets a count-only one
        assert {"name": STICKY, "event": STICKY, "at_counts": []} in snippet["milestones"]
    else:  # an event a configured milestone counts reuses it
        assert snippet["triggers"][f"encourage_{STICKY}"]["when"] == "milestone_devices_count == 0"
        assert "encourage_two_devices" in snippet["triggers"]

    merged = _config(tmp_path, *parts, yaml.safe_load(text))
    as_of = datetime(2026, 6, 1, tzinfo=result.as_of.tzinfo)
    frame = build(data.events.lazy(), as_of, merged, attributes=data.users)
    fired = evaluate(frame, resolve(merged, frame.schema))
    assert frame.height > 1000
    before = data.events.filter(pl.col("ts") < as_of)
    for name in names:
        behavior = name.removeprefix("encourage_")
        event = {"two_devices": STICKY}.get(behavior, behavior)
        adopters = set(before.filter(pl.col("event") == event)["user_id"])
        firing = set(fired.filter(pl.col(name))["user_id"])
        assert firing == set(frame["user_id"]) - adopters, name
        assert 0 < len(firing) < frame.height
    # count-only milestones never fire the milestone trigger
    assert not frame["milestone_" + (STICKY if not parts else "devices") + "_crossed_7d"].any()


def test_a_bad_behavior_condition_names_its_key(data: SyntheticData, tmp_path: Path) -> None:
    typo = {"drivers": {"behaviors": {"repeat": "order_cnt >= 2"}}}
    with pytest.raises(ExprError, match=r"drivers\.behaviors\.repeat: .*order_count"):
        stickiness_drivers(data.events.lazy(), _config(tmp_path, typo))
    mixed = {"drivers": {"behaviors": {"odd": 'plan >= "basic" + 1'}}}
    with pytest.raises(ExprError, match=r"drivers\.behaviors\.odd"):
        stickiness_drivers(data.events.lazy(), _config(tmp_path, mixed), attributes=data.users)
    with pytest.raises(ConfigError, match=r"drivers\.behaviors\.cut: .*\n.*order_count >= \n"):
        _config(tmp_path, {"drivers": {"behaviors": {"cut": "order_count >= "}}})
    with pytest.raises(ConfigError, match=r"drivers\.behaviors\.2x\.\[key\]: a behavior name"):
        _config(tmp_path, {"drivers": {"behaviors": {"2x": "true"}}})
    clash = {"drivers": {"behaviors": {STICKY: "order_count >= 2"}}}
    with pytest.raises(ConfigError, match=rf"drivers\.behaviors\.{STICKY}: an event type"):
        stickiness_drivers(data.events.lazy(), _config(tmp_path, clash))


def test_drivers_command_prints_the_table_and_the_caveat(
    data: SyntheticData, tmp_path: Path, _isolated_home: Path
) -> None:
    files = write(data, tmp_path / "data")
    res = CliRunner().invoke(app, ["drivers", str(files["events"])])
    assert res.exit_code == 0, res.output
    assert STICKY in res.output and "proof of cause" in res.output
    late = CliRunner().invoke(app, ["drivers", str(files["events"]), "--as-of", "2026-08-20"])
    assert late.exit_code != 0 and "label window runs past the end" in late.output


def test_drivers_command_writes_table_plot_and_triggers(
    data: SyntheticData, tmp_path: Path, _isolated_home: Path
) -> None:
    files = write(data, tmp_path / "data")
    out, snippet = tmp_path / "report", tmp_path / "encourage.yaml"
    config = tmp_path / "lapse.yaml"  # written by _config: the default plus one declared behavior
    _config(tmp_path, {"drivers": {"behaviors": {"repeat_buyer": "order_count >= 2"}}})
    args = ["drivers", str(files["events"]), "--config", str(config), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--triggers", str(snippet)])
    assert res.exit_code == 0, res.output
    assert "repeat_buyer*" in res.output and "* declared in drivers.behaviors" in res.output
    table = pl.read_csv(out / "drivers.csv")
    assert table["behavior"][0] == STICKY and table.columns[:2] == ["behavior", "kind"]
    assert table.filter(pl.col("behavior") == "repeat_buyer")["kind"].to_list() == ["condition"]
    assert (out / "drivers.png").read_bytes()[:8] == PNG
    text = snippet.read_text(encoding="utf-8")
    assert "proof of cause" in text and f"encourage_{STICKY}:" in text
    assert str(out / "drivers.png") in res.output.replace("\n", "")
    _config(tmp_path, {"drivers": {"behaviors": {"repeat": "order_cnt >= 2"}}})
    res = CliRunner().invoke(app, ["drivers", str(files["events"]), "--config", str(config)])
    assert res.exit_code == 2 and "drivers.behaviors.repeat" in res.output
