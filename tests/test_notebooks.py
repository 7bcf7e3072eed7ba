"""Every notebook under ``notebooks/`` runs top to bottom in a fresh kernel, on small data.

Each notebook executes with nbclient in its own kernel (the interpreter running the
tests), with ``LAPSE_NOTEBOOK_SMALL=1`` and a temporary working directory; a cell that
raises fails the test with the notebook, the cell's source and the error. A warning a
cell prints fails it too, as ``filterwarnings = error`` does for the rest of the suite.
The stored notebooks must have no outputs and no execution counts, and must use lapse's
public API only. A cell that shows lapse's figures (``.figures``) must hold an ``image/png``
output once executed: they show inline on the kernel's default backend.
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from traitlets.config import Config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = (
    "01_quickstart_churn.ipynb",
    "02_replenishment.ipynb",
    "03_review_and_promote.ipynb",
    "04_real_data_online_retail.ipynb",
)
CELL_TIMEOUT = 300  # seconds per cell; the slowest cell (training) takes about 10 s on 2 cores
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "Warning:" as Python's warnings module prints it ("file:line: SomeWarning: message")
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: .*$", re.MULTILINE)


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_are_all_there() -> None:
    assert tuple(p.name for p in _notebooks()) == EXPECTED


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(_code_cells(nb))
        if cell.outputs or cell.execution_count is not None
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
        "(Jupyter: Edit > Clear All Outputs, or `jupyter nbconvert --clear-output --inplace`)"
    )


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_uses_only_the_public_api(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    private: list[str] = []
    for cell in _code_cells(nb):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lapse"):
                names = [*(node.module or "").split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [
                    p for a in node.names if a.name.startswith("lapse") for p in a.name.split(".")
                ]
            else:
                continue
            private += [n for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"{path.name} imports private lapse names: {private}"


def _failure(path: Path, nb: Any, index: int | None, exc: Exception) -> str:
    """The notebook, the failing cell's number and source, and the error without colours."""
    if index is None:
        return f"{path.name}: {_ANSI.sub('', str(exc))}"
    return (
        f"{path.name}: cell {index} (counting every cell from 0) failed\n"
        f"--- cell source ---\n{nb.cells[index].source}\n"
        f"--- error ---\n{_ANSI.sub('', str(exc))}"
    )


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAPSE_NOTEBOOK_SMALL", "1")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        # local IPC sockets (in their own folder) rather than TCP on localhost
        config=Config(
            {
                "KernelManager": {
                    "transport": "ipc",
                    "ip": str(tmp_path_factory.mktemp("kernel") / "k"),
                }
            }
        ),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    current: list[int] = []
    client.on_cell_execute = lambda cell, cell_index: current.append(cell_index)
    started = time.monotonic()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        pytest.fail(_failure(path, nb, current[-1] if current else None, exc), pytrace=False)
    elapsed = time.monotonic() - started

    warned = [
        (i, line)
        for i, cell in enumerate(_code_cells(nb))
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stderr"
        for line in _WARNING.findall(out.text)
    ]
    assert not warned, f"{path.name} printed warnings (cell index, line): {warned}"
    # lapse's figures (``result.figures[...]``, ``model.figures_[...]``) show inline as they
    # are, on the kernel's default backend: every cell showing them holds a PNG
    blank = [
        i
        for i, cell in enumerate(_code_cells(nb))
        if ".figures" in cell.source
        and not any("image/png" in out.get("data", {}) for out in cell.outputs)
    ]
    assert not blank, f"{path.name}: cells {blank} show lapse figures but hold no image/png output"
    # the cwd must stay clean: notebooks write into their own temporary folders
    assert not list(tmp_path.iterdir()), f"{path.name} wrote {sorted(tmp_path.iterdir())}"
    print(f"{path.name}: {elapsed:.1f} s")
