from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from lapse.config import dump_config, load_config
from lapse.exceptions import ConfigError
from lapse.schema import ROLES

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_default_is_the_committed_default() -> None:
    embedded = resources.files("lapse").joinpath("default.yaml").read_text(encoding="utf-8")
    assert embedded == (REPO / "configs" / "default.yaml").read_text(encoding="utf-8")


def test_default_loads_with_every_role() -> None:
    config = load_config()
    assert config.origin == "<embedded default>"
    for role in ROLES:
        assert config.roles.of(role), f"default config leaves role {role} empty"
    assert config.roles.of("return") == ["order_returned"]
    assert config.roles.role_of("device_used") == ["usage", "consumption"]
    assert config.labels.horizon_days == 28


def test_user_file_is_complete_in_itself(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "roles:\n  purchase: [purchase]\n"))
    assert config.roles.of("purchase") == ["purchase"]
    assert config.roles.of("usage") == []  # not inherited from the generator's defaults
    assert config.features.windows == [7, 14, 28, 56, 90, 180, 365]


def test_empty_file_gives_model_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).segments.high == 0.9


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAPSE_HOME", raising=False)
    sub = tmp_path / "conf"
    sub.mkdir()
    config = load_config(write(sub, "source:\n  path: data/events.parquet\n"))
    monkeypatch.chdir(tmp_path)
    assert config.source.path is not None
    assert config.resolve(config.source.path) == sub.resolve() / "data" / "events.parquet"
    assert config.resolve("/abs/x.parquet") == Path("/abs/x.parquet")


def test_lapse_home_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAPSE_HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, "{}"))
    assert config.resolve("x") == (tmp_path / "home").resolve() / "x"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("rolez: {}\n", ["rolez", "unknown key"]),
        ("roles:\n  usage: app_open\n", ["roles.usage", "expected a list", "'app_open'"]),
        ("roles:\n  churned: [x]\n", ["roles.churned", "unknown key"]),
        (
            "features:\n  windows: [7, seven]\n",
            ["features.windows.1", "expected an integer", "'seven'"],
        ),
        ("labels:\n  horizon_days: 0\n", ["labels.horizon_days", "greater than 0"]),
        ("labels:\n  kind: sometimes\n", ["labels.kind", "'sometimes'"]),
        ("milestones:\n  - {name: m, event: e}\n", ["milestones.0", "exactly one of"]),
        (
            "source:\n  row_rules:\n    - {column: q, op: lt, event: return}\n",
            ["source.row_rules.0", "needs a single value"],
        ),
        (
            "source:\n  columns: {customer: CustomerID}\n",
            ["source", "unknown canonical names", "customer"],
        ),
        ("segments: {method: quantile, high: 0.2, medium: 0.5}\n", ["segments", "must not exceed"]),
        ("segments: {high: 0.6, medium: 0.3}\n", ["segments", "name the method"]),
    ],
)
def test_bad_values_name_key_value_and_expectation(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_unparsable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(write(tmp_path, "roles:\n  usage: [a\n  aha: b: c\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_dump_round_trips(tmp_path: Path) -> None:
    config = load_config()
    text = dump_config(config)
    data = yaml.safe_load(text)
    assert data["roles"]["return"] == ["order_returned"]
    again = load_config(write(tmp_path, text))
    assert again.model_dump() == config.model_dump()
