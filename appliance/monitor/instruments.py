"""The monitor's own prometheus instruments (alerts, the alert webhook), made on first use in the shared metrics directory."""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_made: dict[str, Any] = {}


def _get() -> dict[str, Any]:
    if not _made:
        with _lock:
            if not _made:
                from prometheus_client import Counter, Gauge

                _made["total"] = Counter("appliance_alerts", "alert transitions by alert and state (firing, resolved)", ["alert", "state"])
                _made["firing"] = Gauge("appliance_alerts_firing", "alerts firing now", multiprocess_mode="livemax")
                _made["webhook"] = Counter(
                    "appliance_alert_webhook", "alert changes for [monitor] alert_webhook by result (sent, failed, dropped)", ["result"]
                )
    return _made


def start() -> None:
    """Make the families exist (appliance_alerts_firing 0) before the first alert."""
    _get()["firing"].set(0)


def alert(name: str, state: str, firing: int) -> None:
    """Count one alert transition and set how many fire now."""
    m = _get()
    m["total"].labels(alert=name, state=state).inc()
    m["firing"].set(firing)


def webhook(result: str) -> None:
    """Count one alert webhook outcome: sent, failed (after its retries) or dropped (queue full)."""
    _get()["webhook"].labels(result=result).inc()
