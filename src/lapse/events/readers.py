"""Open event and attribute files as lazy Polars frames.

The only place that touches files. Formats: Parquet (file, folder, glob,
hive-partitioned folders), CSV/TSV (gzip included), NDJSON, and Segment-style
track exports (NDJSON whose ``properties``/``context`` objects are flattened
into ``properties.<field>`` / ``context.<field>`` columns).

The schema is resolved eagerly, so a file that cannot be read fails here with
a one-line :class:`~lapse.exceptions.ReadError` naming the file. Text files
must be UTF-8: a UTF-16 or UTF-32 file is refused naming its encoding, a binary
file as not text (nothing of its content is quoted); a CSV header naming a
column twice is refused naming the column (Polars would read the first).

Events held in memory come in here too: a source-shaped Polars DataFrame or
LazyFrame, or a pandas DataFrame (converted once, through Arrow), is read by
:func:`scan_frame` and then mapped and validated exactly like a file.
"""

from __future__ import annotations

import csv
import glob as globlib
import gzip
import hashlib
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import polars as pl

from lapse.config import SourceFormat
from lapse.exceptions import ReadError

__all__ = [
    "EventFrame",
    "EventSource",
    "PandasFrame",
    "as_polars",
    "collect_frame",
    "data_files",
    "frame_digest",
    "frame_name",
    "is_segment_schema",
    "one_line",
    "resolve_format",
    "scan_frame",
    "scan_source",
]

_EXTENSIONS: Final[dict[str, SourceFormat]] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
}
_COMPRESSION: Final = (".gz", ".gzip", ".zst")
_GLOB_CHARS: Final = frozenset("*?[")
_PARQUET_MAGIC: Final = b"PAR1"
# Segment exports nest these objects; they become ``<name>.<field>`` columns.
_SEGMENT_STRUCTS: Final = ("properties", "context")
_SEGMENT_ID_COLUMNS: Final = ("userId", "anonymousId")
# Byte-order marks of the encodings lapse does not read (longest first: UTF-32-LE starts
# like UTF-16-LE).
_BOMS: Final = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)
_HEAD_BYTES: Final = 4096
_ARROW_COLUMN: Final = re.compile(r"column (.+) with type (\S+)")


class PandasFrame(Protocol):
    """A pandas DataFrame, as lapse reads it (pandas is not a dependency of lapse)."""

    @property
    def columns(self) -> Any:
        """The column labels."""

    def to_numpy(self) -> Any:
        """The values (present on every pandas DataFrame; lapse converts through Arrow)."""


#: Events in memory, shaped like the source: mapped and validated like a file.
EventFrame: TypeAlias = pl.DataFrame | pl.LazyFrame | PandasFrame
#: What every entry point that takes events accepts: a path (file, folder, glob,
#: or a database source's path) or a frame.
EventSource: TypeAlias = str | Path | EventFrame


