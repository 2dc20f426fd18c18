"""The reference design's Celery side, written for the benchmark: one app on Redis, results kept.

`celery -A bench.stack.reftasks worker --pool prefork --concurrency 2` and
`celery -A bench.stack.reftasks beat` run it; the Flask app (refapp) submits
through `sample.apply_async`. Broker and result keys carry REF_KEY_PREFIX so a
run never meets another's keys on the shared Redis. Settings come from the
environment that bench/stack/reference.py sets.

`sample` does what the appliance's built-in sample does: logs start and end,
reports progress (a state write, as the reference design tracks progress) and
echoes its data; it also returns its start and end times for the benchmark.
The design's retry_config (max_retries 3) is on the task; acks stay early, the
Celery default the design keeps.
"""

from __future__ import annotations

import logging
import os
import time

from celery import Celery

REDIS_URL = os.environ.get("REF_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("REF_KEY_PREFIX", "refbench:")
QUEUE = os.environ.get("REF_QUEUE", "refbench")

app = Celery("reftasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": KEY_PREFIX},
    result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
    result_expires=3600,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={"heartbeat": {"task": "reftasks.heartbeat", "schedule": 30.0}},
)
log = logging.getLogger("reftasks")


@app.task(name="reftasks.sample", bind=True, max_retries=3)
def sample(self, data: dict) -> dict:
    started = time.time()
    log.info("sample started (attempt %d)", self.request.retries + 1)
    self.update_state(state="PROGRESS", meta={"progress": 100.0, "message": "done"})
    log.info("sample finished")
    return {"echo": data, "attempt": self.request.retries + 1, "started": started, "finished": time.time()}


@app.task(name="reftasks.heartbeat")
def heartbeat() -> float:
    """What beat sends: the design's node heartbeat, here only a timestamp."""
    return time.time()
