"""Pin the public surface: a change here is a deliberate API change."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import warnings
from types import ModuleType

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


def _lapse_modules() -> list[ModuleType]:
    """Every module of the package, the deprecated aliases included (imported quietly)."""
    names = [m.name for m in pkgutil.walk_packages(lapse.__path__, "lapse.")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [lapse, *(importlib.import_module(n) for n in names)]


def _drawn_tree(doc: str) -> dict[str, str | None]:
    """Class name -> parent as drawn in a docstring's tree (four columns per level)."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for m in re.finditer(r"^    ([│├└─ ]*)([A-Z]\w+)", doc, re.MULTILINE):
        depth = len(m[1]) // 4
        path[depth:] = [m[2]]
        parents[m[2]] = path[depth - 1] if depth else None
    return parents


def test_every_exception_is_a_lapse_error() -> None:
    """One tree: every exception class lapse defines or re-exports lives in lapse.exceptions,
    derives from LapseError (FitWarning is a warning category, never raised) and sits
    where the module's docstring draws it."""
    found = {
        obj
        for module in _lapse_modules()
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__.startswith("lapse")
    }
    assert {cls.__name__ for cls in found} == set(lapse.exceptions.__all__)
    drawn = _drawn_tree(lapse.exceptions.__doc__ or "")
    for cls in found:
        assert cls.__module__ == "lapse.exceptions", cls
        assert getattr(lapse.exceptions, cls.__name__) is cls
        (base,) = cls.__bases__
        assert drawn.get(cls.__name__, "not drawn") == (
            None if base is Exception else base.__name__
        ), cls
        if cls is lapse.exceptions.FitWarning:
            assert issubclass(cls, UserWarning) and not issubclass(cls, lapse.LapseError)
        else:
            assert issubclass(cls, lapse.LapseError), cls


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
