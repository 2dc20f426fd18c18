"""/health/status's queue check is cheap from the first request: the worker opens the queue when it starts,
and building the app opens nothing (the template builds it before any worker is forked: app.prebuild)."""

from __future__ import annotations

import threading

from falcon import testing

from appliance.api.app import create_app


def test_the_queue_is_opened_when_the_worker_starts_not_when_the_app_is_built_nor_by_the_first_check(make_config) -> None:
    from appliance.tasks import broker as queue

    cfg = make_config()
    app = create_app(cfg, check_responses=True)
    threads = set(threading.enumerate())
    assert queue._key(cfg) not in queue._queues
    app.ctx.start_background()
    try:
        for t in set(threading.enumerate()) - threads:
            if t.name == "warmup":
                t.join(30)
        assert queue._key(cfg) in queue._queues  # without the warm-up the first /health/status would pay huey's import and setup
        status = testing.TestClient(app).simulate_get("/health/status")
        assert status.json["checks"]["queue"]["status"] == "healthy"
    finally:
        app.ctx.stop_background()
