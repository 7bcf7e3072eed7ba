"""Pin the public surface: a change here is a deliberate API change."""

from __future__ import annotations

import importlib
import sys

import pytest

import lapse
import lapse.events
import lapse.exceptions
import lapse.features


def test_top_level() -> None:
    assert sorted(lapse.__all__) == [
        "ChurnModel",
        "LapseConfig",
        "LapseError",
        "ReplenishmentModel",
        "__version__",
        "load_config",
    ]


def test_events() -> None:
    assert sorted(lapse.events.__all__) == [
        "AttributesReport",
        "EventSource",
        "REJECT_REASONS",
        "ValidationReport",
        "event_files",
        "init_config",
        "load_attributes",
        "map_events",
        "new_event_users",
        "read_attributes",
        "read_events",
        "read_links",
        "read_user_events",
        "scan_source",
        "validate_events",
    ]


def test_features() -> None:
    assert {"build", "build_many", "build_sku", "FEATURES", "expand", "markdown_table"} <= set(
        lapse.features.__all__
    )


def test_every_exception_is_a_lapse_error() -> None:
    for name in lapse.exceptions.__all__:
        assert issubclass(getattr(lapse.exceptions, name), lapse.LapseError)


@pytest.mark.parametrize(
    ("old", "name", "home"),
    [
        ("lapse.training", "train", "lapse.train.churn"),
        ("lapse.replenishment", "run_replenishment", "lapse.train.replenishment"),
        ("lapse.scoring", "score_users", "lapse.score.records"),
        ("lapse.pipeline", "run_score", "lapse.score.run"),
        ("lapse.pipeline", "run_triggers", "lapse.score.trigger_run"),
        ("lapse.pipeline", "run_features", "lapse.jobs"),
    ],
)
def test_moved_modules_still_import_and_say_where(old: str, name: str, home: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=home.rsplit(".", 1)[0]):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)
