"""The monitor's memory: bounded ring buffers of samples, and rates from counters.

`History` keeps the last `seconds` of points (one per sample) in a deque with a
fixed maxlen, so it can never grow past the hour it is meant to hold however
long the monitor runs. `Rates` turns monotonic counters (prometheus totals) into
per-second rates between two samples; a counter that went down (its process
restarted and its file was dropped) restarts from zero instead of giving a
negative rate.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any


class History:
    """The last `seconds` of points at one point per `interval`, never more than `maxlen` points."""

    def __init__(self, seconds: float, interval: float):
        self.maxlen = max(2, math.ceil(seconds / interval))
        self._points: deque[dict[str, Any]] = deque(maxlen=self.maxlen)
        self._lock = threading.Lock()

    def add(self, point: dict[str, Any]) -> None:
        with self._lock:
            self._points.append(point)

    def since(self, t: float = 0.0) -> list[dict[str, Any]]:
        """Points newer than `t` (all of them for 0), oldest first."""
        with self._lock:
            return [p for p in self._points if p["t"] > t]

    def __len__(self) -> int:
        return len(self._points)


class Rates:
    """Per-second rates of named counters between successive `update` calls."""

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}
        self._at: float | None = None

    def update(self, now: float, totals: dict[Any, float]) -> dict[Any, float]:
        dt = now - self._at if self._at is not None else 0.0
        out: dict[Any, float] = {}
        for key, value in totals.items():
            before = self._last.get(key)
            if dt <= 0 or before is None:
                out[key] = 0.0
            else:
                out[key] = max(0.0, value - before) / dt if value >= before else value / dt
        self._last = dict(totals)
        self._at = now
        return out


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram given as cumulative (upper bound, count) pairs, by linear interpolation.

    None when the histogram holds no observations. Values beyond the last finite
    bound are reported as that bound (what Prometheus' histogram_quantile does).
    """
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in pairs:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
