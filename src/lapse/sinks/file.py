"""The file sink: a full snapshot of the records, Parquet or CSV by the extension of ``--out``.

Each batch becomes a part file named by its batch id, written to a temporary
name and renamed atomically, so a resent batch simply replaces its own part.
When every batch of a run is delivered the parts are merged, in outbox order,
into ``--out`` (again through an atomic rename) and removed. Parquet keeps the
list columns (``reasons``, ``triggers``) as lists; CSV holds them as JSON strings.

Ids stay exactly as scored. A text cell of a CSV that starts with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return is what a spreadsheet runs as a formula
(``=cmd|' /C calc'!A0``); the run warns once with their count (:meth:`FileSink.warnings`),
and ``sinks.file.spreadsheet_safe`` prefixes such cells with an apostrophe, in CSV only.
"""

from __future__ import annotations

import json
import shutil
from itertools import groupby, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import polars as pl

from lapse.exceptions import LapseError
from lapse.files import atomic_path
from lapse.sinks.base import RECORD_COLUMNS, RECORD_SCHEMA, Item, Limits, Outcome, Record, Sink

if TYPE_CHECKING:
    from lapse.config import LapseConfig

__all__ = ["FileSink", "read_records"]

_SUFFIXES = (".parquet", ".csv")
_LISTS = ("reasons", "triggers")
_FORMULA_START = r"^[=+\-@\t\r]"


class FileSink(Sink):
    """Writes the run's records to ``path`` (``.parquet`` or ``.csv``)."""

    name = "file"
    limits = Limits(max_items=100_000)
    full_snapshot = True
    anonymous_identifier = "user_id"  # lapse's own file: the id as scored

    def __init__(self, path: str | Path, *, spreadsheet_safe: bool = False) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in _SUFFIXES:
            raise LapseError(
                f"--out {self.path}: the file sink writes .parquet or .csv; "
                "choose a path with one of those extensions"
            )
        self.spreadsheet_safe = spreadsheet_safe
        self._formula_cells = 0

    @classmethod
    def from_config(cls, config: LapseConfig, *, out: Path | None = None) -> FileSink:
        return cls(
            out if out is not None else config.resolve("scores.parquet"),
            spreadsheet_safe=config.sinks.file.spreadsheet_safe,
        )

    def _parts(self, score_run_id: str) -> Path:
        return self.path.parent / f".{self.path.name}.parts" / score_run_id

    def encode(self, record: Record) -> Item | None:
        return self.encode_frame(pl.DataFrame([record]))[0]

    def encode_frame(self, records: pl.DataFrame) -> list[Item | None]:
        """Each record as a :class:`_Row` of one shared frame: no per-record copy."""
        frame = records.select(pl.col(c).cast(RECORD_SCHEMA[c]) for c in RECORD_COLUMNS)
        return list(map(_Row, repeat(frame), range(frame.height)))

    def payload(self, items: list[Item]) -> Any:
        return _gather(items).to_dicts()

    def send(self, batch_id: str, items: list[Item]) -> Outcome:
        frame = _gather(items)
        with atomic_path(self._parts(self._run) / f"{batch_id}.parquet") as tmp:
            frame.write_parquet(tmp)
        return Outcome()

    def open(self, score_run_id: str) -> None:
        self._run = score_run_id

    def finish(self, score_run_id: str) -> None:
        parts = self._parts(score_run_id)
        files = sorted(parts.glob("*.parquet")) if parts.exists() else []
        if files and self.path.suffix.lower() == ".parquet":
            # streamed part by part: the run's records are never all in memory at once
            _sink_parquet(pl.scan_parquet(files), self.path)
        else:
            frame = (
                pl.concat([pl.read_parquet(f) for f in files])
                if files
                else pl.DataFrame(schema=RECORD_SCHEMA)
            )
            self._formula_cells = write_records(
                frame, self.path, spreadsheet_safe=self.spreadsheet_safe
            )
        shutil.rmtree(parts, ignore_errors=True)
        if parts.parent.exists() and not any(parts.parent.iterdir()):
            parts.parent.rmdir()

    def describe(self) -> str:
        return f"file {self.path}"

    def warnings(self) -> list[str]:
        if not self._formula_cells or self.spreadsheet_safe:
            return []
        return [
            f"{self._formula_cells:,} text cells of {self.path.name} start with =, +, -, @, a "
            "tab or a carriage return, which a spreadsheet may run as a formula; set "
            "sinks.file.spreadsheet_safe: true to prefix them with an apostrophe (CSV only)"
        ]


class _Row(NamedTuple):
    """The file sink's item: row ``at`` of a frame of records."""

    frame: pl.DataFrame
    at: int


def _gather(items: list[_Row]) -> pl.DataFrame:
    """The records of ``items``, in order (consecutive rows of one frame are taken at once)."""
    parts = []
    for _, run in groupby(items, key=lambda row: id(row.frame)):
        rows = list(run)
        parts.append(rows[0].frame[[row.at for row in rows]])
    return pl.concat(parts) if parts else pl.DataFrame(schema=RECORD_SCHEMA)


def _sink_parquet(frame: pl.LazyFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.sink_parquet(tmp)


def _formula_like(column: str) -> pl.Expr:
    """Whether a text cell starts like a spreadsheet formula (=, +, -, @, tab, CR)."""
    return pl.col(column).str.contains(_FORMULA_START).fill_null(False)


def write_records(frame: pl.DataFrame, path: Path, *, spreadsheet_safe: bool = False) -> int:
    """Write records to Parquet or CSV (list columns as JSON strings), atomically.

    Returns the CSV's formula-like text cells (see the module docstring), prefixed with an
    apostrophe when ``spreadsheet_safe``; 0 for Parquet.
    """
    found = 0
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            frame = frame.with_columns(
                pl.Series(c, [json.dumps(v or [], ensure_ascii=False) for v in frame[c].to_list()])
                for c in _LISTS
            )
            text = [c for c, t in frame.schema.items() if t == pl.String()]
            found = frame.select(pl.sum_horizontal(_formula_like(c).sum() for c in text)).item()
            if spreadsheet_safe and found:
                frame = frame.with_columns(
                    pl.when(_formula_like(c)).then("'" + pl.col(c)).otherwise(pl.col(c)).alias(c)
                    for c in text
                )
            frame.write_csv(tmp)
        else:
            frame.write_parquet(tmp)
    return int(found or 0)


def read_records(path: str | Path) -> pl.DataFrame:
    """Read a file the file sink wrote back, with the record dtypes (lists as lists)."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        frame = pl.read_csv(p, schema_overrides={c: pl.String for c in RECORD_COLUMNS})
        return frame.with_columns(
            *(pl.col(c).str.json_decode(pl.List(pl.String)) for c in _LISTS),
            *(pl.col(c).str.to_date() for c, t in RECORD_SCHEMA.items() if t == pl.Date()),
            *(pl.col(c).cast(pl.Float64) for c, t in RECORD_SCHEMA.items() if t == pl.Float64()),
        )
    return pl.read_parquet(p)
