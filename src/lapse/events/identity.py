"""One id per person, point in time: identity links and their resolution at a cutoff.

A **link** row ``(id, user_id, ts)`` says that ``id`` (an anonymous id, or an
alias's ``previousId``) was observed together with the user id ``user_id`` at
``ts``: a Segment track/page/screen/identify call carrying both ``anonymousId``
and ``userId``, an ``alias`` call, or a row of a source with ``source.identity``.
A row with a null ``user_id`` only records that the anonymous id was seen.

Resolution at a cutoff ``T`` uses the links with ``ts < T`` only: a visitor who
identifies at or after ``T`` is still anonymous at ``T`` (applying a later
link to earlier events would leak the future). Linked ids merge transitively
into one **canonical id**: the user id among them first seen in a link (the
earliest link ``ts``, ties broken by the smaller id). So an anonymous id
always resolves to a known user id, a person's canonical id never changes
once known, and when two user ids are aliased (or share a device) the one
linked first keeps its id and the other's events move to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Final

import polars as pl

from lapse.schema import TS_DTYPE, USER_ID

__all__ = [
    "LINK_SCHEMA",
    "Persons",
    "anonymous_only",
    "at_each_cutoff",
    "canonical_ids",
    "changing_ids",
    "empty_links",
    "merged_ids",
    "person_ids",
    "resolve",
    "resolved",
    "union_links",
]

LINK_SCHEMA: Final[dict[str, pl.DataType]] = {
    "id": pl.String(),
    USER_ID: pl.String(),
    "ts": TS_DTYPE,
}
_CANONICAL: Final = "canonical"


def empty_links() -> pl.DataFrame:
    """A links frame without rows."""
    return pl.DataFrame(schema=LINK_SCHEMA)


def union_links(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """Links of several sources as one table: each pair at its first observation, sorted
    by time (the order :func:`resolve` merges them in)."""
    return (
        pl.concat([f.cast(LINK_SCHEMA) for f in [empty_links(), *frames]])  # type: ignore[arg-type]
        .group_by("id", "user_id")
        .agg(pl.col("ts").min())
        .sort("ts", "id", "user_id", nulls_last=True)
    )


def _before(links: pl.DataFrame, as_of: datetime | None) -> pl.DataFrame:
    return links if as_of is None else links.filter(pl.col("ts") < as_of)


def canonical_ids(links: pl.DataFrame, as_of: datetime | None = None) -> pl.DataFrame:
    """``id -> canonical`` for every id linked before ``as_of`` (all links when ``None``).

    Ids that resolve to themselves (a canonical user id) are listed too.
    """
    edges = _before(links, as_of).filter(pl.col(USER_ID).is_not_null() & pl.col("id").is_not_null())
    out_schema = {"id": pl.String(), _CANONICAL: pl.String()}
    if edges.is_empty():
        return pl.DataFrame(schema=out_schema)
    first_seen = edges.group_by(USER_ID).agg(pl.col("ts").min().alias("first"))
    nodes = (
        pl.concat([edges.select("id"), edges.select(pl.col(USER_ID).alias("id"))])
        .unique()
        .join(first_seen.rename({USER_ID: "id"}), on="id", how="left")
        .sort(["first", "id"], nulls_last=True)
        .with_row_index("rank")
    )
    rank = dict(zip(nodes["id"].to_list(), nodes["rank"].to_list(), strict=True))
    pairs = edges.select(
        pl.col("id").replace_strict(rank, return_dtype=pl.UInt32).alias("a"),
        pl.col(USER_ID).replace_strict(rank, return_dtype=pl.UInt32).alias("b"),
    ).unique()
    both = pl.concat([pairs, pairs.select(a="b", b="a")])
    label = nodes.select(pl.col("rank").alias("node"), pl.col("rank").alias("label"))
    while True:  # labels only decrease, so this ends; pointer jumping keeps the rounds few
        # each node takes the smallest label among itself and its neighbours, then
        # jumps to its label's label
        reach = both.join(label, left_on="b", right_on="node").group_by("a").agg(pl.min("label"))
        step = (
            label.join(reach.rename({"a": "node", "label": "near"}), on="node", how="left")
            .select("node", pl.min_horizontal("label", "near").alias("label"))
            .sort("node")
        )
        step = step.with_columns(pl.col("label").gather(pl.col("label")).alias("label"))
        if step["label"].equals(label.sort("node")["label"]):
            break
        label = step
    ids = nodes.sort("rank")["id"]
    return pl.DataFrame({"id": ids, _CANONICAL: ids.gather(label.sort("node")["label"])})


def resolve(
    events: pl.LazyFrame, links: pl.DataFrame, as_of: datetime | None, column: str = USER_ID
) -> pl.LazyFrame:
    """``events`` with each id in ``column`` replaced by its canonical id as of ``as_of``.

    Only links with ``ts < as_of`` apply (all of them when ``as_of`` is None).
    """
    return Persons.at(links, as_of).resolve(events, column)


def merged_ids(links: pl.DataFrame, as_of: datetime | None = None) -> int:
    """How many ids resolve to another id as of ``as_of``."""
    mapping = canonical_ids(links, as_of)
    return mapping.filter(pl.col("id") != pl.col(_CANONICAL)).height


def anonymous_only(links: pl.DataFrame, as_of: datetime | None = None) -> pl.Series:
    """The anonymous ids seen before ``as_of`` and linked to no user id by then, sorted."""
    return Persons.at(links, as_of).anonymous_only()


def changing_ids(links: pl.DataFrame, cutoffs: Sequence[datetime]) -> pl.Series:
    """The ids whose person changes between the first and the last of ``cutoffs``.

    Every id of a person (as of the last cutoff) touched by a link observed in
    ``[first, last)``; all other ids resolve alike at every cutoff, because
    persons only grow as links accumulate.
    """
    first, last = min(cutoffs), max(cutoffs)
    new = links.filter(
        (pl.col("ts") >= first) & (pl.col("ts") < last) & pl.col(USER_ID).is_not_null()
    )
    if new.is_empty():
        return pl.Series("id", [], dtype=pl.String)
    mapping = canonical_ids(links, last)
    touched = mapping.filter(pl.col("id").is_in(new["id"].implode()))[_CANONICAL]
    return mapping.filter(pl.col(_CANONICAL).is_in(touched.implode()))["id"].sort()


def _link_groups(cuts: list[datetime], link_ts: pl.Series) -> list[list[datetime]]:
    """Consecutive cutoffs with no link observed between them (they resolve alike)."""
    groups: list[list[datetime]] = [[cuts[0]]]
    for prev, cut in pairwise(cuts):
        if link_ts.filter((link_ts >= prev) & (link_ts < cut)).len():
            groups.append([cut])
        else:
            groups[-1].append(cut)
    return groups


def at_each_cutoff(
    per_cutoffs: Callable[[pl.LazyFrame, list[datetime]], pl.DataFrame],
    events: pl.LazyFrame,
    links: pl.DataFrame,
    cutoffs: Sequence[datetime],
) -> pl.DataFrame:
    """``per_cutoffs(events, cutoffs)`` with the events' ids resolved as at each cutoff.

    ``per_cutoffs`` computes per-user rows at several cutoffs (features,
    eligibility); its frames are concatenated. The ids no link between the
    first and last cutoff touches (:func:`changing_ids`) resolve alike at every
    cutoff and go in one call; the others' events once per group of cutoffs
    between which no link was observed.
    """
    cuts = sorted(set(cutoffs))
    changing = changing_ids(links, cuts).implode()
    moving = pl.col(USER_ID).is_in(changing)
    stable = resolve(events.filter(~moving), links, cuts[0])
    parts = [per_cutoffs(stable, cuts)]
    if changing.list.len().item():
        mine = events.filter(moving).collect().lazy()
        for group in _link_groups(cuts, links["ts"]):
            parts.append(per_cutoffs(resolve(mine, links, group[0]), group))
    return pl.concat(parts)


def person_ids(links: pl.DataFrame, ids: Sequence[str], as_of: datetime | None) -> list[str]:
    """``ids`` and every other id of their persons as of ``as_of``, sorted."""
    return Persons.at(links, as_of).every_id(ids)


@dataclass(frozen=True)
class Persons:
    """The identity ``links`` resolved as of ``as_of`` (``ids``: their :func:`canonical_ids`,
    found once): what the steps of one run resolve ids with (:func:`resolve`,
    :func:`person_ids` and :func:`anonymous_only` at that instant)."""

    links: pl.DataFrame
    as_of: datetime | None
    ids: pl.DataFrame

    @classmethod
    def at(cls, links: pl.DataFrame, as_of: datetime | None) -> Persons:
        """``links`` resolved as of ``as_of`` (all of them when ``None``)."""
        return cls(links, as_of, canonical_ids(links, as_of))

    @property
    def empty(self) -> bool:
        """No link at all (every id is its own person)."""
        return self.links.is_empty()

    def resolve(self, events: pl.LazyFrame, column: str = USER_ID) -> pl.LazyFrame:
        """:func:`resolve` of ``events`` (their ``column``) at this instant."""
        mapping = self.ids.filter(pl.col("id") != pl.col(_CANONICAL))
        if mapping.is_empty():
            return events
        return (
            events.join(
                mapping.lazy(), left_on=column, right_on="id", how="left", maintain_order="left"
            )
            .with_columns(pl.coalesce(_CANONICAL, column).alias(column))
            .drop(_CANONICAL)
        )

    def every_id(self, ids: Sequence[str]) -> list[str]:
        """:func:`person_ids` of ``ids`` at this instant."""
        wanted = pl.Series(list(ids), dtype=pl.String).implode()
        persons = self.ids.filter(pl.col("id").is_in(wanted))[_CANONICAL].implode()
        others = self.ids.filter(pl.col(_CANONICAL).is_in(persons))["id"].to_list()
        return sorted({*ids, *others})

    def anonymous_only(self) -> pl.Series:
        """:func:`anonymous_only` at this instant."""
        seen = _before(self.links, self.as_of)
        linked = self.ids["id"]
        return (
            seen.filter(pl.col(USER_ID).is_null() & ~pl.col("id").is_in(linked.implode()))["id"]
            .unique()
            .sort()
        )


def resolved(events: pl.LazyFrame, links: pl.DataFrame | None, as_of: datetime) -> pl.LazyFrame:
    """``events`` with the ids of the ``links`` before ``as_of`` (:func:`resolve`); the
    events themselves without links."""
    return events if links is None else resolve(events, links, as_of)
