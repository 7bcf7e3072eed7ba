"""Synthetic events with ground truth: the data lapse's tests and demo run on.

A connected coffee-style device (``DEVICE-1``) with consumable pods
(``PODS-30``/``PODS-60``), a mug (``MUG-1``), an app and an optional
subscription. Each user has hidden state; the events are what a warehouse
would see and the truth frames are what a perfect model would know:

- sign-ups spread over the window; about 20% signed up during an 8-week
  burn-in before ``start`` (their earlier events are cut, as in any extract,
  and churn is only decided from ``start`` on, so they are day-0 survivors);
- lognormal per-user rates (few heavy users, many light), busier weekends,
  gamma day-to-day noise and pauses in healthy users (trips, busy weeks): a
  1.5% daily chance of an abrupt 5-24 day dip to 0-30% of the usual level,
  so about one active user in seven is paused on a given day and "usage
  down" fires for many users who come back;
- setup, abandoned by 12%; activation (``routine_created``) with a per-user
  daily chance after setup, never for 45% (many brew without a routine);
  usage ramps up over three weeks after activation;
- a daily churn hazard driven mostly by what the events show: 3x at signup,
  easing to 1.1x by day 90; 2.2x for an abandoned setup, 1.3x before
  activation, 1.4x with pods run out for two weeks; rising with how flaky
  the device and app are (the share of uses that fail, not the error count,
  so a heavy user's many errors are no alarm); lowered 0.4x by
  ``second_device_added`` and 0.75x for subscribers; light app users, the
  signup channel and a small hidden frailty do the rest; ``theme_changed``
  has no effect. Once churn is decided, subscribers cancel that day and
  usage fades gradually (unlike the abrupt pauses) over 1-6 weeks until the
  churn date, except for 10% abrupt quits within 1-3 days. 3% return the
  device within two weeks (cancelling that day) and churn the day after;
- pods are consumed by device use (telemetry events for 70% of devices, but
  every device consumes) and reordered around running out: 20% early, most
  0-4 days late, some up to three weeks late, 4% lapse (60% once churning).

Timing (2 cores): ``generate(100_000, 365)`` takes about 20 s and 3 GB,
with 18.1 M events (about 1.31 per user and live day) and 13.9 M
``truth_hazard`` rows; ``generate(2000, 180)`` takes about 0.6 s.

Examples
--------
>>> data = generate(n_users=200, n_days=60, seed=1)
>>> data.events.columns
['user_id', 'ts', 'event', 'sku', 'quantity', 'revenue']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.exceptions import LapseError
from lapse.schema import DAY_US, EVENT_COLUMNS

__all__ = [
    "EVENT_NAMES",
    "FILES",
    "SKU_PRICES",
    "SKU_UNITS",
    "SyntheticData",
    "generate",
    "scan_truth",
    "segment_export",
    "write",
    "write_segment",
]

IntArr = npt.NDArray[np.int64]
FloatArr = npt.NDArray[np.float64]
BoolArr = npt.NDArray[np.bool_]

EVENT_NAMES: Final[tuple[str, ...]] = (
    "signup",
    "app_open",
    "device_used",
    "order_completed",
    "order_returned",
    "routine_created",
    "device_error",
    "app_error",
    "setup_started",
    "setup_completed",
    "subscription_started",
    "subscription_cancelled",
    "second_device_added",
    "theme_changed",
)
_E = {name: code for code, name in enumerate(EVENT_NAMES)}

SKU_UNITS: Final[dict[str, int]] = {"PODS-30": 30, "PODS-60": 60}
"""Units (pods) per pack of each consumable SKU; order ``quantity`` counts packs."""
SKU_PRICES: Final[dict[str, float]] = {
    "DEVICE-1": 149.0,
    "PODS-30": 18.0,
    "PODS-60": 33.0,
    "MUG-1": 12.0,
}
_SKUS: Final = tuple(SKU_PRICES)
_UNITS = np.array([SKU_UNITS.get(sku, 0) for sku in _SKUS])
_S = {name: code for code, name in enumerate(_SKUS)}

_BURN_IN: Final = 56
_HORIZON: Final = 28  # truth_hazard's window, matching the default label horizon
# Once churn is decided, activity fades until the churn date: over 1-6 weeks for most,
# within 1-3 days for the abrupt quits.
_DECAY_MIN, _DECAY_MAX = 7, 42
_ABRUPT_P: Final = 0.1
_ABRUPT_MAX: Final = 3
_NEVER: Final = 1 << 30
_MIN_US: Final = 60_000_000
_BASE_HAZARD: Final = 0.0028
_WEEKDAY = np.array(
    [0.97, 0.95, 0.95, 0.95, 0.98, 1.1, 1.1]
)  # Mon..Sun: home device, busier weekends
_CHANNELS: Final = ("organic", "paid_search", "paid_social", "referral", "retail")
_CHANNEL_P = np.array([0.35, 0.2, 0.2, 0.1, 0.15])
_CHANNEL_HAZARD = np.array([0.9, 1.1, 1.35, 0.75, 1.0])
_COUNTRIES: Final = ("US", "GB", "DE", "FR", "CA", "AU", "NL", "SE")
_COUNTRY_P = np.array([0.45, 0.15, 0.12, 0.08, 0.08, 0.05, 0.04, 0.03])
_DOMAINS: Final = ("example.com", "example.org", "mail.example", "inbox.example")


@dataclass(frozen=True)
class SyntheticData:
    """Events, user attributes and the generator's ground truth.

    Attributes
    ----------
    events
        Canonical events (:data:`lapse.schema.EVENT_COLUMNS`), sorted by
        ``user_id, ts``.
    users
        One row per user: ``plan``, ``email``, ``phone``, ``country``,
        ``signup_channel``, ``email_consent``, ``do_not_contact``,
        ``external_id``.
    truth
        One row per user: ``signup_date``, latent ``churn_date`` (null when
        not within the simulation), ``activation_date``, ``consumption_rate``
        (units/day at steady habit while supplied; dips, decay and empty
        supply lower the realised rate), ``has_telemetry``, ``is_subscriber``,
        ``sticky_date``, ``neutral_date`` and ``depletions`` (per consumable
        order in the window: ``order_ts``, ``sku``, ``units`` and the date
        supply ran out after it, null if not within the simulation). Dates
        may precede the window start for users present at day 0.
    truth_hazard
        One row per user and window day from signup until the churn date:
        ``p_churn_28d``, the probability given the latent state that the
        churn date falls in ``[date, date + 28d)``.
    """

    events: pl.DataFrame
    users: pl.DataFrame
    truth: pl.DataFrame
    truth_hazard: pl.DataFrame


@dataclass
class _Log:
    """Columnar event chunks; ``tod == -1`` means draw a time of day at the end."""

    user: list[IntArr] = field(default_factory=list)
    day: list[IntArr] = field(default_factory=list)
    code: list[IntArr] = field(default_factory=list)
    sku: list[IntArr] = field(default_factory=list)
    qty: list[FloatArr] = field(default_factory=list)
    tod: list[IntArr] = field(default_factory=list)

    def add(
        self,
        users: IntArr,
        day: int,
        code: int,
        *,
        sku: int | IntArr = -1,
        qty: float | FloatArr = math.nan,
        tod: int | IntArr = -1,
    ) -> None:
        k = len(users)
        if k == 0:
            return
        self.user.append(users.astype(np.int32))
        self.day.append(np.full(k, day, np.int32))
        self.code.append(np.full(k, code, np.int8))
        self.sku.append(np.broadcast_to(np.asarray(sku, np.int8), (k,)))
        self.qty.append(np.broadcast_to(np.asarray(qty, np.float64), (k,)))
        self.tod.append(np.broadcast_to(np.asarray(tod, np.int64), (k,)))

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        if not self.user:
            empty = {"user": np.int32, "day": np.int32, "code": np.int8, "sku": np.int8}
            out: dict[str, npt.NDArray[Any]] = {k: np.empty(0, t) for k, t in empty.items()}
            return out | {"qty": np.empty(0, np.float64), "tod": np.empty(0, np.int64)}
        return {
            "user": np.concatenate(self.user),
            "day": np.concatenate(self.day),
            "code": np.concatenate(self.code),
            "sku": np.concatenate(self.sku),
            "qty": np.concatenate(self.qty),
            "tod": np.concatenate(self.tod),
        }


def _random_tod(rng: np.random.Generator, idx: IntArr) -> IntArr:
    """A uniform time of day (microseconds) per row; orders need theirs for the truth."""
    return rng.integers(0, DAY_US, len(idx))


def _decay_pmf() -> FloatArr:
    """``pmf[d]``: probability that a decided churn fades over ``d`` days."""
    pmf = np.zeros(_DECAY_MAX + 1)
    pmf[1 : _ABRUPT_MAX + 1] = _ABRUPT_P / _ABRUPT_MAX
    pmf[_DECAY_MIN:] += (1.0 - _ABRUPT_P) / (_DECAY_MAX - _DECAY_MIN + 1)
    return pmf


_DECAY_PMF: Final = _decay_pmf()


def _hazard_weights() -> FloatArr:
    """``w[k] = P(decay < horizon - k)`` for a churn decided ``k`` days from now."""
    cdf = np.cumsum(_DECAY_PMF)  # cdf[d] = P(decay <= d)
    return np.array([cdf[_HORIZON - k - 1] for k in range(_HORIZON)])


_W: Final = _hazard_weights()


def _p_within_horizon(h: FloatArr) -> FloatArr:
    """``sum_k h (1-h)^k w[k]`` by Horner's rule: churn decided in ``k`` days lands in time."""
    q = 1.0 - h
    acc = np.full_like(h, _W[-1])
    for w in _W[-2::-1]:
        acc = acc * q + w
    return h * acc


