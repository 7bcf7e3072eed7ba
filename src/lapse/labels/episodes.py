"""Replenishment episodes: durations, right-censoring and reorder outcomes.

An episode starts at an order (see :mod:`lapse.features.episodes_covariates`
for what one order is) and lasts until the next order of the same target:
the same SKU for ``target="sku"``, anything for ``target="any"``. Episodes
are cut at a cutoff: when the next order is at or after it (or never comes),
the episode is right-censored at the cutoff.

:func:`episodes` and :func:`reorder_outcomes` look up to a cutoff or past
one, which is why they live in ``labels``; :func:`open_episodes` and
:func:`consumable_skus` (:func:`consumable_table`) read only events before their date.

With identity links the callers pass events resolved as of the cutoff
(:mod:`lapse.events.identity`), so an episode at a cutoff is the person's as
known then; :func:`reorder_outcomes` alone follows the person past it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import polars as pl

from lapse.config import LapseConfig
from lapse.events import identity
from lapse.exceptions import ConfigError
from lapse.features.episodes_covariates import ANY_SKU, Target, order_keys, purchase_orders
from lapse.schema import canonical, frac_days, utc_cutoff

__all__ = [
    "ANY_SKU",
    "consumable_skus",
    "consumable_table",
    "episodes",
    "open_episodes",
    "reorder_outcomes",
]

_MIN_DAYS = 1.0 / 24.0
"""Durations are at least an hour: parametric fits need positive times."""
_PERSON: Final = "_person"


def _repeat_buyers(events: pl.LazyFrame, config: LapseConfig, until: datetime) -> pl.LazyFrame:
    """``sku, repeat_buyers``: users who ordered the SKU in two or more orders (on two or
    more days without an ``order_id``) before ``until``."""
    return (
        canonical(events)
        .filter(
            (pl.col("ts") < utc_cutoff(until, "until"))
            & pl.col("event").is_in(config.roles.of("purchase"))
            & pl.col("sku").is_not_null()
        )
        .select("sku", "user_id", *order_keys(events))
        .unique()
        .group_by("sku", "user_id")
        .agg(pl.len().alias("orders"))
        .filter(pl.col("orders") >= 2)
        .group_by("sku")
        .agg(pl.len().cast(pl.Int64).alias("repeat_buyers"))
    )


def consumable_table(events: pl.LazyFrame, config: LapseConfig, *, until: datetime) -> pl.DataFrame:
    """The consumables of :func:`consumable_skus`, ranked: ``sku, repeat_buyers,
    units_per_pack``, most repeat buyers first (then by SKU).

    Raises
    ------
    ConfigError
        An explicit SKU never appears in a purchase before ``until``.
    """
    rep = config.replenishment
    buyers = _repeat_buyers(events, config, until)
    if rep.consumables != "auto":
        skus = dict(rep.consumables)
        seen = set(
            purchase_orders(events, config, until=until, skus=skus, target="sku")["sku"].unique()
        )
        missing = sorted(set(skus) - seen)
        if missing:
            raise ConfigError(
                f"replenishment.consumables lists {missing}, never purchased before "
                f"{until:%Y-%m-%d}; fix the SKU names or use `consumables: auto`"
            )
        table = (
            pl.LazyFrame({"sku": list(skus)}, schema={"sku": pl.String})
            .join(buyers, on="sku", how="left")
            .with_columns(pl.col("repeat_buyers").fill_null(0))
        )
        packs = skus
    else:
        table = buyers.filter(pl.col("repeat_buyers") >= rep.min_repeat_buyers)
        packs = config.features.units_per_pack
    ranked = table.sort(["repeat_buyers", "sku"], descending=[True, False]).collect()
    return ranked.with_columns(
        pl.col("sku").cast(pl.String),
        pl.col("sku")
        .cast(pl.String)
        .replace_strict(packs, default=1.0, return_dtype=pl.Float64)
        .alias("units_per_pack"),
    )


def consumable_skus(
    events: pl.LazyFrame, config: LapseConfig, *, until: datetime
) -> dict[str, float]:
    """Consumable SKU -> units per pack, from ``replenishment.consumables``, most repeat
    buyers first.

    ``"auto"`` takes the SKUs with at least ``replenishment.min_repeat_buyers``
    users who ordered them in two or more orders (on two or more days without
    an ``order_id``) before ``until``; their units per pack come from ``features.units_per_pack`` (1 when not listed).

    Raises
    ------
    ConfigError
        An explicit SKU never appears in a purchase before ``until``.
    """
    table = consumable_table(events, config, until=until)
    return dict(zip(table["sku"].to_list(), table["units_per_pack"].to_list(), strict=True))


def episodes(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    cutoff: datetime,
    skus: dict[str, float] | None,
    target: Target,
) -> pl.DataFrame:
    """Every episode starting before ``cutoff``, censored at it.

    Returns
    -------
    pl.DataFrame
        ``user_id, sku, start, end, duration_days, observed``: ``end`` is the
        next order (``observed``) or ``cutoff`` (censored); durations are in
        days, at least one hour.

    Examples
    --------
    >>> from datetime import UTC, datetime
    >>> from lapse.config import load_config
    >>> d = lambda day: datetime(2024, 1, day, tzinfo=UTC)
    >>> ev = pl.LazyFrame({"user_id": ["a"] * 3, "ts": [d(1), d(11), d(25)],
    ...     "event": ["order_completed"] * 3, "sku": ["P"] * 3})
    >>> ep = episodes(ev, load_config(), cutoff=d(20), skus={"P": 1.0}, target="sku")
    >>> ep.select("duration_days", "observed").rows()
    [(10.0, True), (9.0, False)]
    """
    t = utc_cutoff(cutoff, "cutoff")
    orders = purchase_orders(events, config, until=t, skus=skus, target=target)
    nxt = pl.col("ts").shift(-1).over("user_id", "sku", order_by="ts")
    return (
        orders.lazy()
        .with_columns(nxt.alias("_next"))
        .select(
            "user_id",
            "sku",
            pl.col("ts").alias("start"),
            pl.coalesce("_next", pl.lit(t)).alias("end"),
            pl.col("_next").is_not_null().alias("observed"),
        )
        .with_columns(
            frac_days(pl.col("end"), pl.col("start")).clip(_MIN_DAYS).alias("duration_days")
        )
        .select("user_id", "sku", "start", "end", "duration_days", "observed")
        .sort("user_id", "sku", "start")
        .collect()
    )


def open_episodes(
    events: pl.LazyFrame,
    config: LapseConfig,
    *,
    as_of: datetime,
    skus: dict[str, float] | None,
    target: Target,
    orders: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The open episode of each key as of ``as_of``: its latest order before it.

    Episodes older than ``replenishment.max_open_days`` count as lapsed and
    are left out. Reads events before ``as_of`` only; ``orders``: their
    :func:`~lapse.features.episodes_covariates.purchase_orders` before ``as_of``,
    when the caller has them.

    Returns
    -------
    pl.DataFrame
        ``user_id, sku, start, elapsed_days``.
    """
    t = utc_cutoff(as_of)
    if orders is None:
        orders = purchase_orders(events, config, until=t, skus=skus, target=target)
    return (
        orders.group_by("user_id", "sku")
        .agg(pl.col("ts").max().alias("start"))
        .with_columns(frac_days(pl.lit(t), pl.col("start")).alias("elapsed_days"))
        .filter(pl.col("elapsed_days") <= config.replenishment.max_open_days)
        .sort("user_id", "sku")
    )


