"""Point-in-time feature rows per user: :func:`build` and :func:`build_many`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

import polars as pl

from lapse.config import LapseConfig
from lapse.events import identity
from lapse.events.readers import EventSource
from lapse.events.validate import canonical_events
from lapse.exceptions import LapseError
from lapse.features import _daily, _direct, _engine
from lapse.features._direct import FeatureSet
from lapse.features.registry import expand
from lapse.schema import utc_cutoff

__all__ = ["FeatureSet", "build", "build_many"]


def build_many(
    events: EventSource,
    cutoffs: Sequence[datetime],
    config: LapseConfig,
    *,
    attributes: pl.DataFrame | None = None,
    feature_set: FeatureSet = "all",
    links: pl.DataFrame | None = None,
    names: Collection[str] | None = None,
) -> pl.DataFrame:
    """Feature rows for every (user, cutoff) with an event before the cutoff.

    One roll-up of the events before the last cutoff serves every cutoff.
    The core set at cutoffs that are all at 00:00 UTC takes a compact daily
    roll-up read in week-long slices, with each cutoff's windows summed from
    its 90 days of daily rows (:mod:`lapse.features._daily`; not with an
    ``order_id`` column); otherwise windows
    come from running sums over day buckets split at the cutoffs' times of
    day (:mod:`lapse.features._engine`). Neither path makes one pass over the
    events per cutoff.

    Parameters
    ----------
    events
        Canonical events (:data:`lapse.schema.EVENT_COLUMNS`), or a path or
        source-shaped frame read through ``config.source``
        (:func:`lapse.events.validate.canonical_events`).
    cutoffs
        Timezone-aware instants; duplicates are dropped.
    config
        Roles, milestones and ``features`` settings.
    attributes
        Optional per-user table; ``attributes.static_features`` are copied on.
    feature_set
        ``"all"`` (default) or ``"core"``: the core group only, as in :func:`build`.
    links
        Identity links (:mod:`lapse.events.identity`): at each cutoff the
        events' ids resolve with the links observed before it. The ids whose
        person changes between the cutoffs are built per group of cutoffs
        sharing their links; all others in one pass.
    names
        Only these features of the full set (same values): the roll-up then
        computes only what they read, as the incremental trigger runs' look-ahead
        asks for the ten or so its triggers read.

    Returns
    -------
    pl.DataFrame
        ``user_id``, ``cutoff`` (UTC), then the features of
        :func:`lapse.features.registry.expand` (or ``names``), sorted by cutoff and user.

    Raises
    ------
    LapseError
        No cutoffs, an unknown ``feature_set``, or ``names`` not in the full set.
    """
    if not cutoffs:
        raise LapseError("cutoffs is empty; give at least one timezone-aware datetime")
    cuts = sorted({utc_cutoff(c, "cutoff") for c in cutoffs})
    _check(feature_set)
    need = None if names is None else _engine.state_columns(config, _known(names, config))
    events = canonical_events(events, config)
    if links is not None and not links.is_empty():

        def unlinked(ev: pl.LazyFrame, group: list[datetime]) -> pl.DataFrame:
            return build_many(
                ev, group, config, attributes=attributes, feature_set=feature_set, names=names
            )

        return identity.at_each_cutoff(unlinked, events, links, cuts).sort("cutoff", "user_id")
    core = feature_set == "core" and names is None
    # order ids need each order's first line, which the daily slices do not see
    if core and _daily.all_midnight(cuts) and not _engine.has_orders(events):
        frame = _daily.build_core(events, cuts, config)
        return _engine.with_attributes(frame, attributes, config)
    buckets = _engine.rollup(events, cuts, config, core, need)
    state = _engine.state_at_cutoffs(buckets, cuts, config, core, need)
    feats = _engine.features(state, config, core, names)
    frame = feats.sort("cutoff", "user_id").collect(engine="in-memory")
    return _engine.with_attributes(frame, attributes, config)


def build(
    events: EventSource,
    as_of: datetime,
    config: LapseConfig,
    *,
    attributes: pl.DataFrame | None = None,
    feature_set: FeatureSet = "all",
    links: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Feature rows as of ``as_of``: one per user with an event before it.

    Only events with ``ts < as_of`` are read; windows are half-open,
    ``[as_of - W days, as_of)``.

    Parameters
    ----------
    events
        Canonical events (:data:`lapse.schema.EVENT_COLUMNS`), or a path or
        source-shaped frame (Polars or pandas) read through ``config.source``
        (:func:`lapse.events.validate.canonical_events`).
    as_of
        The cutoff, timezone-aware (the CLI's dates mean 00:00 UTC).
    config
        Roles, milestones and ``features`` settings.
    attributes
        Optional per-user table; ``attributes.static_features`` are copied on.
    feature_set
        ``"all"`` (default) for every feature of the registry, ``"core"`` for
        the core group only (same values, much less work).
    links
        Identity links (:mod:`lapse.events.identity`); those observed before
        ``as_of`` merge each person's ids into one canonical ``user_id``.

    Returns
    -------
    pl.DataFrame
        ``user_id`` then the features in registry order, sorted by user.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> import polars as pl
    >>> from lapse import load_config
    >>> ev = pl.LazyFrame(
    ...     {"user_id": ["a"], "ts": [datetime(2024, 1, 1, tzinfo=timezone.utc)], "event": ["app_open"]}
    ... )
    >>> build(ev, datetime(2024, 1, 8, tzinfo=timezone.utc), load_config())["usage_count_7d"].to_list()
    [1]
    """
    t = utc_cutoff(as_of)
    _check(feature_set)
    events = canonical_events(events, config)
    if links is not None:
        events = identity.resolve(events, links, t)
    frame = _direct.build_one(events, t, config, feature_set)
    return _engine.with_attributes(frame, attributes, config)


def _known(names: Collection[str], config: LapseConfig) -> Collection[str]:
    unknown = sorted(set(names) - set(expand(config)))
    if unknown:
        raise LapseError(
            f"features {unknown} are not in the feature registry for this config; "
            "see lapse.features.registry.expand(config) for the names"
        )
    return names


def _check(feature_set: str) -> None:
    if feature_set not in ("core", "all"):
        raise LapseError(f"feature_set must be 'core' or 'all', got {feature_set!r}")
