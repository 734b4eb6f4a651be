"""Every stored time is one format: UTC, ISO 8601, millisecond precision, ``Z`` suffix
(``2026-11-26T08:15:00.123Z``). It sorts as text and compares as time, so SQL may compare
stored stamps with ``<``. Anything that enters the store from outside (Discord timestamps,
community files, callers) goes through ``to_utc`` first; an unparseable time is an error, never
a string compared as is.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["format_utc", "parse_utc", "to_utc", "utc_now"]


def format_utc(dt: datetime) -> str:
    """The stored form of ``dt`` (a naive datetime is taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def utc_now() -> str:
    return format_utc(datetime.now(UTC))


def parse_utc(stamp: str) -> datetime:
    """An aware UTC datetime from an ISO 8601 date-time (``Z`` or an offset; naive = UTC).
    Raises ValueError for anything else, including a time of day without a date."""
    if not isinstance(stamp, str) or not stamp.strip():
        raise ValueError(f"not a timestamp: {stamp!r}")
    text = stamp.strip()
    if len(text) < 10 or text[4] != "-" or text[7] != "-":
        raise ValueError(f"not an ISO 8601 date-time (a date is required): {stamp!r}")
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 and the like: out of datetime's range
        raise ValueError(f"timestamp out of range: {stamp!r}") from None


def to_utc(value: str | datetime) -> str:
    """The stored form of a datetime or an ISO 8601 string; ValueError when it is neither."""
    if isinstance(value, datetime):
        return format_utc(value)
    return format_utc(parse_utc(value))
