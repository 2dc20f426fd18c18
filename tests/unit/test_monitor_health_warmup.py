"""/health/status's queue check is cheap from the first request: the worker opens the queue when it builds the app."""

from __future__ import annotations

import threading

from tests.api_support import client_for


def test_the_queue_is_opened_when_the_app_is_built_not_by_the_first_check(make_config) -> None:
    from appliance.tasks import broker as queue

    cfg = make_config()
    client_for(cfg)
    for t in threading.enumerate():
        if t.name == "queue-warmup":
            t.join(30)
    assert queue._key(cfg) in queue._queues  # without the warm-up the first /health/status would pay huey's import and setup
    status = client_for(cfg).simulate_get("/health/status")
    assert status.json["checks"]["queue"]["status"] == "healthy"
