"""The scheduler role: fires cron schedules from the database onto the queue.

`serve(cfg, index)` calls `schedules.tick(cfg, now)` every TICK seconds until
SIGTERM/SIGINT, then exits 0. Any number of schedulers may run (on one host
or many): each slot fires exactly once because firing inserts the unique
(schedule, slot) ScheduleRun row in the same transaction as the task (see
appliance.tasks.schedules). The reaper does not run here: it runs in every
worker (appliance.queue.worker), where the queue is consumed. The upload
retention sweep (appliance.queue.retention) does: one scheduler runs per host.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from appliance.logs import fields
from appliance.queue import retention
from appliance.tasks import records, schedules
from appliance.times import utcnow

log = logging.getLogger(__name__)

TICK = 1.0


def run(cfg: Any, stop: threading.Event, clock: Callable[[], Any] = utcnow, interval: float = TICK) -> int:
    """Tick until `stop` is set; returns the number of tasks fired."""
    fired = 0
    housekeeping = retention.Sweeper(cfg)  # one scheduler per host: the one place expired uploads are removed
    while not stop.is_set():
        try:
            fired += len(schedules.tick(cfg, clock()))
            records.flush()
        except Exception:
            log.exception("scheduler tick failed; trying again")
        housekeeping()
        stop.wait(interval)
    return fired


def serve(cfg: Any, index: int) -> int:
    from appliance import db

    try:
        db.open_for_role(cfg)
    except db.DatabaseError as exc:
        log.error("scheduler cannot use the database %s: %s", db.describe(cfg), exc)
        return 1  # transient: the supervisor retries with backoff
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("scheduler ready", extra=fields(index=index))
    fired = run(cfg, stop)
    log.info("scheduler stopped", extra=fields(fired=fired))
    return 0
