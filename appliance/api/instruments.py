"""The API's prometheus instruments, created once per process on first use.

In a worker, appliance.metrics.prepare(cfg) has pointed prometheus_client at the
shared multiprocess directory before this module imports it, so every worker's
counts land in <data_dir>/metrics and /api/metrics, /metrics and the status page
read them all. In tests without that directory the same objects count in memory.
"""

from __future__ import annotations

import threading
from typing import Any

REQUESTS = "appliance_api_requests_total"
LATENCY = "appliance_api_request_duration_seconds"
INFLIGHT = "appliance_api_requests_in_flight"
AUTH_EVENTS = "appliance_api_auth_events_total"

_lock = threading.Lock()
_made: dict[str, Any] = {}


def _make() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "requests": Counter(REQUESTS[: -len("_total")], "API requests by route and status", ["method", "route", "status"]),
        "latency": Histogram(
            LATENCY,
            "API request latency by route",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        ),
        "inflight": Gauge(INFLIGHT, "API requests being handled now", multiprocess_mode="livesum"),
        "auth": Counter(AUTH_EVENTS[: -len("_total")], "logins, lockouts and token rejections by kind", ["kind"]),
    }


def get() -> dict[str, Any]:
    """{"requests", "latency", "inflight", "auth"} of this process."""
    if not _made:
        with _lock:
            if not _made:
                _made.update(_make())
    return _made


def auth_event(kind: str) -> None:
    get()["auth"].labels(kind=kind).inc()
