"""The replenishment race in a child process (`lapse train` on 2+ cores): the same
results as in process, its skips and failures said the same way, no child left behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from lapse.config import LapseConfig, load_config
from lapse.datasets import generate, write
from lapse.events.identity import empty_links
from lapse.exceptions import FitWarning, LapseError, NotEnoughEpisodes
from lapse.modeling import ChurnBundle
from lapse.train import worker as worker_module
from lapse.train.churn import TrainResult, train
from lapse.train.worker import ChurnFigures, Race, ReplenishmentWorker, start

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="one core: the race runs in process"
)


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    write(generate(n_users=400, n_days=180, seed=5), out)
    return out / "events.parquet"


def _both(events: Path, config: LapseConfig, tmp_path: Path) -> tuple[TrainResult, TrainResult]:
    runs = []
    for parallel in (False, True):
        where = tmp_path / ("child" if parallel else "inline")
        runs.append(
            train(
                events,
                config,
                out_dir=where / "report",
                models_dir=where / "models",
                parallel=parallel,
            )
        )
    return runs[0], runs[1]


def _close(a: Any, b: Any) -> bool:
    """Equal, floats to 12 digits (BLAS may sum in another order in the child)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) or (a != a and b != b)
    return bool(a == b)


def test_the_child_gives_the_in_process_race(events: Path, tmp_path: Path) -> None:
    inline, child = _both(events, load_config(), tmp_path)
    assert inline.replenishment is not None and child.replenishment is not None
    first = json.loads(inline.metrics_path.read_text())
    again = json.loads(child.metrics_path.read_text())
    assert list(again) == ["churn", "replenishment", "segments"]  # the same places
    assert _close(first, again)
    assert child.notes == inline.notes
    assert child.replenishment.selected == inline.replenishment.selected
    # its PNGs written by the child into the report folder, its figures back in the parent
    for name in ("replenishment_km", "replenishment_calibration"):
        assert child.plots[name].parent == child.out_dir
        assert child.plots[name].read_bytes()[:4] == b"\x89PNG"
        assert child.figures[name].axes
    report = child.report_path.read_text()
    assert report.replace(str(child.out_dir), "") == inline.report_path.read_text().replace(
        str(inline.out_dir), ""
    )
    shipped = ChurnBundle.load(child.bundle_path).extras["replenishment"]
    assert shipped.selected == inline.replenishment.selected
    assert shipped.skus == inline.replenishment.model.skus


def test_too_few_episodes_in_the_child_is_the_same_note(events: Path, tmp_path: Path) -> None:
    config = load_config()
    long = config.replenishment.model_copy(update={"follow_up_days": 95})
    inline, child = _both(events, config.model_copy(update={"replenishment": long}), tmp_path)
    assert inline.replenishment is None and child.replenishment is None
    assert child.notes == inline.notes
    assert any(n.startswith("replenishment skipped: only ") for n in child.notes)
    assert "replenishment" not in json.loads(child.metrics_path.read_text())


def test_a_child_that_dies_is_one_line_naming_its_exit(tmp_path: Path) -> None:
    worker = start()
    assert worker is not None
    try:
        worker.proc.kill()
        with pytest.raises(LapseError, match=r"process \(pid \d+\) exited with code -9 before"):
            worker.result()
    finally:
        worker.close()
    assert not worker.folder.exists()


def test_the_child_ends_when_its_parent_closes_the_pipe() -> None:
    worker = start()
    assert worker is not None
    try:
        assert worker.proc.stdin is not None
        worker.proc.stdin.close()  # as when the parent fails or dies before sending
        assert worker.proc.wait(timeout=60) == 0
    finally:
        worker.close()
    assert not worker.folder.exists()


