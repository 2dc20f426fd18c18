"""Time in one form everywhere: naive UTC datetimes in the database, ISO 8601 with Z on the wire."""

from __future__ import annotations

import datetime as _dt
import time

UTC = _dt.UTC


def utcnow() -> _dt.datetime:
    """Now as a naive UTC datetime (what the database columns store)."""
    return _dt.datetime.now(UTC).replace(tzinfo=None)


def from_timestamp(ts: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def iso(value: _dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, millisecond precision; None stays None."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def parse_iso(text: str) -> _dt.datetime:
    """Parse an ISO 8601 timestamp (Z or offset; naive means UTC) into naive UTC; ValueError if bad."""
    value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def now_iso() -> str:
    return iso(utcnow())  # type: ignore[return-value]


monotonic = time.monotonic
