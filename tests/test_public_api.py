"""Pin the public surface: a change here is a deliberate API change."""

from __future__ import annotations

import ast
import graphlib
import importlib
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
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
        "read_events_with_links",
        "read_links",
        "read_user_events",
        "scan_source",
        "validate_events",
        "validate_with_links",
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


def _own_imports() -> Iterator[tuple[str, str, str | None, bool]]:
    """``(module, imported module, name or None, at module top)`` for every import of lapse's
    own code; those under ``if TYPE_CHECKING:`` never run and are left out."""
    root = Path(lapse.__file__).parent
    files = {
        ".".join(("lapse", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }

    def walk(node: ast.AST, module: str, top: bool) -> Iterator[tuple[str, str, str | None, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("lapse"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    if sub in files:
                        yield module, sub, None, top
                    else:
                        yield module, child.module or "", alias.name, top
            elif isinstance(child, ast.Import):
                yield from (
                    (module, a.name, None, top) for a in child.names if a.name.startswith("lapse")
                )
            inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from walk(child, module, top and not inside)

    for module, path in files.items():
        yield from walk(ast.parse(path.read_text(encoding="utf-8")), module, True)


def test_no_import_cycles() -> None:
    """lapse's modules import one way: the module-top imports form no cycle."""
    graph: dict[str, set[str]] = {}
    for module, imported, _, top in _own_imports():
        graph.setdefault(module, set())
        if top and imported != module:
            graph[module].add(imported)
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming one


def test_own_imports_sit_at_module_top() -> None:
    """Only the CLI imports its jobs lazily (a light ``lapse --help``); the rest say why."""
    lazy = {(m, i) for m, i, _, top in _own_imports() if not top and m != "lapse.cli"}
    assert lazy == {
        ("lapse", "lapse.model"),  # the estimators load on first use: `import lapse` stays light
        ("lapse.modeling.plots", "lapse.modeling._figure"),  # matplotlib, only to draw
    }


def test_no_private_names_across_modules() -> None:
    """No ``_name`` is imported from another module, nor a ``_module`` from outside its package."""
    crossing = [
        (module, imported, name)
        for module, imported, name, _ in _own_imports()
        if (name is not None and name.startswith("_") and not name.startswith("__"))
        or any(
            part.startswith("_") and not module.startswith(imported.rsplit(".", 1)[0])
            for part in imported.split(".")
        )
    ]
    assert crossing == []