def is_segment_schema(schema: Mapping[str, object]) -> bool:
    """Whether columns look like a Segment export (user/anonymous id, timestamp, and an
    event name or a call type)."""
    has_id = any(name in schema for name in _SEGMENT_ID_COLUMNS)
    return has_id and "timestamp" in schema and ("event" in schema or "type" in schema)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (Polars errors run long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def data_files(path: str) -> list[Path]:
    """The files behind ``path`` (a file, a folder, or a glob), sorted."""
    if _GLOB_CHARS & set(path):
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ReadError(f"{path}: no files match this pattern")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise ReadError(f"{path}: the folder holds no data files")
        return files
    if not p.exists():
        raise ReadError(f"{path}: file not found")
    return [p]


def _extension_format(file: Path) -> SourceFormat | None:
    suffixes = [s.lower() for s in file.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _sniff_format(file: Path) -> SourceFormat:
    with file.open("rb") as fh:
        head = fh.read(64).lstrip()
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(b"{"):
        return "ndjson"
    return "csv"


def resolve_format(path: str | Path, fmt: SourceFormat = "auto") -> tuple[SourceFormat, list[Path]]:
    """The file format of ``path`` (``auto`` looks at extensions, then content) and its files.

    ``segment`` is reported only when asked for; :func:`scan_source` detects it
    from the columns of an NDJSON source.
    """
    files = data_files(str(path))
    if fmt != "auto":
        return fmt, files
    found = {_extension_format(f) or _sniff_format(f) for f in files}
    if len(found) > 1:
        raise ReadError(
            f"{path}: mixes file formats {sorted(str(f) for f in found)}; "
            "point at one format (a glob like '*.parquet') or set source.format"
        )
    return found.pop(), files


def _head(file: Path) -> bytes:
    """The first bytes of ``file``'s text (a gzip file's decompressed; zstd is not looked at)."""
    suffix = file.suffix.lower()
    if suffix == ".zst":
        return b""
    opener = gzip.open if suffix in (".gz", ".gzip") else open
    try:
        with opener(file, "rb") as fh:
            return bytes(fh.read(_HEAD_BYTES))
    except (OSError, EOFError):
        return b""  # unreadable: the scan says why


def _text_problem(head: bytes) -> str | None:
    """Why bytes cannot be UTF-8 text of events: another encoding, or binary data."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return f"is {encoding} text"
    if b"\x00" not in head:
        return None
    # UTF-16 without a byte-order mark: ASCII characters leave every other byte zero
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if odd > len(head) // 4 and even == 0:
        return "is UTF-16 (little-endian) text"
    if even > len(head) // 4 and odd == 0:
        return "is UTF-16 (big-endian) text"
    return "is not text: it holds binary data"


def _check_text(name: str, files: list[Path]) -> None:
    """Refuse a text source that is not UTF-8 (naming the encoding), quoting none of it."""
    for f in files:
        problem = _text_problem(_head(f))
        if problem is None:
            continue
        where = name if f == Path(name) else f"{name} ({f.name})"
        fix = (
            "convert it to UTF-8, e.g. `iconv -f UTF-16 -t UTF-8 IN > OUT`"
            if "UTF" in problem
            else "point at the event data (CSV, NDJSON or Parquet)"
        )
        raise ReadError(f"{where}: the file {problem}; lapse reads UTF-8 CSV and NDJSON: {fix}")


def _check_header(name: str, files: list[Path], separator: str) -> None:
    """Refuse a CSV header naming a column twice (Polars would read only the first)."""
    for f in files:
        line = _head(f).decode("utf-8-sig", errors="replace").partition("\n")[0]
        names = next(csv.reader([line.rstrip("\r")], delimiter=separator), [])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            where = name if f == Path(name) else f"{name} ({f.name})"
            raise ReadError(
                f"{where}: the header names column {twice[0]!r} more than once; lapse "
                "would read only the first: rename or remove the others"
            )


def _empty_file(files: list[Path]) -> Path | None:
    return next((f for f in files if f.stat().st_size == 0), None)


def _parquet_problem(files: list[Path], exc: BaseException) -> str:
    for f in files:
        with f.open("rb") as fh:
            head = fh.read(4)
        if head != _PARQUET_MAGIC:
            return (
                f"{f.name} is not a Parquet file (it lacks the Parquet header); "
                "if it is CSV or JSON, rename it or set the format"
            )
    return f"truncated or corrupt Parquet file ({one_line(exc)})"


def _text_schema(schema: pl.Schema, text_columns: Collection[str]) -> pl.Schema:
    """``schema`` with the present ``text_columns`` as strings (``a.b``: field ``b`` of struct ``a``)."""
    out = dict(schema)
    for name in text_columns:
        head, _, field = name.partition(".")
        struct = out.get(head)
        if name in out:
            out[name] = pl.String()
        elif isinstance(struct, pl.Struct) and field in struct.to_schema():
            out[head] = pl.Struct({**struct.to_schema(), field: pl.String()})
    return pl.Schema(out)


def _separator(files: list[Path], csv_separator: str) -> str:
    """The CSV field separator: ``.tsv`` files default to a tab."""
    tsv = all(".tsv" in [s.lower() for s in f.suffixes] for f in files)
    return "\t" if tsv and csv_separator == "," else csv_separator


def _scan_text(
    fmt: SourceFormat, files: list[Path], csv_separator: str, schema: pl.Schema | None = None
) -> pl.LazyFrame:
    if fmt == "csv":
        sep = _separator(files, csv_separator)
        # Full-length type inference: a column that turns non-numeric late in
        # the file (InvoiceNo "C536379") must not fail mid-read.
        return pl.scan_csv(files, separator=sep, infer_schema_length=None, schema=schema)
    # Full-length inference so that event properties seen only late are kept.
    return pl.scan_ndjson(files, infer_schema_length=None, schema=schema)


def _scan(
    path: str,
    fmt: SourceFormat,
    files: list[Path],
    csv_separator: str,
    text_columns: Collection[str],
) -> tuple[pl.LazyFrame, pl.Schema]:
    if fmt == "parquet":
        # The path itself (not the file list) keeps hive partitions of a folder.
        lf = pl.scan_parquet(path)
        return lf, lf.collect_schema()
    lf = _scan_text(fmt, files, csv_separator)
    schema = lf.collect_schema()
    text = _text_schema(schema, text_columns)
    if text != schema:
        # Ids are read as written: inferred numbers would turn "00042" into 42
        # (and a 20-digit JSON id into a float). The inferred schema is reused.
        lf = _scan_text(fmt, files, csv_separator, text)
    return lf, text


def _flatten_segment(lf: pl.LazyFrame, schema: pl.Schema) -> pl.LazyFrame:
    structs: list[str] = []
    empty: list[str] = []
    for name in _SEGMENT_STRUCTS:
        dtype = schema.get(name)
        if isinstance(dtype, pl.Struct) and dtype.fields:
            structs.append(name)
        elif isinstance(dtype, pl.Struct | pl.Null):
            empty.append(name)  # null or empty objects carry nothing
    return lf.drop(empty).unnest(structs, separator=".")


def scan_source(
    path: str | Path,
    fmt: SourceFormat = "auto",
    csv_separator: str = ",",
    text_columns: Collection[str] = (),
) -> pl.LazyFrame:
    """A raw event or attribute source as a lazy frame, schema already checked.

    Parameters
    ----------
    path
        A file, a folder (hive partitions become columns), or a glob.
    fmt
        ``auto`` decides from the extension (``.parquet``/``.pq``,
        ``.csv``/``.tsv``/``.txt`` optionally ``.gz``, ``.ndjson``/``.jsonl``/
        ``.json``), then from the content. NDJSON with ``userId`` or
        ``anonymousId``, ``timestamp`` and ``event`` is read as ``segment``.
    csv_separator
        Field separator for CSV; ``.tsv`` files default to a tab.
    text_columns
        Columns read as text from CSV and NDJSON whatever they look like (ids:
        ``00042`` stays ``00042``); ``properties.sku`` names a field of a nested
        object. Absent ones are ignored; Parquet keeps its types.

    Raises
    ------
    ReadError
        The path is missing, empty or without rows, truncated, not in the
        expected format, text not in UTF-8, or a CSV header with a name twice.
    """
    name = str(path)
    resolved, files = resolve_format(name, fmt)
    empty = _empty_file(files)
    if empty is not None:
        where = name if empty == Path(name) else f"{name} ({empty.name})"
        raise ReadError(f"{where}: the file is empty")
    scan_fmt: SourceFormat = "ndjson" if resolved == "segment" else resolved
    if scan_fmt != "parquet":
        _check_text(name, files)
    if scan_fmt == "csv":
        _check_header(name, files, _separator(files, csv_separator))
    try:
        lf, schema = _scan(name, scan_fmt, files, csv_separator, text_columns)
        rows = lf.select(pl.len()).collect().item()  # Parquet: from the footers
    except (pl.exceptions.PolarsError, OSError) as exc:
        problem = (
            _parquet_problem(files, exc)
            if scan_fmt == "parquet"
            else f"cannot read as {scan_fmt}: {one_line(exc)}"
        )
        raise ReadError(f"{name}: {problem}") from None
    if rows == 0:
        what = "the file has" if len(files) == 1 else f"its {len(files)} files have"
        raise ReadError(f"{name}: {what} no rows, only a header or schema; point at data with rows")
    if resolved == "segment" or (resolved == "ndjson" and is_segment_schema(schema)):
        lf = _flatten_segment(lf, schema)
    return lf


def collect_frame(lf: pl.LazyFrame, source_name: str) -> pl.DataFrame:
    """Collect ``lf`` into one chunk per column, turning a Polars read failure into a
    one-line :class:`ReadError`."""
    try:
        return _one_chunk(lf.collect())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ReadError(f"{source_name}: cannot read: {one_line(exc)}") from None


def _one_chunk(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` rechunked a column at a time, in place.

    A read's columns come in differently cut chunks (642 and 641 of 41M events), and
    every filter or select of such a frame copies it whole to align them; rechunking
    one column at a time holds one column's copy at most.
    """
    for i in range(frame.width):
        if frame.to_series(i).n_chunks() > 1:
            frame.replace_column(i, frame.to_series(i).rechunk())
    return frame


# -- frames in memory ---------------------------------------------------------------------


def frame_name(frame: EventFrame) -> str:
    """How messages and records name a frame: ``events DataFrame`` (Polars or pandas, which
    is converted to Polars on the way in) or ``events LazyFrame``."""
    return "events LazyFrame" if isinstance(frame, pl.LazyFrame) else "events DataFrame"


def _from_pandas(frame: PandasFrame) -> pl.DataFrame:
    """A pandas frame as Polars, converted once through Arrow (the index is left out)."""
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        where = next((m for a in exc.args if (m := _ARROW_COLUMN.search(str(a)))), None)
        if where is None:
            raise ReadError(f"pandas DataFrame: cannot convert to Arrow: {one_line(exc)}") from None
        column = where.group(1)
        raise ReadError(
            f"pandas DataFrame: column {column!r} mixes types ({one_line(exc)}); make it one "
            f"type, e.g. df[{column!r}] = df[{column!r}].astype(str)"
        ) from None
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)  # a Table converts to a DataFrame
    return out


def as_polars(source: EventSource) -> str | Path | pl.DataFrame | pl.LazyFrame:
    """``source`` with a pandas frame converted to Polars (once); a path or a Polars frame
    as it is.

    An entry point that reads its events more than once (events, then identity
    links) converts first, so pandas is converted once.
    """
    if isinstance(source, str | Path | pl.DataFrame | pl.LazyFrame):
        return source
    if type(source).__module__.partition(".")[0] != "pandas":
        raise ReadError(
            f"events must be a path, a Polars DataFrame or LazyFrame, or a pandas DataFrame; "
            f"got a {type(source).__name__}"
        )
    return _from_pandas(source)


def scan_frame(frame: EventFrame) -> pl.LazyFrame:
    """A source-shaped frame as a raw source, like :func:`scan_source` reads a file.

    pandas is converted through Arrow; a frame shaped like a Segment export has
    its ``properties``/``context`` objects flattened as an NDJSON export does.

    Raises
    ------
    ReadError
        The frame has no rows, its plan fails, or a pandas column cannot be
        converted (mixed types).
    """
    name = frame_name(frame)
    lf = as_polars(frame)
    assert isinstance(lf, pl.DataFrame | pl.LazyFrame)
    lf = lf.lazy()
    try:
        schema = lf.collect_schema()
        rows = lf.select(pl.len()).collect().item()
    except pl.exceptions.PolarsError as exc:
        raise ReadError(f"{name}: cannot read: {one_line(exc)}") from None
    if rows == 0:
        raise ReadError(f"{name}: the frame has no rows; pass the events' rows")
    if is_segment_schema(schema):
        lf = _flatten_segment(lf, schema)
    return lf


class _Hasher:
    """A write-only file that hashes what is written to it."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def frame_digest(frame: EventFrame) -> str:
    """A content digest of a frame (16 hex digits): equal for equal columns, dtypes and rows.

    Stands for a file's digest where lapse fingerprints the events it read (the
    training data in MLflow). The rows are hashed as NDJSON text, which does not
    depend on how the frame is chunked in memory.
    """
    data = as_polars(frame)
    assert isinstance(data, pl.DataFrame | pl.LazyFrame)
    table = data.lazy().collect()
    out = _Hasher()
    out.write("".join(f"{n}\x1f{d}\x1e" for n, d in table.schema.items()).encode())
    table.write_ndjson(out)  # type: ignore[call-overload]  # any object with write() will do
    return out.sha.hexdigest()[:16]
