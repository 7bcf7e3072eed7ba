"""The validated events of an append-only folder, kept by user for incremental trigger runs.

```
<audit.path>/event_store/<sink>-<hash of the folder>/
  <part>.arrow          validated events of some files, sorted by user (Arrow IPC, uncompressed;
                        with their message ids when ``source.message_id`` is set)
  <part>.users.parquet  each user's rows in it: user_id, start, rows
  <part>.links.parquet  the identity links of those files
```

A full ``lapse triggers run`` stores every event of the folder as one part; each
incremental run adds the events of its new files as another (their duplicates of
stored rows, by canonical columns or message id, left out: :func:`combine`). The run ledger lists a folder's parts with its watermark and
changes the list in the same transaction, so a part written by a run killed before
it is never read (and :func:`clean` removes it). An incremental run reads the parts
memory-mapped and takes the rows of the users it touches: the pages those rows sit
on, never the whole history. Parts are immutable; the newer ones are merged as they
accumulate (:func:`merge`), so a folder has a few parts, each at most half the size
of the one before it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.ipc

from lapse.config import LapseConfig
from lapse.events import identity
from lapse.events.mapping import MESSAGE_ID
from lapse.events.validate import canonical_columns, distinct, read_events_with_links
from lapse.faults import fault_point
from lapse.files import atomic_path

IntArray = npt.NDArray[np.int64]

__all__ = [
    "MAX_PARTS",
    "clean",
    "combine",
    "folder",
    "forget",
    "links",
    "merge",
    "present",
    "read",
    "read_all",
    "read_new",
    "write",
]

#: Parts a folder keeps before the newest are merged regardless of their sizes.
MAX_PARTS: Final = 12
_USERS: Final = ".users.parquet"
_LINKS: Final = ".links.parquet"


def folder(root: Path, sink: str, source: str) -> Path:
    """Where the event store of ``source`` (a folder's absolute path) for ``sink`` lives."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return root / "event_store" / f"{sink}-{digest}"


def _files(store: Path, part: str) -> tuple[Path, Path, Path]:
    return store / f"{part}.arrow", store / f"{part}{_USERS}", store / f"{part}{_LINKS}"


def write(store: Path, events: pl.DataFrame, links: pl.DataFrame) -> str:
    """Write ``events`` (validated, in file order) and their ``links`` as a new part; its name.

    Rows are sorted by user, keeping each user's rows in their order.
    """
    store.mkdir(parents=True, exist_ok=True)
    part = uuid.uuid4().hex
    rows, users, link_file = _files(store, part)
    events = events.sort("user_id", maintain_order=True)
    index = (
        events.group_by("user_id", maintain_order=True)
        .agg(pl.len().alias("rows"))
        .with_columns((pl.col("rows").cum_sum() - pl.col("rows")).alias("start"))
        .select("user_id", "start", "rows")
    )
    table = events.to_arrow()
    with (
        atomic_path(rows) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as out,
    ):
        out.write_table(table, max_chunksize=1 << 20)
    for frame, path in ((index, users), (links, link_file)):
        with atomic_path(path) as tmp:
            frame.write_parquet(tmp)
    return part


def read(store: Path, parts: Sequence[str], user_ids: Sequence[str]) -> pl.DataFrame | None:
    """The stored events of ``user_ids``, part by part in ``parts``' order (``None``: none).

    Each part is memory-mapped; only the rows of these users are taken from it.
    """
    ids = pl.Series("user_id", sorted(set(user_ids)), dtype=pl.String)
    out = []
    for part in parts:
        rows, users, _ = _files(store, part)
        wanted = pl.read_parquet(users).filter(pl.col("user_id").is_in(ids.implode()))
        if wanted.is_empty():
            continue
        at = wanted.select(pl.int_ranges("start", pl.col("start") + pl.col("rows")))
        take = np.sort(at.to_series().explode().to_numpy().astype(np.int64))
        out.append(_frame(_take(pa.ipc.open_file(pa.memory_map(str(rows))), take)))
    return pl.concat(out, how="diagonal_relaxed") if out else None


def present(store: Path, parts: Sequence[str]) -> bool:
    """Whether the store holds these parts (some, all of their files)."""
    return bool(parts) and all(path.exists() for p in parts for path in _files(store, p))


def read_new(files: Sequence[Path], config: LapseConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The validated events of ``files`` with their message ids (in their order; a row
    repeating an earlier one of these files left out, as in one folder: see
    :func:`lapse.events.validate.distinct`) and their identity links."""
    events, links = read_events_with_links(files, config, message_ids=True)
    frame = pl.concat(events, how="diagonal_relaxed") if events else pl.DataFrame()
    if frame.height:
        frame = frame.filter(distinct(frame, config))
    return frame, links


def combine(
    stored: pl.DataFrame | None, fresh: pl.DataFrame, config: LapseConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(events, added)``: ``stored`` then the rows of ``fresh`` that repeat none of them
    (a duplicate keeps its first occurrence), and those rows of ``fresh``.

    Each side has no duplicates of its own (validated), so a duplicate is a fresh row
    equal to a stored one in every canonical column, or with the same message id
    (``source.message_id`` set; ids shared across users apart, as
    :func:`lapse.events.validate.read_events` of a few users)."""
    if stored is None or stored.is_empty():
        return fresh, fresh
    if fresh.is_empty():
        return stored, fresh
    on = canonical_columns(config)
    added = fresh.join(
        stored.select(on), on=on, how="anti", nulls_equal=True, maintain_order="left"
    )
    if config.source.message_id is not None and MESSAGE_ID in stored.columns:
        seen = stored[MESSAGE_ID].drop_nulls()
        added = added.filter(~pl.col(MESSAGE_ID).is_in(seen.implode()).fill_null(False))
    return pl.concat([stored, added], how="diagonal_relaxed"), added


def _take(reader: pa.ipc.RecordBatchFileReader, rows: IntArray) -> pa.Table:
    """Rows ``rows`` (sorted) of a memory-mapped file, batch by batch: only the batches
    holding them are touched, and within them only these rows are copied."""
    batches, start = [], 0
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            batches.append(batch.take(_indices(rows[lo:hi] - start)))
        start += batch.num_rows
    return pa.Table.from_batches(batches, schema=reader.schema)


def _indices(rows: IntArray) -> pa.Array:
    """``rows`` (contiguous int64) as an Arrow array, sharing their memory: ``pa.array`` of a
    NumPy array imports pandas (0.4-0.6 s) to ask whether it is a pandas categorical."""
    return pa.Array.from_buffers(pa.int64(), len(rows), [None, pa.py_buffer(rows)])


def links(store: Path, parts: Sequence[str]) -> pl.DataFrame:
    """The identity links of every part (:data:`lapse.events.identity.LINK_SCHEMA`)."""
    return identity.union_links([pl.read_parquet(_files(store, p)[2]) for p in parts])


def _rows(store: Path, part: str) -> int:
    return int(
        pl.scan_parquet(_files(store, part)[1]).select(pl.col("rows").sum()).collect().item()
    )


def merge(store: Path, parts: Sequence[str]) -> list[str]:
    """``parts`` after merging the newest: while their rows together are at least half the
    rows of the part before them (or there are more than :data:`MAX_PARTS`), that part
    joins them. The first part (a full run's) is never merged; a merge writes a new part."""
    sizes = [_rows(store, p) for p in parts]
    n, take, total = len(parts), 1, sizes[-1] if parts else 0
    while n - take > 1 and (2 * total >= sizes[n - take - 1] or n - take >= MAX_PARTS):
        total += sizes[n - take - 1]
        take += 1
    if take < 2:
        return list(parts)
    newest = parts[n - take :]
    return [*parts[: n - take], write(store, read_all(store, newest), links(store, newest))]


def read_all(store: Path, parts: Sequence[str]) -> pl.DataFrame:
    """Every stored event of ``parts``, in their order."""
    frames = [
        _frame(pa.ipc.open_file(pa.memory_map(str(_files(store, p)[0]))).read_all()) for p in parts
    ]
    return pl.concat(frames, how="diagonal_relaxed")


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def clean(store: Path, parts: Sequence[str]) -> None:
    """Remove every file of the store that belongs to no part in ``parts`` (a killed
    run's part, parts merged away)."""
    if not store.exists():
        return
    keep = {path for p in parts for path in _files(store, p)}
    for path in store.iterdir():
        if path not in keep:
            path.unlink(missing_ok=True)


def forget(root: Path, user_ids: set[str]) -> int:
    """Remove these users' events and identity links from every event store under
    ``root``; the event rows removed.

    A part is rewritten under its own name (the ledger's list of parts stays right): its
    row index goes first and comes back last, so a part caught half rewritten is missing
    (:func:`present`: the next trigger run is a full one), never read with a stale index.
    """
    ids = pl.Series(sorted(user_ids), dtype=pl.String).implode()
    removed = 0
    for rows in sorted((root / "event_store").glob("*/*.arrow")):
        part = rows.name.removesuffix(".arrow")
        store = rows.parent
        events = read_all(store, [part])
        keep = events.filter(~pl.col("user_id").cast(pl.String).is_in(ids))
        stored_links = pl.read_parquet(_files(store, part)[2])
        gone = (pl.col("user_id").is_in(ids) | pl.col("id").is_in(ids)).fill_null(False)
        kept_links = stored_links.filter(~gone)
        if keep.height == events.height and kept_links.height == stored_links.height:
            continue
        removed += events.height - keep.height
        new = write(store, keep, kept_links)
        (arrow, users, link_file), (new_arrow, new_users, new_links) = (
            _files(store, part),
            _files(store, new),
        )
        users.unlink(missing_ok=True)
        fault_point("forget_part")
        new_arrow.replace(arrow)
        new_links.replace(link_file)
        new_users.replace(users)
    return removed