def generate(
    n_users: int = 2000, n_days: int = 180, seed: int = 0, start: date = date(2026, 1, 1)
) -> SyntheticData:
    """Simulate ``n_users`` over ``n_days`` from ``start`` (UTC); deterministic per ``seed``.

    Parameters
    ----------
    n_users
        Users in the population (about 20% already signed up before ``start``).
    n_days
        Length of the observed window.
    seed
        Seed of the NumPy generator; the same seed gives identical frames.
    start
        First day of the window.

    Returns
    -------
    SyntheticData
        Events, attributes and ground truth.
    """
    if n_users < 1 or n_days < 1:
        raise ValueError(f"n_users and n_days must be positive, got {n_users} and {n_days}")
    rng = np.random.default_rng(seed)
    sim = _simulate(n_users, n_days, start, rng)
    width = max(6, len(str(n_users - 1)))
    ids = pl.select(
        pl.concat_str(pl.lit("u"), pl.int_range(n_users).cast(pl.String).str.zfill(width))
    ).to_series()
    # Gathering from the n_users ids is far cheaper than formatting a string per row.
    uid = pl.lit(ids).gather(pl.col("user")).alias("user_id")
    return SyntheticData(
        events=_events(sim, uid, rng),
        users=_users(sim, uid, rng),
        truth=_truth(sim, uid),
        truth_hazard=_truth_hazard(sim, uid),
    )


