"""Alerts: thresholds of [monitor.alerts] checked against each sample, with a hold time.

A condition must be true for `hold_seconds` before its alert fires and false
for `hold_seconds` before it resolves, so a value that hovers around its
threshold gives one alert, not a flapping stream. Each transition is logged as
one JSON line (logger "appliance.alerts", fields alert/state/value/threshold)
and counted (appliance_alerts_total{alert,state}); firing alerts are a gauge
(appliance_alerts_firing{alert}). Time is a parameter (`evaluate(sample, now)`)
so tests run the hold without sleeping.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("appliance.alerts")

RECENT_KEPT = 50


def _get(sample: dict[str, Any], *path: str) -> Any:
    value: Any = sample
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _above(limit: float, value: Any) -> bool:
    return limit > 0 and isinstance(value, int | float) and value > limit


def conditions(settings: Any, sample: dict[str, Any]) -> dict[str, tuple[bool, Any, Any, str]]:
    """Every alert's (active, value, threshold, description) for one sample."""
    a = settings
    disk_free = _get(sample, "host", "disk", "free_percent")
    failed = [f"{r['role']}[{r['index']}]" for r in _get(sample, "processes", "rows") or [] if r.get("state") == "failed"]
    db_ok = _get(sample, "database", "reachable")
    redis = sample.get("redis")
    stores_down = ([] if db_ok else ["database"]) + (["redis"] if redis is not None and not redis.get("reachable") else [])
    return {
        "host_cpu": (_above(a.cpu_percent, _get(sample, "host", "cpu")), _get(sample, "host", "cpu"), a.cpu_percent, "host cpu %"),
        "host_memory": (
            _above(a.memory_percent, _get(sample, "host", "memory", "percent")),
            _get(sample, "host", "memory", "percent"),
            a.memory_percent,
            "host memory % in use",
        ),
        "disk_free": (
            a.disk_free_percent > 0 and isinstance(disk_free, int | float) and disk_free < a.disk_free_percent,
            disk_free,
            a.disk_free_percent,
            "free % of the data dir's disk",
        ),
        "error_ratio": (
            _above(a.error_ratio, _get(sample, "api", "error_ratio")),
            _get(sample, "api", "error_ratio"),
            a.error_ratio,
            "share of 5xx answers",
        ),
        "p99_latency": (
            _above(a.p99_ms, _get(sample, "api", "latency", "p99")),
            _get(sample, "api", "latency", "p99"),
            a.p99_ms,
            "p99 latency ms",
        ),
        "queue_age": (
            _above(a.queue_age_seconds, _get(sample, "tasks", "oldest_queued_age")),
            _get(sample, "tasks", "oldest_queued_age"),
            a.queue_age_seconds,
            "seconds the oldest queued task waits",
        ),
        "login_failures": (
            _above(a.login_failures_per_min, _get(sample, "security", "failed_logins_per_min")),
            _get(sample, "security", "failed_logins_per_min"),
            a.login_failures_per_min,
            "failed logins per minute",
        ),
        "process_failed": (a.process_failed and bool(failed), ", ".join(failed) or None, None, "processes given up by the supervisor"),
        "store_unreachable": (
            a.store_unreachable and bool(stores_down),
            ", ".join(stores_down) or None,
            None,
            "stores that cannot be reached",
        ),
    }


class Alerts:
    """The alert state machine: pending -> firing -> resolving -> resolved, per alert name."""

    def __init__(self, settings: Any, on_change: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.on_change = on_change
        self._since: dict[str, float] = {}  # when the condition last changed from the alert's state
        self.firing: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_KEPT)

    def evaluate(self, sample: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """Update from one sample; returns the transitions it caused (each also logged and kept in `recent`)."""
        hold = self.settings.hold_seconds
        changes = []
        for name, (active, value, threshold, what) in conditions(self.settings, sample).items():
            firing = name in self.firing
            if active == firing:  # nothing to change: forget a half-held opposite condition
                self._since.pop(name, None)
                if firing:
                    self.firing[name]["value"] = value
                continue
            started = self._since.setdefault(name, now)
            if now - started < hold:
                continue
            self._since.pop(name, None)
            event = {
                "alert": name,
                "state": "firing" if active else "resolved",
                "value": value,
                "threshold": threshold,
                "what": what,
                "at": now,
            }
            if active:
                self.firing[name] = {**event, "since": now}
            else:
                event["since"] = self.firing.pop(name)["since"]
            self.recent.appendleft(event)
            changes.append(event)
            log.warning("alert %s %s", name, event["state"], extra={"fields": {k: v for k, v in event.items() if k != "at"}})
            if self.on_change:
                self.on_change(name, event["state"])
        return changes

    def view(self) -> dict[str, Any]:
        return {"firing": list(self.firing.values()), "recent": list(self.recent)}
