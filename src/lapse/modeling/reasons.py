"""Reason codes: why the shipped churn model rates a user risky, in words.

Reasons come from the model the race shipped (``ChurnBundle.selected``):

``lightgbm``, ``lightgbm_stacked``, ``lightgbm_hazard``
    Its inputs ranked by exact TreeSHAP value (:mod:`lapse.modeling._treeshap`;
    the hazard model's summed over the horizon's two halves).
    The stacked model's ``score_bgnbd`` and ``score_recency`` are told as the
    quantities behind them ("no order for 96 days; usually orders every 31 days").
``bgnbd``
    Its own summary: days since the last active day (against the customer's
    usual gap, with P(alive) when it is low) and the number of active days.
``recency``
    Days since the last qualifying activity.
``rules``
    The fired churn triggers, then days since the last usage (the tie-break).

A factor is a reason only when it raises this user's risk: its value lies on
the risky side of the population's median (fewer sessions, longer away; a
factor without a side, such as a plan, passes) and moving it alone to that
median lowers the model's score. So a reason never reads backwards and high
spend is never a reason for risk. The medians are the training rows'
(``LightGBMChurn.typical_``, ``BGNBD.typical_``).

Words come from the config's roles (:class:`Words`); numbers are rounded as a
person says them: whole days, "1,240", "about 2.5 a week".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from lapse.config import LapseConfig
from lapse.modeling._treeshap import MIN_ROWS
from lapse.modeling.bgnbd import BTYD_COLUMNS, btyd_arrays
from lapse.modeling.hazard import LightGBMHazard
from lapse.modeling.lgbm import TENURE_CAP_DAYS, LightGBMChurn, typical_inputs
from lapse.modeling.rules import CHURN_TRIGGERS, recency_days, trigger_exprs

if TYPE_CHECKING:
    from lapse.modeling.race import RaceScorer

__all__ = ["CHUNK_ROWS", "Reason", "Words", "describe", "explain", "reasons"]

FloatArray = npt.NDArray[np.float64]

#: Rows explained at a time: bounds the SHAP matrix (~80 MB at 100 features); larger
#: chunks share more of the TreeSHAP work (:mod:`lapse.modeling._treeshap`).
CHUNK_ROWS = 100_000
#: Drivers checked per row beyond ``top`` (one prediction of the chunk each, at most).
EXTRA_TRIES: Final = 3
#: A driver moved to its median must lower the log-odds by more than this.
LOGIT_TOL: Final = 1e-9
#: Columns BG/NBD's and recency's texts read besides the features (added to the explained rows).
P_ALIVE: Final = "_lapse_p_alive"
RECENCY: Final = "_lapse_recency_days"


@dataclass(frozen=True)
class Reason:
    """One reason: the shipped model's input it is about (``factor``) and its words.

    ``factor`` is a feature column (LightGBM); ``score_bgnbd`` or ``score_recency``
    (the stacked model's own inputs); ``days_since`` or ``frequency`` (BG/NBD's
    ``T - t_x`` and repeat active days; recency's days since the last activity);
    or a churn trigger's name (rules).
    """

    factor: str
    text: str


# -- numbers as a person says them ------------------------------------------------------------


def _round(v: float) -> int:
    return math.floor(v + 0.5)


def _say(v: float) -> str:
    """Whole from 10 up or when whole ("1,240"), else one decimal ("2.5")."""
    if abs(v) >= 9.95 or float(v).is_integer():
        return f"{_round(v):,}"
    return f"{v:.1f}".removesuffix(".0")


def _days(v: float) -> str:
    n = _round(v)
    return "1 day" if n == 1 else f"{n:,} days"


def _every(v: float) -> str:
    n = _round(v)
    return "day" if n <= 1 else f"{n:,} days"


def _money(v: float) -> str:
    return f"{_round(v):,}" if abs(v) >= 10 or float(v).is_integer() else f"{v:.2f}"


def _chance(p: float) -> str:
    """P(alive) as a person says it: "about a 25% chance", "under a 1% chance"."""
    pct = 100 * p
    if pct < 1:
        return "under a 1% chance"
    return f"about a {_round(pct) if pct < 10 else 5 * _round(pct / 5)}% chance"


# -- the config's words --------------------------------------------------------------------


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    return word + "s"


def _noun(events: list[str], fallback: tuple[str, str]) -> tuple[str, str]:
    """One event name that reads as a noun (``brew``, ``page_view``), else ``fallback``."""
    if len(events) != 1:
        return fallback
    word = re.sub(r"[_\-\s]+", " ", events[0]).strip().lower()
    if not word or not word[0].isalpha() or word.endswith("ed"):
        return fallback
    return word, _plural(word)


@dataclass(frozen=True)
class Words:
    """How reasons name the config's roles: ``(singular, plural)`` per role.

    ``purchase`` is orders. ``usage`` is the usage role's event name when it
    lists exactly one that reads as a noun (``brew``: brews, ``page_view``:
    page views; not a past tense such as ``device_used``), else sessions;
    ``consumption`` likewise, else uses. ``activity`` is what BG/NBD and
    recency count (``labels.activity_roles``): ``purchase`` (orders) or
    ``usage`` when only that role has events, else ``any`` (activity).

    Examples
    --------
    >>> from lapse.config import LapseConfig
    >>> w = Words.of(LapseConfig(roles={"usage": ["brew"], "purchase": ["order"]}))
    >>> w.nouns["usage"], w.since(96.0), w.every(31.2)
    (('brew', 'brews'), 'no activity for 96 days', 'usually active every 31 days')
    """

    nouns: Mapping[str, tuple[str, str]]
    activity: str

    @classmethod
    def of(cls, config: LapseConfig) -> Words:
        roles = config.roles
        nouns = {
            "usage": _noun(roles.usage, ("session", "sessions")),
            "purchase": ("order", "orders"),
            "event": ("action", "actions"),
            "aha": ("aha moment", "aha moments"),
            "error": ("error", "errors"),
            "setup_started": ("setup started", "setups started"),
            "setup_completed": ("setup completed", "setups completed"),
            "consumption": _noun(roles.consumption, ("use", "uses")),
            "cancel": ("cancellation", "cancellations"),
            "return": ("return", "returns"),
        }
        active = [r for r in config.labels.activity_roles if roles.of(r)]
        activity = active[0] if active in (["purchase"], ["usage"]) else "any"
        return cls(nouns=nouns, activity=activity)

    def _act(self) -> str:
        return {"purchase": "order", "usage": self.nouns["usage"][0]}.get(self.activity, "activity")

    def since(self, days: float) -> str:
        """No qualifying activity for ``days``."""
        return f"no {self._act()} for {_days(days)}"

    def never(self) -> str:
        return f"no {self._act()} yet"

    def every(self, gap: float) -> str:
        """The customer's usual gap between active days."""
        if self.activity == "purchase":
            return f"usually orders every {_every(gap)}"
        if self.activity == "usage":
            return f"usually one every {_every(gap)}"
        return f"usually active every {_every(gap)}"

    def single(self, days: float) -> str:
        if self.activity == "purchase":
            return f"a single order so far, {_days(days)} ago"
        return f"active on a single day so far, {_days(days)} ago"

    def count(self, n: float, age: float) -> str:
        """``n`` active days since the first, ``age`` days ago."""
        if self.activity == "purchase":
            return f"only {_say(n)} orders in {_days(age)}"
        return f"active on only {_say(n)} of the last {_days(age)}"


# -- one phrase per feature -----------------------------------------------------------------

Row = Mapping[str, Any]
Render = Callable[[re.Match[str], Row, Words], str | None]


@dataclass(frozen=True)
class _Phrase:
    """``side``: +1 high values raise risk, -1 low ones, 0 the model alone decides;
    ``never_high``: a null (never happened) counts as the highest value."""

    pattern: re.Pattern[str]
    side: int
    render: Render
    never_high: bool = False


def _num(row: Row, name: str) -> float | None:
    v = row.get(name)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _count_head(role: str, w: int, v: float, words: Words) -> str:
    sing, plur = words.nouns[role]
    if v == 0:
        return f"no {plur} in the last {w} days"
    return f"only {_say(v)} {sing if v == 1 else plur} in the last {w} days"


def _before(row: Row, role: str, w: int, v: float) -> float | None:
    longer = _num(row, f"{role}_count_{2 * w}d")
    return None if longer is None else longer - v


def _count_low(m: re.Match[str], row: Row, words: Words) -> str | None:
    role, w, v = m["role"], int(m["w"]), _num(row, m[0])
    if v is None:
        return None
    text = _count_head(role, w, v, words)
    before = _before(row, role, w, v)
    if before is not None and before > v:
        text += f", down from {_say(before)} the {w} days before"
    return text


def _count_high(m: re.Match[str], row: Row, words: Words) -> str | None:
    role, w, v = m["role"], int(m["w"]), _num(row, m[0])
    if not v:
        return None
    sing, plur = words.nouns[role]
    text = f"{_say(v)} {sing if v == 1 else plur} in the last {w} days"
    before = _before(row, role, w, v)
    if before is not None and before < v:
        text += f", up from {_say(before)} the {w} days before"
    return text


def _count_plain(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, m[0])
    if v is None:
        return None
    sing, plur = words.nouns[m["role"]]
    return f"{'no' if v == 0 else _say(v)} {sing if v == 1 else plur} in the last {m['w']} days"


def _since_last(m: re.Match[str], row: Row, words: Words) -> str | None:
    role, v = m["role"], _num(row, m[0])
    if role == "event" and words.activity in ("purchase", "usage"):
        activity = _num(row, f"days_since_last_{words.activity}")
        if v is not None and activity == v:  # the last event was an order (or the usage)
            return words.since(v)
    what = "activity" if role == "event" else words.nouns[role][0]
    return f"no {what} yet" if v is None else f"no {what} for {_days(v)}"


def _recent_error(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, m[0])
    if v is None:
        return None
    return "an error in the last day" if v < 1 else f"an error {_days(v)} ago"


def _decay(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, "usage_count_14d")
    before = None if v is None else _before(row, "usage", 14, v)
    if v is None or before is None or before <= v:
        return None
    return f"{_count_head('usage', 14, v, words)}, down from {_say(before)} the 14 days before"


def _dropping(m: re.Match[str], row: Row, words: Words) -> str | None:
    v, u28 = _num(row, "usage_count_7d"), _num(row, "usage_count_28d")
    if v is None or u28 is None or (u28 - v) / 3 <= v:
        return None
    before = u28 - v
    then = f"about {_say(before / 3)} a week" if before >= 3 else _say(before)
    return f"{_count_head('usage', 7, v, words)}, vs {then} in the 3 weeks before"


def _slope(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, m[0])
    if v is None or _say(-v) in ("0", "-0") or v > 0:
        return None
    plur = words.nouns["usage"][1]
    return f"{plur} down by about {_say(-v)} a week, week after week, over the last 8 weeks"


def _overdue(m: re.Match[str], row: Row, words: Words) -> str | None:
    ratio, gap = _num(row, m[0]), _num(row, "mean_active_gap_days")
    if ratio is None or gap is None or ratio <= 1:
        return None
    days = _num(row, "days_since_last_event")
    away = ratio * gap if days is None else days
    if _round(away) <= _round(gap):
        return None
    return f"no activity for {_days(away)}; usually active every {_every(gap)}"


def _btyd(row: Row) -> tuple[float, float, float] | None:
    x, t, age = (_num(row, c) for c in BTYD_COLUMNS)
    return None if x is None or t is None or age is None else (x, t, age)


def _bgnbd_since(row: Row, words: Words) -> str | None:
    """Days since the last activity, against the usual gap (and P(alive) when low).

    The days are the record's own (:data:`RECENCY`, whole days as the features
    count them) when the row has them, else BG/NBD's ``T - t_x``.
    """
    summary = _btyd(row)
    if summary is None:
        return words.never()
    x, t, age = summary
    days = _num(row, RECENCY)
    days = age - t if days is None or math.isinf(days) else days
    if x == 0:
        return words.single(days)
    text, gap = words.since(days), t / x
    if _round(days) > _round(gap):
        text += f"; {words.every(gap)}"
        p = _num(row, P_ALIVE)
        if p is not None and p < 0.5:
            text += f"; {_chance(p)} they are still active"
    return text


def _bgnbd_orders(row: Row, words: Words) -> str | None:
    summary = _btyd(row)
    return None if summary is None else words.count(summary[0] + 1, summary[2])


def _score_bgnbd(m: re.Match[str], row: Row, words: Words) -> str | None:
    """BG/NBD's view: overdue against the usual gap, a single day so far, or infrequent."""
    summary = _btyd(row)
    if summary is None or summary[0] == 0 or summary[2] - summary[1] > summary[1] / summary[0]:
        return _bgnbd_since(row, words)
    return _bgnbd_orders(row, words)


def _score_recency(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, RECENCY)
    return words.never() if v is None or math.isinf(v) else words.since(v)


def _fallback(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = row.get(m[0])
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    name = m[0].replace("_", " ")
    if isinstance(v, bool):
        return f"{name}: {'yes' if v else 'no'}"
    return f"{name}: {_say(v) if isinstance(v, int | float) else v}"


def _value(text: Callable[[re.Match[str], float], str | None]) -> Render:
    """A render of the feature's own value (None when it has none)."""

    def render(m: re.Match[str], row: Row, words: Words) -> str | None:
        v = _num(row, m[0])
        return None if v is None else text(m, v)

    return render


def _tenure(m: re.Match[str], row: Row, words: Words) -> str | None:
    v = _num(row, "tenure_days")
    v = _num(row, m[0]) if v is None else v
    if v is None:
        return None
    if v < 1:
        return "a new customer, first seen in the last day"
    if v < TENURE_CAP_DAYS:
        return f"a new customer, first seen {_days(v)} ago"
    return f"customer for {_days(v)}"


_LOW_ROLES = "usage|purchase|event|aha|setup_completed|consumption"
_PHRASES: Final[tuple[_Phrase, ...]] = tuple(
    _Phrase(re.compile(pattern), side, render, never)
    for pattern, side, render, never in (
        (rf"^(?P<role>{_LOW_ROLES})_count_(?P<w>\d+)d$", -1, _count_low, False),
        (r"^(?P<role>error|cancel|return)_count_(?P<w>\d+)d$", 1, _count_high, False),
        (r"^(?P<role>setup_started)_count_(?P<w>\d+)d$", 0, _count_plain, False),
        (r"^days_since_last_error$", -1, _recent_error, False),
        (rf"^days_since_last_(?P<role>{_LOW_ROLES})$", 1, _since_last, True),
        (
            r"^active_days_(?P<w>\d+)d$",
            -1,
            _value(
                lambda m, v: (
                    f"not active in the last {m['w']} days"
                    if v == 0
                    else f"active on only {_say(v)} of the last {m['w']} days"
                )
            ),
            False,
        ),
        (
            r"^revenue_(?P<w>\d+)d$",
            -1,
            _value(
                lambda m, v: (
                    f"no spend in the last {m['w']} days"
                    if v <= 0
                    else f"spent only {_money(v)} in the last {m['w']} days"
                )
            ),
            False,
        ),
        (
            r"^units_bought_(?P<w>\d+)d$",
            -1,
            _value(
                lambda m, v: (
                    f"nothing bought in the last {m['w']} days"
                    if v == 0
                    else f"only {_say(v)} units bought in the last {m['w']} days"
                )
            ),
            False,
        ),
        (
            r"^units_consumed_(?P<w>\d+)d$",
            -1,
            _value(
                lambda m, v: (
                    f"no units used in the last {m['w']} days"
                    if v == 0
                    else f"only {_say(v)} units used in the last {m['w']} days"
                )
            ),
            False,
        ),
        (r"^tenure_days_capped$", 0, _tenure, False),
        (r"^decay_ratio_14d$", -1, _decay, False),
        (r"^dropping_ratio_7d$", -1, _dropping, False),
        (r"^usage_slope_8w$", -1, _slope, False),
        (
            r"^current_streak_days$",
            -1,
            _value(
                lambda m, v: (
                    "not active yesterday" if v == 0 else f"a daily streak of only {_days(v)}"
                )
            ),
            False,
        ),
        (
            r"^events_per_active_day$",
            -1,
            _value(lambda m, v: f"only about {_say(v)} actions a day when active"),
            False,
        ),
        (
            r"^events_per_active_week$",
            -1,
            _value(lambda m, v: f"only about {_say(v)} actions a week when active"),
            False,
        ),
        (
            r"^mean_active_gap_days$",
            1,
            _value(lambda m, v: f"usually active only every {_every(v)}"),
            False,
        ),
        (r"^recency_over_mean_gap$", 1, _overdue, False),
        (
            r"^aha_reached$",
            -1,
            _value(lambda m, v: None if v else "has not reached the aha moment yet"),
            False,
        ),
        (
            r"^days_purchase_to_aha$",
            1,
            _value(
                lambda m, v: (
                    None if v < 0 else f"took {_days(v)} from the first order to the aha moment"
                )
            ),
            False,
        ),
        (
            r"^milestone_(?P<m>.+)_crossed_7d$",
            -1,
            _value(
                lambda m, v: (
                    None if v else f"no new {m['m'].replace('_', ' ')} milestone in the last 7 days"
                )
            ),
            False,
        ),
        (
            r"^setup_incomplete$",
            1,
            _value(lambda m, v: "setup started but not completed" if v else None),
            False,
        ),
        (r"^units_left$", 0, _value(lambda m, v: f"{_say(v)} units left"), False),
        (
            r"^consumption_rate_28d$",
            -1,
            _value(lambda m, v: f"using only about {_say(v)} units a day"),
            False,
        ),
        (
            r"^days_of_supply_left$",
            0,
            _value(lambda m, v: f"about {_days(v)} of supply left"),
            False,
        ),
        (
            r"^mean_order_gap_days$",
            1,
            _value(lambda m, v: f"usually orders only every {_every(v)}"),
            False,
        ),
        (
            r"^std_order_gap_days$",
            1,
            _value(
                lambda m, v: f"irregular orders: the gap between them varies by about {_days(v)}"
            ),
            False,
        ),
        (r"^score_bgnbd$", 1, _score_bgnbd, False),
        (r"^score_recency$", 1, _score_recency, False),
        (r"^.+$", 0, _fallback, False),
    )
)


@lru_cache(maxsize=4096)
def _phrase(name: str) -> tuple[_Phrase, re.Match[str]]:
    for phrase in _PHRASES:
        m = phrase.pattern.match(name)
        if m is not None:
            return phrase, m
    raise AssertionError("the last phrase matches every name")


def _say_feature(name: str, row: Row, words: Words) -> str | None:
    phrase, m = _phrase(name)
    try:
        return phrase.render(m, row, words)
    except (KeyError, TypeError):
        return None


def describe(name: str, row: Row, config: LapseConfig | None = None) -> str | None:
    """Feature ``name`` of a user's feature ``row`` as a reason for risk, in words.

    None when the value cannot be a reason for risk as it stands (usage up, the
    aha moment reached, no value). ``config`` gives the role words (default:
    sessions, orders; see :class:`Words`).

    Examples
    --------
    >>> describe("usage_count_14d", {"usage_count_14d": 2, "usage_count_28d": 13})
    'only 2 sessions in the last 14 days, down from 11 the 14 days before'
    >>> describe("days_since_last_purchase", {"days_since_last_purchase": 96})
    'no order for 96 days'
    """
    return _say_feature(name, row, Words.of(config if config is not None else LapseConfig()))


class _Row(Mapping[str, Any]):
    """Row ``i`` of a frame as a read-only mapping; columns become lists on first use.

    The phrases read a handful of columns per row, so this avoids turning every
    row into a dict of every feature (gigabytes at a million rows). ``cache`` is
    shared by the rows of one frame (``None``: a column it lacks).
    """

    def __init__(self, frame: pl.DataFrame, cache: dict[str, list[Any] | None], i: int) -> None:
        self._frame, self._cache, self._i = frame, cache, i

    def _column(self, name: str) -> list[Any] | None:
        if name in self._cache:
            return self._cache[name]
        col = self._frame[name].to_list() if name in self._frame.schema else None
        self._cache[name] = col
        return col

    def __getitem__(self, name: str) -> Any:
        col = self._column(name)
        if col is None:
            raise KeyError(name)
        return col[self._i]

    def get(self, name: str, default: Any = None) -> Any:
        col = self._column(name)
        return default if col is None else col[self._i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._frame.columns)

    def __len__(self) -> int:
        return self._frame.width


@lru_cache(maxsize=65_536)
def _topic(text: str) -> str:
    """What a reason is about: its words before the first clause, numbers left out, so
    "no sessions in the last 7 days" and "... 14 days, down from 3 ..." are one topic."""
    return re.split(r"[;,] ", re.sub(r"\d[\d,.]*", "#", text))[0]


# -- per shipped model --------------------------------------------------------------------


def _tree(
    model: LightGBMChurn | LightGBMHazard, inputs: pl.DataFrame, words: Words, top: int
) -> list[list[Reason]]:
    """TreeSHAP ranks the drivers; each is checked by moving it alone to its median."""
    names = model.feature_names_
    x = model.encode(inputs)
    # on many rows a move is summed over the trees that split on the input moved
    shap, moves = model.drivers(x, moves=len(x) >= MIN_ROWS)
    contrib = shap[:, :-1]
    typical: FloatArray | None = getattr(model, "typical_", None)
    if typical is None:  # fitted before models kept their medians: the rows' own
        typical = typical_inputs(x, [j for j, n in enumerate(names) if n in model.categories_])
    phrases = [_phrase(n) for n in names]
    side = np.array([p.side for p, _ in phrases])
    never_high = np.array([p.never_high for p, _ in phrases])
    value = np.where(np.isnan(x) & never_high, np.inf, x)
    with np.errstate(invalid="ignore"):
        risky = np.where(side > 0, value > typical, np.where(side < 0, value < typical, True))
    candidate = (contrib > 0) & risky
    ranked = np.argsort(np.where(candidate, -contrib, np.inf), axis=1, kind="stable")
    ranked = ranked[:, : top + EXTRA_TRIES]
    # the log-odds, as the SHAP values add up to them (to ~1e-14: a move must beat that)
    logit = shap.sum(axis=1)
    base = logit - LOGIT_TOL
    cache: dict[str, list[Any] | None] = {}
    out: list[list[Reason]] = [[] for _ in range(len(x))]
    topics: list[set[str]] = [set() for _ in range(len(x))]
    count = np.zeros(len(x), dtype=np.int64)
    for r in range(ranked.shape[1]):
        col_r = ranked[:, r]
        live = np.flatnonzero((count < top) & candidate[np.arange(len(x)), col_r])
        rows, cols, texts = [], [], []
        for i, j in zip(live.tolist(), col_r[live].tolist(), strict=True):
            text = _say_feature(names[j], _Row(inputs, cache, i), words)
            if text is None or _topic(text) in topics[i]:
                continue
            rows.append(i)
            cols.append(j)
            texts.append(text)
        if not rows:
            continue
        at, col = np.asarray(rows), np.asarray(cols)
        if moves is not None:
            lower = logit[at] + moves.delta(at, col, typical[col]) < base[at]
        else:
            moved = x[at]
            moved[np.arange(len(at)), col] = typical[col]
            lower = model.predict_encoded(moved, raw_score=True) < base[at]
        for k in np.flatnonzero(lower).tolist():
            i = rows[k]
            out[i].append(Reason(names[cols[k]], texts[k]))
            topics[i].add(_topic(texts[k]))
            count[i] += 1
    return out


def _bgnbd_typical(
    scorer: RaceScorer, x: FloatArray, t: FloatArray, age: FloatArray
) -> dict[str, float]:
    stored: dict[str, float] | None = getattr(scorer.bgnbd, "typical_", None)
    if stored is not None:
        return stored
    # fitted before models kept their medians: the rows' own
    return {
        "frequency": float(np.quantile(x, 0.5, method="lower")),
        "days_since": float(np.quantile(age - t, 0.5, method="lower")),
    }


def _bgnbd(scorer: RaceScorer, chunk: pl.DataFrame, words: Words, top: int) -> list[list[Reason]]:
    """BG/NBD's two levers: days since the last active day, and repeat active days."""
    model, horizon = scorer.bgnbd, float(scorer.config.labels.horizon_days)
    x, t, age = btyd_arrays(chunk)
    known = chunk[BTYD_COLUMNS[2]].is_not_null().to_numpy()
    typ = _bgnbd_typical(scorer, x, t, age)
    since, m_since, m_freq = age - t, typ["days_since"], typ["frequency"]
    base = 1.0 - model.p_any_purchase(horizon, x, t, age)
    # the last active day moved later; with a single one so far, a younger customer
    t_moved = np.where(x > 0, np.clip(age - m_since, 0.0, age), t)
    age_moved = np.where(x > 0, age, np.minimum(age, m_since))
    drops = {
        "days_since": np.where(
            known & (since > m_since),
            base - (1.0 - model.p_any_purchase(horizon, x, t_moved, age_moved)),
            0.0,
        ),
        "frequency": np.where(
            known & (x < m_freq),
            base - (1.0 - model.p_any_purchase(horizon, np.full_like(x, m_freq), t, age)),
            0.0,
        ),
    }
    texts = {"days_since": _bgnbd_since, "frequency": _bgnbd_orders}
    rows = chunk.with_columns(
        pl.Series(P_ALIVE, model.p_alive(x, t, age)),
        pl.Series(RECENCY, recency_days(chunk, scorer.config)),
    )
    cache: dict[str, list[Any] | None] = {}
    out: list[list[Reason]] = []
    for i in range(chunk.height):
        found = []
        for factor in sorted(drops, key=lambda f: -drops[f][i]):
            text = texts[factor](_Row(rows, cache, i), words) if drops[factor][i] > 0 else None
            if text is not None:
                found.append(Reason(factor, text))
        out.append(found[:top])
    return out


def _recency_reason(
    scorer: RaceScorer, days: FloatArray, say: Callable[[float | None], str | None]
) -> list[Reason | None]:
    """Days since the last activity (``say`` them; None: never), when longer than the
    BG/NBD population's median."""
    typ: dict[str, float] | None = getattr(scorer.bgnbd, "typical_", None)
    finite = days[np.isfinite(days)]
    m_since = (
        typ["days_since"] if typ is not None else float(np.median(finite)) if finite.size else 0.0
    )
    out: list[Reason | None] = []
    for d in days.tolist():
        text = say(None if math.isinf(d) else d) if d > m_since else None
        out.append(None if text is None else Reason("days_since", text))
    return out


def _activity_days(words: Words) -> Callable[[float | None], str | None]:
    return lambda d: words.never() if d is None else words.since(d)


def _rules(scorer: RaceScorer, chunk: pl.DataFrame, words: Words, top: int) -> list[list[Reason]]:
    """The fired churn triggers in words, then how long since the last usage."""
    config = scorer.config
    exprs = trigger_exprs(chunk, config)
    fired = chunk.select(exprs[t].fill_null(False).alias(t) for t in CHURN_TRIGGERS)
    window = config.rules.friction_window_days
    features = {
        "usage_decay": "decay_ratio_14d",
        "dropping_activity": "dropping_ratio_7d",
        "friction_alert": f"error_count_{window}d",
    }
    if config.roles.usage and "days_since_last_usage" in chunk.columns:
        days = chunk["days_since_last_usage"].cast(pl.Float64).fill_null(np.inf).to_numpy()
        recent = _recency_reason(
            scorer,
            days,
            lambda d: _say_feature("days_since_last_usage", {"days_since_last_usage": d}, words),
        )
    else:
        recent = _recency_reason(scorer, recency_days(chunk, config), _activity_days(words))
    flags = {t: fired[t].to_list() for t in CHURN_TRIGGERS}
    cache: dict[str, list[Any] | None] = {}
    out: list[list[Reason]] = []
    for i in range(chunk.height):
        row = _Row(chunk, cache, i)
        found = []
        for trigger in CHURN_TRIGGERS:
            if not flags[trigger][i]:
                continue
            text = _trigger_text(trigger, features.get(trigger), row, words)
            found.append(Reason(trigger, text))
        since = recent[i]
        if since is not None:
            found.append(since)
        out.append(found[:top])
    return out


def _trigger_text(trigger: str, feature: str | None, row: Row, words: Words) -> str:
    text = None
    if feature is not None:
        text = _say_feature(feature, row, words)
        if trigger == "friction_alert" and text is None:
            text = _say_feature("setup_incomplete", row, words)
    elif trigger == "activation_nudge":
        days = _num(row, "days_since_first_purchase")
        if days is not None:
            text = f"no aha moment yet, {_days(days)} after the first order"
    return text if text is not None else trigger.replace("_", " ")


def _chunk(
    scorer: RaceScorer, selected: str, chunk: pl.DataFrame, words: Words, top: int
) -> list[list[Reason]]:
    if selected == "lightgbm":
        return _tree(scorer.lightgbm, chunk, words, top)
    if selected == "lightgbm_stacked" and scorer.stacked is not None:
        inputs = scorer.with_scores(chunk).with_columns(
            pl.Series(P_ALIVE, scorer.bgnbd.p_alive(*btyd_arrays(chunk))),
            pl.Series(RECENCY, recency_days(chunk, scorer.config)),
        )
        return _tree(scorer.stacked, inputs, words, top)
    if selected == "lightgbm_hazard" and scorer.hazard is not None:
        return _tree(scorer.hazard, chunk, words, top)
    if selected == "bgnbd":
        return _bgnbd(scorer, chunk, words, top)
    if selected == "recency":
        days = recency_days(chunk, scorer.config)
        recent = _recency_reason(scorer, days, _activity_days(words))
        return [[r] if r is not None else [] for r in recent]
    if selected == "rules":
        return _rules(scorer, chunk, words, top)
    raise ValueError(f"no reasons for model {selected!r}")


def explain(
    scorer: RaceScorer, selected: str, frame: pl.DataFrame, *, top: int = 3
) -> list[list[Reason]]:
    """Up to ``top`` reasons per row of ``frame`` from the shipped model ``selected``.

    ``frame`` holds feature rows as :meth:`ChurnBundle.prepare` makes them.
    Rows are explained in chunks of :data:`CHUNK_ROWS`, so memory stays bounded
    whatever the frame's size; a row may get fewer than ``top`` reasons, or none.
    """
    if top <= 0:
        return [[] for _ in range(frame.height)]
    words = Words.of(scorer.config)
    out: list[list[Reason]] = []
    for start in range(0, frame.height, CHUNK_ROWS):
        out.extend(_chunk(scorer, selected, frame.slice(start, CHUNK_ROWS), words, top))
    return out


def reasons(
    scorer: RaceScorer, selected: str, frame: pl.DataFrame, *, top: int = 3
) -> pl.DataFrame:
    """Key columns plus ``reasons`` (list of str): :func:`explain`'s texts."""
    keys = [c for c in ("user_id", "cutoff") if c in frame.columns]
    return frame.select(keys).with_columns(_texts(explain(scorer, selected, frame, top=top)))


def _texts(rows: list[list[Reason]]) -> pl.Series:
    """``reasons``: each row's texts as a list, built from one flat column of texts (a
    list of Python lists converts several times slower)."""
    flat = pl.Series("reasons", [r.text for row in rows for r in row], dtype=pl.String)
    at = np.repeat(np.arange(len(rows), dtype=np.uint32), [len(row) for row in rows])
    lists = (
        pl.DataFrame({"_at": at, "reasons": flat})
        .group_by("_at", maintain_order=True)
        .agg("reasons")
    )
    return (
        pl.DataFrame({"_at": np.arange(len(rows), dtype=np.uint32)})
        .join(lists, on="_at", how="left", maintain_order="left")
        .select(pl.col("reasons").fill_null(pl.lit([], dtype=pl.List(pl.String))))
        .to_series()
    )
