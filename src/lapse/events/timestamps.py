"""Timestamp parsing and format inference, as Polars expressions.

Every parsed stamp ends as ``Datetime("us", "UTC")``. Naive stamps are read as
local time in the configured zone; on the autumn DST overlap the earlier
instant is taken, and wall-clock times skipped in spring become null (and are
then rejected as ``unparsable_ts``).

Formats (``source.timestamp.format``): a strftime pattern (integer dates like
``20101201`` work with ``"%Y%m%d"``), ``"iso"`` (ISO 8601 with or without an
offset, ``Z`` allowed), ``"epoch_s"``, ``"epoch_ms"``, ``"epoch_us"``,
``"epoch_ns"``. With ``None`` the format is inferred by
:func:`infer_timestamp_format` from a sample of values.
"""

from __future__ import annotations

import re
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from lapse.exceptions import ConfigError
from lapse.schema import TS_DTYPE

__all__ = [
    "EPOCH_FORMATS",
    "check_timezone",
    "infer_timestamp_format",
    "parse_timestamp",
]

EPOCH_FORMATS: Final[dict[str, int]] = {
    "epoch_s": 1_000_000,
    "epoch_ms": 1_000,
    "epoch_us": 1,
    "epoch_ns": -1_000,  # negative: divide
}
_ISO_RE: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*([Zz]|[+-]\d{2}(:?\d{2})?)?)?$"
)
_DIGITS_RE: Final = re.compile(r"^-?\d+(\.0*)?$")
# Other string layouts tried on a sample, most specific first. Day-first and
# month-first both appear; a sample that fits both is reported as ambiguous.
_STRING_FORMATS: Final = (
    "%d/%m/%Y %H:%M:%S",
    "%d/%m/%Y %H:%M",
    "%d/%m/%Y",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y",
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d.%m.%Y",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d",
    "%d-%m-%Y %H:%M:%S",
    "%d-%m-%Y",
    "%d %b %Y %H:%M:%S",
    "%d %b %Y",
    "%a, %d %b %Y %H:%M:%S %z",
)
_ISO_AWARE: Final = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z")
_ISO_NAIVE: Final = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")
_YMD_MIN, _YMD_MAX = 1900_01_01, 2100_12_31
# Share of sampled values a guessed layout must parse (the rest become unparsable_ts rejects).
_MIN_FIT: Final = 0.5
_FORMAT_HELP: Final = (
    "set source.timestamp.format to a strftime pattern (e.g. '%d/%m/%Y %H:%M'), "
    "iso, epoch_s, epoch_ms or epoch_us"
)


def check_timezone(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a known IANA time zone."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"source.timestamp.timezone: unknown time zone {name!r}; "
            "use an IANA name such as 'UTC' or 'Europe/London'"
        ) from None


def _localise(naive: pl.Expr, timezone: str) -> pl.Expr:
    return (
        naive.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
        .dt.convert_time_zone("UTC")
        .dt.cast_time_unit("us")
    )