def reorder_outcomes(
    events: pl.LazyFrame,
    open_eps: pl.DataFrame,
    config: LapseConfig,
    *,
    as_of: datetime,
    until: datetime,
    skus: dict[str, float] | None,
    target: Target,
    links: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The next order of each open episode in ``[as_of, until)``.

    With identity ``links`` the open episodes keep their ids (those of the links
    before ``as_of``) and the next order follows the person: its orders under any
    of its ids, resolved with every link (as :func:`lapse.labels.churn_labels` does).

    Returns
    -------
    pl.DataFrame
        ``open_eps`` plus ``residual_days`` (days from ``as_of`` to the next
        order, or to ``until`` when censored) and ``observed``.
    """
    t, end = utc_cutoff(as_of), utc_cutoff(until, "until")
    keyed = open_eps.with_columns(pl.col("user_id").alias(_PERSON))
    if links is not None and not links.is_empty():
        events = identity.resolve(events, links, None)
        keyed = identity.resolve(keyed.lazy(), links, None, column=_PERSON).collect()
    later = (
        purchase_orders(events, config, until=end, skus=skus, target=target)
        .filter(pl.col("ts") >= t)
        .group_by(pl.col("user_id").alias(_PERSON), "sku")
        .agg(pl.col("ts").min().alias("_next"))
    )
    return (
        keyed.join(later, on=[_PERSON, "sku"], how="left")
        .with_columns(
            frac_days(pl.coalesce("_next", pl.lit(end)), pl.lit(t))
            .clip(_MIN_DAYS)
            .alias("residual_days"),
            pl.col("_next").is_not_null().alias("observed"),
        )
        .drop("_next", _PERSON)
    )


def check_target(target: str) -> Target:
    """``target`` as a :data:`Target`, or a :class:`ConfigError`."""
    if target == "sku":
        return "sku"
    if target == "any":
        return "any"
    raise ConfigError(f"replenishment.target must be 'sku' or 'any', got {target!r}")