@dataclass
class _Sim:
    """Everything the simulation leaves behind, indexed by user and simulation day."""

    n_days: int
    start: date
    log: _Log
    orders: _Log
    order_epoch: IntArr
    depletions: dict[str, IntArr]
    hazard: dict[str, npt.NDArray[Any]]
    user: dict[str, npt.NDArray[Any]]


def _simulate(n: int, n_days: int, start: date, rng: np.random.Generator) -> _Sim:
    """Run the day loop; every step is vectorised across the users alive that day."""
    days = _BURN_IN + n_days
    # --- per-user latent traits -------------------------------------------------
    pre = rng.random(n) < 0.2
    signup = np.where(pre, rng.integers(0, _BURN_IN, n), rng.integers(_BURN_IN, days, n))
    t0 = rng.integers(0, int(0.6 * DAY_US), n)  # signup time of day, leaves room for onboarding
    z = rng.standard_normal(n)  # shared engagement factor: heavy app users brew more too
    r_app = np.exp(np.log(0.8) + 0.8 * z + 0.45 * rng.standard_normal(n))
    r_dev = np.exp(np.log(1.1) + 0.45 * z + 0.3 * rng.standard_normal(n))
    telemetry = rng.random(n) < 0.7
    never_aha = rng.random(n) < 0.45
    aha_rate = np.where(never_aha, 0.0, np.exp(np.log(0.07) + 0.8 * rng.standard_normal(n)))
    err_rate = np.minimum(np.exp(np.log(0.015) + 1.0 * rng.standard_normal(n)), 0.5)
    frailty = np.exp(0.3 * rng.standard_normal(n) - 0.045)  # what no event reveals
    premium = rng.random(n) < 0.3
    channel = rng.choice(len(_CHANNELS), n, p=_CHANNEL_P)
    user_hazard = (
        _BASE_HAZARD
        * frailty
        * _CHANNEL_HAZARD[channel]
        * (r_app / 0.8) ** -0.25
        * (err_rate / 0.015) ** 0.6  # a flaky device (errors per use), not the error count
    )
    wants_sub = rng.random(n) < np.where(premium, 0.6, 0.2)
    sub_delay = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 31, n))
    sub_start = np.where(wants_sub, signup + sub_delay, _NEVER)
    setup_start = signup + np.where(rng.random(n) < 0.9, 0, rng.integers(1, 4, n))
    abandons = rng.random(n) < 0.12
    setup_lag = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 5, n))
    setup_done = np.where(abandons, _NEVER, setup_start + setup_lag)
    start_tod = np.where(
        setup_start == signup,
        t0 + rng.integers(5 * _MIN_US, 30 * _MIN_US, n),
        rng.integers(0, int(0.6 * DAY_US), n),
    )
    done_tod = np.where(
        setup_done == setup_start,
        start_tod + rng.integers(30 * _MIN_US, 180 * _MIN_US, n),
        rng.integers(0, DAY_US, n),
    )
    sub_tod = np.where(sub_start == signup, t0 + rng.integers(_MIN_US, 5 * _MIN_US, n), -1)
    order_tod = t0 + rng.integers(_MIN_US, 5 * _MIN_US, n)
    pref_sku = np.where(
        rng.random(n) < np.where(r_dev > 1.4, 0.6, 0.25), _S["PODS-60"], _S["PODS-30"]
    )

    # --- mutable state ----------------------------------------------------------
    churn_day = np.full(n, _NEVER)
    cancel_day = np.full(n, _NEVER)  # subscribers cancel when they decide to leave
    decided = np.zeros(n, bool)
    decay_len = np.ones(n, np.int64)
    # A few devices go back within two weeks; the return decides churn at signup.
    returns = ~pre & (rng.random(n) < 0.03)
    return_day = np.where(returns, signup + rng.integers(2, 15, n), _NEVER)
    decided[returns] = True
    churn_day[returns] = return_day[returns] + 1
    cancel_day[returns] = return_day[returns]
    sub_start[returns] = np.where(sub_start < return_day, sub_start, _NEVER)[returns]
    decay_len[returns] = churn_day[returns] - signup[returns]
    aha_day = np.full(n, _NEVER)
    sticky_day = np.full(n, _NEVER)
    neutral_day = np.full(n, _NEVER)
    mug = np.zeros(n, bool)
    dip_until = np.zeros(n, np.int64)
    dip_depth = np.ones(n)
    supply = np.zeros(n, np.int64)
    epoch = np.zeros(n, np.int64)
    depleted_since = np.full(n, _NEVER)
    lateness = np.zeros(n, np.int64)
    lapsed = np.zeros(n, bool)

    log = _Log()
    orders = _Log()  # every order, burn-in included, for the depletion truth; ``qty`` = packs
    order_epoch: list[IntArr] = []
    dep_user: list[IntArr] = []
    dep_epoch: list[IntArr] = []
    dep_day: list[IntArr] = []
    hz_user: list[IntArr] = []
    hz_day: list[IntArr] = []
    hz_p: list[npt.NDArray[np.float32]] = []

    by_signup = np.argsort(signup, kind="stable")
    signup_bounds = np.searchsorted(signup[by_signup], np.arange(days + 1))
    weekday0 = start.weekday() - _BURN_IN

    def draw_lateness(idx: IntArr, lapse_p: FloatArr) -> None:
        u = rng.random(len(idx))
        lateness[idx] = np.where(
            u < 0.2,
            -rng.integers(1, 8, len(idx)),  # orders ahead of running out
            np.where(u < 0.85, rng.integers(0, 5, len(idx)), rng.integers(5, 22, len(idx))),
        )
        lapsed[idx] = rng.random(len(idx)) < lapse_p

    def place_order(idx: IntArr, t: int, sku: IntArr, packs: IntArr, tod: IntArr) -> None:
        orders.add(idx, t, 0, sku=sku, qty=packs.astype(np.float64), tod=tod)
        order_epoch.append(epoch[idx].copy())
        if t >= _BURN_IN:
            log.add(idx, t, _E["order_completed"], sku=sku, qty=packs.astype(np.float64), tod=tod)

    for t in range(days):
        emit = t >= _BURN_IN
        new = by_signup[signup_bounds[t] : signup_bounds[t + 1]]
        alive = np.flatnonzero((signup <= t) & (t < churn_day))

        # --- churn hazard and its truth (before the day's events) ---------------
        if emit and len(alive):
            und = alive[~decided[alive]]
            h = user_hazard[und].copy()
            h *= 1.0 + 2.0 * np.exp(-(t - signup[und]) / 30.0)  # 3x at signup, 1.1x at 90 days
            h *= np.where(aha_day[und] < t, 1.0, 1.3)
            h *= np.where((setup_done[und] > t) & (t - setup_start[und] >= 4), 2.2, 1.0)
            h *= np.where(sticky_day[und] < t, 0.4, 1.0)
            h *= np.where(sub_start[und] < t, 0.75, 1.0)
            h *= np.where((supply[und] == 0) & (t - depleted_since[und] > 14), 1.4, 1.0)
            h = np.minimum(h, 0.3)
            dec = alive[decided[alive]]
            hz_user += [und, dec]
            hz_day.append(np.full(len(alive), t, np.int32))
            hz_p += [
                _p_within_horizon(h).astype(np.float32),
                (churn_day[dec] - t < _HORIZON).astype(np.float32),
            ]
            hit = und[rng.random(len(und)) < h]
            decided[hit] = True
            decay_len[hit] = rng.choice(len(_DECAY_PMF), len(hit), p=_DECAY_PMF)
            churn_day[hit] = t + decay_len[hit]
            cancel_day[hit] = t
            sub_start[hit] = np.where(sub_start[hit] < t, sub_start[hit], _NEVER)
            lapsed[hit] |= rng.random(len(hit)) < 0.6  # churners mostly stop reordering

        # --- cancellations on the day churn is decided -----------------------------
        if emit:
            leaving = alive[cancel_day[alive] == t]
            log.add(leaving[sub_start[leaving] < t], t, _E["subscription_cancelled"])

        # --- one-off lifecycle events ---------------------------------------------
        if emit:
            log.add(new, t, _E["signup"], tod=t0[new])
            for sel, name, tods in (
                (alive[setup_start[alive] == t], "setup_started", start_tod),
                (alive[setup_done[alive] == t], "setup_completed", done_tod),
                (alive[sub_start[alive] == t], "subscription_started", sub_tod),
            ):
                log.add(sel, t, _E[name], tod=tods[sel])
            ret = alive[return_day[alive] == t]
            log.add(ret, t, _E["order_returned"], sku=_S["DEVICE-1"], qty=-1.0)
        ones = np.ones(len(new), np.int64)
        place_order(new, t, np.full(len(new), _S["DEVICE-1"]), ones, order_tod[new])
        place_order(new, t, pref_sku[new], ones, order_tod[new])
        supply[new] += _UNITS[pref_sku[new]]
        draw_lateness(new, np.full(len(new), 0.04))

        if not len(alive):
            continue
        # --- activity --------------------------------------------------------------
        setup_ok = setup_done[alive] < t
        activated = aha_day[alive] < t
        ramp = np.clip((t - aha_day[alive]) / 21.0, 0.0, 1.0)
        habit = np.where(activated, 0.6 + 0.4 * ramp, 0.6) * np.where(setup_ok, 1.0, 0.35)
        in_decay = decided[alive]
        fade = np.where(
            in_decay, ((churn_day[alive] - t) / decay_len[alive]).clip(0.0, 1.0) ** 1.3, 1.0
        )
        starts_dip = ~in_decay & (rng.random(len(alive)) < 0.015)  # vacations, busy weeks
        n_dips = int(starts_dip.sum())
        dip_until[alive[starts_dip]] = t + rng.integers(5, 25, n_dips)
        dip_depth[alive[starts_dip]] = rng.uniform(0.0, 0.3, n_dips)
        dip = np.where(dip_until[alive] > t, dip_depth[alive], 1.0)
        level = habit * fade * dip * _WEEKDAY[(weekday0 + t) % 7]
        noisy = level * rng.gamma(4.0, 0.25, len(alive))
        n_app = rng.poisson(r_app[alive] * noisy)
        can_brew = setup_ok & (supply[alive] > 0)
        n_dev = np.minimum(rng.poisson(r_dev[alive] * noisy * can_brew), supply[alive])
        dev_err = rng.binomial(n_dev, err_rate[alive])
        app_err = rng.binomial(n_app, err_rate[alive] * 0.5)
        if emit:
            log.add(np.repeat(alive, n_app), t, _E["app_open"])
            tel = telemetry[alive]
            log.add(np.repeat(alive[tel], n_dev[tel]), t, _E["device_used"], qty=1.0)
            log.add(np.repeat(alive[tel], dev_err[tel]), t, _E["device_error"])
            log.add(np.repeat(alive, app_err), t, _E["app_error"])

        # --- supply: consumption and depletion ---------------------------------------
        supply[alive] -= n_dev
        ran_out = alive[(n_dev > 0) & (supply[alive] == 0)]
        dep_user.append(ran_out)
        dep_epoch.append(epoch[ran_out].copy())
        dep_day.append(np.full(len(ran_out), t))
        epoch[ran_out] += 1
        depleted_since[ran_out] = t

        # --- adoption: aha, sticky and neutral behaviors ------------------------------
        keen = alive[setup_ok]
        keen_fade = fade[setup_ok]
        u = rng.random((4, len(keen)))
        first_aha = keen[(aha_day[keen] == _NEVER) & (u[0] < aha_rate[keen] * keen_fade)]
        aha_day[first_aha] = t
        more = keen[(aha_day[keen] < t) & (u[0] < 0.03 * level[setup_ok])]
        # Sticky and neutral adoption share one rule that ignores the user's state (even
        # decay), so only the hazard differs: a clean planted effect and a clean null.
        sticky = keen[(sticky_day[keen] == _NEVER) & (u[1] < 0.004)]
        sticky_day[sticky] = t
        theme = keen[u[2] < 0.004]  # themes change again now and then; truth keeps the first
        neutral_day[theme] = np.minimum(neutral_day[theme], t)
        mugs = keen[~mug[keen] & (u[3] < 0.002)]
        mug[mugs] = True
        if emit:
            log.add(np.sort(np.concatenate([first_aha, more])), t, _E["routine_created"])
            log.add(sticky, t, _E["second_device_added"])
            log.add(theme, t, _E["theme_changed"])
        one_each = np.ones(len(mugs), np.int64)
        place_order(mugs, t, np.full(len(mugs), _S["MUG-1"]), one_each, _random_tod(rng, mugs))

        # --- reorders ------------------------------------------------------------------
        is_old = (signup[alive] < t) & ~lapsed[alive] & setup_ok
        old = alive[is_old]
        expected = np.maximum(r_dev[old] * habit[is_old], 0.05)  # the user's sense of their pace
        late = lateness[old]
        out = supply[old] == 0
        early = ~out & (late < 0) & (supply[old] / expected <= -late)
        due = out & (t - depleted_since[old] >= np.maximum(late, 0))
        buy = old[early | due]
        if len(buy):
            k = len(buy)
            sku = np.where(
                rng.random(k) < 0.9, pref_sku[buy], _S["PODS-30"] + _S["PODS-60"] - pref_sku[buy]
            )
            packs = np.where(rng.random(k) < 0.85, 1, np.where(rng.random(k) < 0.8, 2, 3))
            place_order(buy, t, sku, packs, _random_tod(rng, buy))
            supply[buy] += packs * _UNITS[sku]
            depleted_since[buy] = _NEVER
            draw_lateness(buy, np.where(decided[buy], 0.6, 0.04))

    cat = np.concatenate
    steady = np.where(aha_day < days, 1.0, 0.6) * (setup_done < days)
    return _Sim(
        n_days=n_days,
        start=start,
        log=log,
        orders=orders,
        order_epoch=cat(order_epoch),
        depletions={"user": cat(dep_user), "epoch": cat(dep_epoch), "day": cat(dep_day)},
        hazard={
            "user": cat(hz_user or [np.empty(0, np.int64)]),
            "day": cat(hz_day or [np.empty(0, np.int32)]),
            "p": cat(hz_p or [np.empty(0, np.float32)]),
        },
        user={
            "signup": signup,
            "t0": t0,
            "churn": churn_day,
            "aha": aha_day,
            "sticky": sticky_day,
            "neutral": neutral_day,
            "rate": r_dev * steady,
            "telemetry": telemetry,
            "subscriber": sub_start < np.minimum(churn_day, days),
            "premium": premium,
            "channel": channel,
        },
    )