def _as_text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Integers (and integral floats such as ``20101201.0``) as digit strings."""
    if dtype.is_float():
        return expr.cast(pl.Int64, strict=False).cast(pl.String)
    return expr.cast(pl.String).str.strip_chars()


def _strftime(expr: pl.Expr, dtype: pl.DataType, fmt: str, timezone: str) -> pl.Expr:
    text = _as_text(expr, dtype)
    if "%z" in fmt or "%Z" in fmt or "%:z" in fmt:
        return text.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False)
    return _localise(text.str.to_datetime(fmt, time_unit="us", strict=False), timezone)


def _iso(expr: pl.Expr, timezone: str) -> pl.Expr:
    text = (
        expr.cast(pl.String)
        .str.strip_chars()
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"\s*[Zz]$", "+00:00")
        .str.replace(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*([+-]\d{2})$", "${1}${2}:00")
        .str.replace(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*([+-]\d{2}:?\d{2})$", "${1}${2}")
    )
    aware = [
        text.str.to_datetime(f, time_unit="us", time_zone="UTC", strict=False) for f in _ISO_AWARE
    ]
    naive = [
        _localise(text.str.to_datetime(f, time_unit="us", strict=False), timezone)
        for f in _ISO_NAIVE
    ]
    return pl.coalesce(*aware, *naive)


def _epoch(expr: pl.Expr, dtype: pl.DataType, fmt: str) -> pl.Expr:
    factor = EPOCH_FORMATS[fmt]
    if dtype.is_integer():
        ticks = expr.cast(pl.Int64)
        micros = ticks * factor if factor > 0 else ticks // -factor
    else:
        # Floats (fractional seconds) and digit strings.
        number = expr.cast(pl.Float64, strict=False)
        scaled = number * factor if factor > 0 else number / -factor
        micros = scaled.round(0).cast(pl.Int64, strict=False)
    return pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")


def parse_timestamp(expr: pl.Expr, dtype: pl.DataType, fmt: str | None, timezone: str) -> pl.Expr:
    """``expr`` (of source dtype ``dtype``) as ``Datetime("us", "UTC")``; failures become null.

    ``fmt`` must already be resolved for non-temporal columns (see
    :func:`infer_timestamp_format`); temporal columns ignore it.
    """
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return _localise(expr, timezone)
        return expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(dtype, pl.Date):
        return _localise(expr.cast(pl.Datetime("us")), timezone)
    if dtype == pl.Null:
        return pl.lit(None, dtype=TS_DTYPE)
    if fmt is None:
        raise ConfigError(f"timestamp format unresolved for a {dtype} column; {_FORMAT_HELP}")
    if fmt in EPOCH_FORMATS:
        return _epoch(expr, dtype, fmt)
    if fmt == "iso":
        return _iso(expr, timezone)
    return _strftime(expr, dtype, fmt, timezone)


def _numeric_format(values: pl.Series) -> str:
    ints = values.cast(pl.Float64)
    if ((ints >= _YMD_MIN) & (ints <= _YMD_MAX) & (ints == ints.floor())).all():
        as_date = values.cast(pl.Int64).cast(pl.String).str.to_date("%Y%m%d", strict=False)
        if as_date.null_count() == 0:
            return "%Y%m%d"
    magnitude = float(ints.abs().sort()[ints.len() // 2])
    if magnitude < 1e11:
        return "epoch_s"
    if magnitude < 1e14:
        return "epoch_ms"
    if magnitude < 1e17:
        return "epoch_us"
    return "epoch_ns"


def _string_format(values: pl.Series, where: str) -> str:
    text = values.cast(pl.String).str.strip_chars()
    enough = _MIN_FIT * text.len()
    digits = text.filter(text.str.contains(_DIGITS_RE.pattern))
    if digits.len() >= enough:
        return _numeric_format(digits.cast(pl.Float64))
    if text.str.contains(_ISO_RE.pattern).sum() >= enough:
        return "iso"
    frame = text.to_frame("v")
    fits: list[tuple[str, pl.Series]] = []
    for fmt in _STRING_FORMATS:
        parsed = frame.select(
            pl.col("v").str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False)
            if "%z" in fmt
            else pl.col("v").str.to_datetime(fmt, time_unit="us", strict=False)
        ).to_series()
        if parsed.len() - parsed.null_count() >= enough:
            fits.append((fmt, parsed))
    best = max((s.len() - s.null_count() for _, s in fits), default=0)
    top = [(fmt, s) for fmt, s in fits if s.len() - s.null_count() == best]
    distinct = [fmt for i, (fmt, s) in enumerate(top) if all(not s.equals(t) for _, t in top[:i])]
    example = text[0]
    if len(distinct) > 1:
        options = " or ".join(repr(f) for f in distinct)
        raise ConfigError(
            f"{where}: timestamps like {example!r} fit {options} (day or month first?); "
            "set source.timestamp.format"
        )
    if not distinct:
        raise ConfigError(
            f"{where}: cannot infer the format of timestamps like {example!r}; {_FORMAT_HELP}"
        )
    return distinct[0]


def infer_timestamp_format(sample: pl.Series, where: str) -> str | None:
    """Guess the timestamp format from a sample of non-null source values.

    Returns ``None`` for Datetime/Date columns (no parsing needed). Integers
    (and digit strings) that are all valid ``YYYYMMDD`` dates give
    ``"%Y%m%d"``; other numbers are epoch seconds / millis / micros / nanos by
    magnitude (below 1e11 / 1e14 / 1e17 / above). Strings matching ISO 8601
    give ``"iso"``; otherwise the common day-first and month-first layouts
    are tried and the one that parses most of the sample wins. A guess must
    fit at least half of the sample; the values it cannot parse are later
    rejected as ``unparsable_ts``.

    Raises
    ------
    ConfigError
        No layout fits, or both a day-first and a month-first layout fit.
    """
    values = sample.drop_nulls()
    if values.dtype.is_temporal():
        return None
    if values.dtype.is_float():
        values = values.fill_nan(None).drop_nulls()
    if values.len() == 0:
        return "iso"
    if values.dtype.is_numeric():
        return _numeric_format(values)
    return _string_format(values, where)