def test_the_child_s_warnings_and_error_come_back_as_they_were() -> None:
    """What the child hands back (its warnings as recorded, a LapseError) is raised again in
    the parent, under the parent's filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("a fit fell back", FitWarning, stacklevel=1)
    recorded = [(w.message, w.category, w.filename, w.lineno, __name__) for w in caught]
    worker = start()
    assert worker is not None
    try:
        assert worker.proc.stdin is not None
        worker.proc.stdin.close()
        worker.proc.wait(timeout=60)
        outcome = ("error", NotEnoughEpisodes("only 3 observed reorders"), recorded)
        (worker.folder / "output.pkl").write_bytes(worker_module._output(outcome))
        with (
            pytest.warns(FitWarning, match="a fit fell back"),
            pytest.raises(NotEnoughEpisodes, match=r"^only 3 observed reorders$"),
        ):
            worker.result()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the parent's filters decide
            with pytest.raises(FitWarning):
                worker.result()
    finally:
        worker.close()


class _TwoArgs(Exception):
    """Pickles (its args) but cannot be rebuilt from them: ``__init__`` wants two."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} at {where}")


def test_an_error_pickle_cannot_rebuild_comes_back_as_a_lapse_error_saying_it() -> None:
    status, value, caught = pickle.loads(
        worker_module._output(("error", _TwoArgs("a bad fit", "cutoff 3"), []))
    )
    assert (status, type(value), str(value), caught) == (
        "error",
        LapseError,
        "_TwoArgs: a bad fit at cutoff 3",
        [],
    )
    ok = ("ok", {"metrics": [1.0, 2.0]}, [])
    assert pickle.loads(worker_module._output(ok)) == ok


def _job(out_dir: Path) -> ChurnFigures:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(np.float64)
    probas = {name: np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1) for name in ("a", "b")}
    importance = pl.DataFrame(
        {"feature": ["recency", "orders"], "gain": [3.0, 1.0], "mean_abs_shap": [0.2, 0.1]}
    )
    return ChurnFigures(y, probas, importance, title="test cutoff", out_dir=out_dir)


@contextlib.contextmanager
def _idle_child(events: Path, tmp_path: Path) -> Iterator[ReplenishmentWorker]:
    """A child whose race, on no events, ended at once (too few episodes): idle."""
    worker = start()
    assert worker is not None
    try:
        canonical = pl.read_parquet(events).head(0)
        when = datetime(2026, 6, 1, tzinfo=UTC)
        worker.send(
            Race(canonical.lazy(), load_config(), when, tmp_path / "r", None, empty_links())
        )
        while not (worker.folder / "output.pkl").exists():
            assert worker.proc.poll() is None
            time.sleep(0.01)
        yield worker
    finally:
        worker.close()


def test_an_idle_child_draws_the_churn_figures_as_this_process_would(
    events: Path, tmp_path: Path
) -> None:
    """Once its race is done, the child draws the churn figures handed to it: the same PNG
    bytes and figures as drawn here; the race's own outcome is still there."""
    here = _job(tmp_path / "here").draw()
    with _idle_child(events, tmp_path) as worker:
        job = _job(tmp_path / "child")
        assert worker.draw(job)
        figures, plots = worker.drawn(job)
        with pytest.raises(NotEnoughEpisodes):
            worker.result()
    assert list(plots) == list(here[1]) == ["roc", "pr", "calibration", "gains", "importance"]
    for name, path in plots.items():
        assert path == tmp_path / "child" / f"{name}.png"
        assert path.read_bytes() == here[1][name].read_bytes()
        assert [a.get_title() for a in figures[name].axes] == [
            a.get_title() for a in here[0][name].axes
        ]


def test_a_busy_child_is_not_handed_the_figures_and_a_gone_one_leaves_them_here(
    events: Path, tmp_path: Path
) -> None:
    """Before its race is done the child is not handed the figures (drawn here; it then ends
    after its race); a child that dies with the figures handed over leaves them to be drawn
    here, the same."""
    busy = start()
    assert busy is not None
    try:
        assert not busy.draw(_job(tmp_path / "busy"))  # nothing sent yet: not done
        assert busy.proc.wait(timeout=60) == 0  # "done" before "go": it ends
    finally:
        busy.close()
    with _idle_child(events, tmp_path) as gone:
        job = _job(tmp_path / "gone")
        assert gone.draw(job)
        gone.proc.kill()
        gone.proc.wait()
        (gone.folder / "figures-output.pkl").unlink(missing_ok=True)  # killed before writing
        figures, plots = gone.drawn(job)
    assert (
        sorted(figures)
        == sorted(plots)
        == sorted(["roc", "pr", "calibration", "gains", "importance"])
    )
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.values())