def _day_to_date(col: str, sim: _Sim) -> pl.Expr:
    """Simulation day -> calendar date; days past the simulation become null."""
    offset = (sim.start - date(1970, 1, 1)).days - _BURN_IN
    days = _BURN_IN + sim.n_days
    return pl.when(pl.col(col) < days).then((pl.col(col) + offset).cast(pl.Int32).cast(pl.Date))


def _origin_us(sim: _Sim) -> int:
    """Microseconds since the epoch of the first simulation day (burn-in included)."""
    origin = datetime(sim.start.year, sim.start.month, sim.start.day, tzinfo=UTC)
    return int(origin.timestamp()) * 1_000_000 - _BURN_IN * DAY_US


def _events(sim: _Sim, uid: pl.Expr, rng: np.random.Generator) -> pl.DataFrame:
    cols = sim.log.columns()
    user = cols["user"]
    signup, t0 = sim.user["signup"], sim.user["t0"]
    # Random times fall after the signup on the signup day, so nothing precedes it.
    lo = np.where(cols["day"] == signup[user], t0[user] + 1, 0)
    price = pl.Series(list(SKU_PRICES.values()))
    span = (_BURN_IN + sim.n_days) * DAY_US
    # One int64 key (user, then time) sorts far faster than two columns; the stable sort
    # keeps an order's lines (device, starter pods) in the order they were placed.
    fits = len(signup) * span < 2**62
    rel = pl.col("day").cast(pl.Int64) * DAY_US + pl.when(pl.col("tod") >= 0).then("tod").otherwise(
        pl.col("lo") + (pl.col("u") * (DAY_US - pl.col("lo"))).cast(pl.Int64)
    )
    frame = (
        pl.DataFrame(cols | {"lo": lo, "u": rng.random(len(user))})
        .lazy()
        .with_columns(rel=rel)
        .with_columns(key=pl.col("user").cast(pl.Int64) * span + pl.col("rel"))
        .sort(["key"] if fits else ["user", "rel"], maintain_order=True)
    )
    is_order = pl.col("code").is_in([_E["order_completed"], _E["order_returned"]])
    return (
        frame.select(
            uid,
            (pl.col("rel") + _origin_us(sim))
            .cast(pl.Datetime("us"))
            .dt.replace_time_zone("UTC")
            .alias("ts"),
            pl.col("code")
            .replace_strict(dict(enumerate(EVENT_NAMES)), return_dtype=pl.String)
            .alias("event"),
            pl.col("sku").replace_strict(
                dict(enumerate(_SKUS)), default=None, return_dtype=pl.String
            ),
            pl.col("qty").fill_nan(None).alias("quantity"),
            pl.when(is_order)
            .then(pl.lit(price).gather(pl.col("sku").clip(0)) * pl.col("qty"))
            .alias("revenue"),
        )
        .cast(pl.Schema(EVENT_COLUMNS))
        .collect()
    )


