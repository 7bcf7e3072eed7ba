"""The optional per-user attributes table (``config.attributes``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from lapse.config import LapseConfig
from lapse.events.mapping import id_as_string, present_columns
from lapse.events.readers import collect_frame, scan_source
from lapse.exceptions import ConfigError, MissingColumnsError
from lapse.schema import USER_ID

__all__ = ["AttributesReport", "load_attributes", "read_attributes"]


@dataclass(frozen=True)
class AttributesReport:
    """What :func:`read_attributes` read and dropped.

    ``rows_read = users + null_user_ids + duplicates``.
    """

    path: str
    rows_read: int
    users: int
    null_user_ids: int
    duplicates: int
    columns: tuple[str, ...]


def read_attributes(path: str | Path, config: LapseConfig) -> tuple[pl.DataFrame, AttributesReport]:
    """One row per user: ``user_id`` (string) then the other attribute columns.

    The source's ``attributes.user_id`` column becomes ``user_id`` (ids read
    like event ids: as text from CSV and NDJSON, so ``00042`` stays ``00042``;
    a numeric column's ``17850.0`` becomes ``"17850"``), ``attributes.columns``
    renames (attribute name: source column) apply, other columns keep their names.
    Rows without a user id are dropped and counted; for a user listed twice
    the last row wins (the others are counted as duplicates).

    Raises
    ------
    ReadError
        The file cannot be read.
    MissingColumnsError
        The user id column, a renamed column or a ``static_features`` entry is absent.
    """
    spec = config.attributes
    name = str(path)
    raw = scan_source(path, spec.format, text_columns=[spec.user_id])
    schema = raw.collect_schema()
    absent = [c for c in (spec.user_id, *spec.columns.values()) if c not in schema]
    renames = {source: target for target, source in spec.columns.items()}
    renames[spec.user_id] = USER_ID
    after = [renames.get(c, c) for c in schema.names()]
    absent += [f for f in spec.static_features if f not in after and f not in absent]
    if absent:
        raise MissingColumnsError(
            f"{name}: missing attribute columns {absent}. The source has {present_columns(schema)}. "
            "Fix: set attributes.user_id to the user id column, map renames under "
            "attributes.columns (name: source column), and list only present "
            "attributes under attributes.static_features"
        )
    clashes = sorted({c for c in after if after.count(c) > 1})
    if clashes:
        raise ConfigError(
            f"{name}: attribute columns {clashes} would appear twice after renaming; "
            "rename or drop one of them under attributes.columns / attributes.user_id"
        )
    others = [c for c in schema.names() if c != spec.user_id]
    typed = raw.select(
        id_as_string(pl.col(spec.user_id), schema[spec.user_id]).alias(USER_ID),
        *(pl.col(c).alias(renames.get(c, c)) for c in others),
    )
    frame = collect_frame(typed, name)
    named = frame.filter(pl.col(USER_ID).is_not_null())
    users = named.unique(subset=USER_ID, keep="last", maintain_order=True)
    report = AttributesReport(
        path=name,
        rows_read=frame.height,
        users=users.height,
        null_user_ids=frame.height - named.height,
        duplicates=named.height - users.height,
        columns=tuple(users.columns),
    )
    return users, report


def load_attributes(config: LapseConfig, path: str | Path | None = None) -> pl.DataFrame | None:
    """The attributes table to use: ``path``, else ``attributes.path``, else None."""
    source = path if path is not None else config.attributes.path
    if source is None:
        return None
    frame, _ = read_attributes(config.resolve(source), config)
    return frame
