"""Pin the public surface: a change here is a deliberate API change."""

from __future__ import annotations

import lapse
import lapse.events
import lapse.exceptions
import lapse.features


def test_top_level() -> None:
    assert sorted(lapse.__all__) == ["LapseConfig", "LapseError", "__version__", "load_config"]


def test_events() -> None:
    assert sorted(lapse.events.__all__) == [
        "AttributesReport",
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