def _truth(sim: _Sim, uid: pl.Expr) -> pl.DataFrame:
    od = sim.orders.columns()
    pods = [_S[s] for s in SKU_UNITS]
    keep = (od["day"] >= _BURN_IN) & np.isin(od["sku"], pods)
    units = _UNITS[od["sku"][keep]]
    day, tod = od["day"][keep].astype(np.int64), od["tod"][keep]
    orders = pl.DataFrame(
        {
            "user": od["user"][keep],
            "epoch": sim.order_epoch[keep],
            "order_ts": _origin_us(sim) + day * DAY_US + tod,
            "sku": od["sku"][keep].astype(np.int64),
            "units": units * od["qty"][keep].astype(np.int64),
        }
    )
    runs_out = pl.DataFrame(sim.depletions).rename({"day": "dep_day"})
    depletions = (
        orders.join(runs_out, on=["user", "epoch"], how="left")
        .sort("user", "order_ts", maintain_order=True)
        .group_by("user", maintain_order=True)
        .agg(
            pl.struct(
                pl.col("order_ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                pl.col("sku").replace_strict(dict(enumerate(_SKUS)), return_dtype=pl.String),
                "units",
                _day_to_date("dep_day", sim).alias("depletion_date"),
            ).alias("depletions")
        )
    )
    u = sim.user
    base = pl.DataFrame(
        {
            "user": np.arange(len(u["signup"]), dtype=np.int32),
            "signup": u["signup"],
            "churn": u["churn"],
            "aha": u["aha"],
            "sticky": u["sticky"],
            "neutral": u["neutral"],
            "consumption_rate": u["rate"],
            "has_telemetry": u["telemetry"],
            "is_subscriber": u["subscriber"],
        }
    )
    return base.join(depletions, on="user", how="left", maintain_order="left").select(
        uid,
        _day_to_date("signup", sim).alias("signup_date"),
        _day_to_date("churn", sim).alias("churn_date"),
        _day_to_date("aha", sim).alias("activation_date"),
        "consumption_rate",
        "has_telemetry",
        "is_subscriber",
        _day_to_date("sticky", sim).alias("sticky_date"),
        _day_to_date("neutral", sim).alias("neutral_date"),
        pl.col("depletions").fill_null([]),
    )


def _truth_hazard(sim: _Sim, uid: pl.Expr) -> pl.DataFrame:
    hz = sim.hazard
    days = _BURN_IN + sim.n_days
    return (
        pl.DataFrame(
            {
                "key": hz["user"].astype(np.int64) * days + hz["day"],
                "user": hz["user"].astype(np.int32),
                "day": hz["day"],
                "p_churn_28d": hz["p"],
            }
        )
        .sort("key")
        .select(uid, _day_to_date("day", sim).alias("date"), "p_churn_28d")
    )


def _users(sim: _Sim, uid: pl.Expr, rng: np.random.Generator) -> pl.DataFrame:
    n = len(sim.user["signup"])
    idx = np.arange(n)
    # An affine map with a multiplier coprime to 10**12 keeps platform ids unique.
    external = (idx * 982_451_653 + int(rng.integers(10**11))) % 10**12
    return pl.DataFrame(
        {
            "user": idx,
            "plan": np.where(sim.user["premium"], "premium", "basic"),
            "has_email": rng.random(n) >= 0.04,
            "domain": rng.integers(0, len(_DOMAINS), n),
            "phone": rng.integers(2_000_000_000, 10_000_000_000, n),
            "has_phone": rng.random(n) >= 0.35,
            "country": rng.choice(len(_COUNTRIES), n, p=_COUNTRY_P),
            "channel": sim.user["channel"],
            "consent": rng.random(n) < 0.7,
            "do_not_contact": rng.random(n) < 0.03,
            "external": external,
        }
    ).select(
        uid,
        "plan",
        pl.when("has_email")
        .then(
            pl.concat_str(
                uid,
                pl.lit("@"),
                pl.col("domain").replace_strict(dict(enumerate(_DOMAINS)), return_dtype=pl.String),
            )
        )
        .alias("email"),
        pl.when("has_phone")
        .then(pl.concat_str(pl.lit("+1"), pl.col("phone").cast(pl.String)))
        .alias("phone"),
        pl.col("country").replace_strict(dict(enumerate(_COUNTRIES)), return_dtype=pl.String),
        pl.col("channel")
        .replace_strict(dict(enumerate(_CHANNELS)), return_dtype=pl.String)
        .alias("signup_channel"),
        (pl.col("consent") & pl.col("has_email")).alias("email_consent"),
        "do_not_contact",
        pl.concat_str(pl.lit("plt_"), pl.col("external").cast(pl.String).str.zfill(12)).alias(
            "external_id"
        ),
    )


FILES: Final = ("events", "users", "truth", "truth_hazard")


def write(data: SyntheticData, out_dir: str | Path) -> dict[str, Path]:
    """Write the four frames as Parquet files under ``out_dir`` (created if needed).

    Returns
    -------
    dict[str, Path]
        ``events``, ``users``, ``truth`` and ``truth_hazard`` mapped to their files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in FILES:
        path = out / f"{name}.parquet"
        frame: pl.DataFrame = getattr(data, name)
        frame.write_parquet(path)
        paths[name] = path
    return paths


def scan_truth(truth_dir: str | Path, name: str) -> pl.LazyFrame:
    """Lazily read one of :func:`write`'s ground-truth files (``truth`` or ``truth_hazard``).

    Raises
    ------
    LapseError
        The file is not in ``truth_dir``.
    """
    path = Path(truth_dir) / f"{name}.parquet"
    if not path.exists():
        raise LapseError(f"{path}: not found; --truth takes the folder `lapse generate` wrote")
    return pl.scan_parquet(path)


#: Where :func:`write_segment` puts the export and its identity truth.
SEGMENT_FILES: Final = {"segment": "segment.ndjson", "identities": "identities.parquet"}


def segment_export(
    events: pl.DataFrame, *, anonymous_share: float = 0.3, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``events`` as a Segment export in which a share of users begin anonymous.

    Each chosen user (with two events or more) is ``anon-<user_id>`` until a
    random one of its events after the first: an ``identify`` call at that
    instant links the two ids, and from it on its track calls carry both.

    Returns
    -------
    tuple[pl.DataFrame, pl.DataFrame]
        The calls (``type``, ``event``, ``userId``, ``anonymousId``,
        ``timestamp`` as ISO 8601 text, ``messageId``, ``properties`` with
        ``sku``, ``quantity``, ``revenue``) in time order, and the truth:
        ``user_id``, ``anonymous_id``, ``identified_at`` per chosen user.
    """
    rng = np.random.default_rng(seed)
    counts = events.group_by("user_id").len().sort("user_id")
    eligible = counts.filter(pl.col("len") >= 2)
    chosen = eligible.filter(pl.Series(rng.random(eligible.height) < anonymous_share))
    picks = chosen.with_columns(
        pl.Series("k", (rng.random(chosen.height) * (chosen["len"] - 1).to_numpy()).astype(int) + 1)
    )
    ranked = events.with_columns(pl.int_range(pl.len()).over("user_id").alias("_i"))
    identities = (
        ranked.join(
            picks.select("user_id", "k"), left_on=["user_id", "_i"], right_on=["user_id", "k"]
        )
        .select(
            "user_id",
            ("anon-" + pl.col("user_id")).alias("anonymous_id"),
            pl.col("ts").alias("identified_at"),
        )
        .sort("user_id")
    )
    stamp = pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("timestamp")
    tracked = ranked.join(identities, on="user_id", how="left").select(
        pl.lit("track").alias("type"),
        "event",
        pl.when(pl.col("ts") < pl.col("identified_at"))
        .then(None)
        .otherwise(pl.col("user_id"))
        .alias("userId"),
        pl.col("anonymous_id").alias("anonymousId"),
        "ts",
        pl.struct("sku", "quantity", "revenue").alias("properties"),
    )
    identify = identities.select(
        pl.lit("identify").alias("type"),
        pl.lit(None, pl.String).alias("event"),
        pl.col("user_id").alias("userId"),
        pl.col("anonymous_id").alias("anonymousId"),
        pl.col("identified_at").alias("ts"),
        pl.struct(
            pl.lit(None, pl.String).alias("sku"),
            pl.lit(None, pl.Float64).alias("quantity"),
            pl.lit(None, pl.Float64).alias("revenue"),
        ).alias("properties"),
    )
    calls = (
        pl.concat([tracked, identify])
        .sort("ts", "type", maintain_order=True)
        .with_columns(stamp, pl.format("m{}", pl.int_range(pl.len())).alias("messageId"))
        .select("type", "event", "userId", "anonymousId", "timestamp", "messageId", "properties")
    )
    return calls, identities


def write_segment(
    data: SyntheticData, out_dir: str | Path, *, anonymous_share: float = 0.3, seed: int = 0
) -> dict[str, Path]:
    """Write :func:`segment_export` of ``data.events``: ``segment.ndjson`` (the export) and
    ``identities.parquet`` (who was anonymous until when) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calls, identities = segment_export(data.events, anonymous_share=anonymous_share, seed=seed)
    paths = {name: out / file for name, file in SEGMENT_FILES.items()}
    calls.write_ndjson(paths["segment"])
    identities.write_parquet(paths["identities"])
    return paths
