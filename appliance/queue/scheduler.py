"""The scheduler: fires cron schedules from the database onto the queue.

`run(cfg, stop)` is the loop: `schedules.tick(cfg, now)` every TICK seconds,
then `records.flush()` and the upload retention sweep (appliance.queue.retention),
until `stop` is set. It runs in one of two places, never both on one host:
- `hosted(cfg, stop)`: a thread of the monitor's process, the default ("housekeeping":
  a minute tick and a sampler need no process each; supervisor/kinds.py starts no
  scheduler process while [monitor] enabled is true, supervisor/roles.py runs it);
- `serve(cfg, index)`: the scheduler role, its own process, when [monitor] enabled = false.
Any number of schedulers may run across hosts (a SIGHUP that switches the monitor
on or off may even overlap two on one host for a moment): each slot fires exactly
once because firing inserts the unique (schedule, slot) ScheduleRun row in the same
transaction as the task (see appliance.tasks.schedules). The reaper does not run
here: it runs in every worker (appliance.queue.worker), where the queue is consumed.
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
# Waiting for the database in a hosted scheduler: 1, 2, 4 ... then every BACKOFF_MAX seconds.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


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


def _open_database(cfg: Any) -> None:
    """Make sure the database is usable (and current) for the ticks; raises db.DatabaseError when it is not.

    The host process may have bound the models already (the monitor does, without connecting):
    then that handle is checked, not replaced, so the process keeps one connection pool.
    """
    from appliance import db

    handle = db.database.obj
    if handle is None:
        db.open_for_role(cfg)
        return
    with db.translated():
        handle.connect(reuse_if_open=True)
        try:
            if db.pending(handle):  # only when run by hand: under the supervisor the schema is current
                db.migrate(handle)
        finally:
            handle.close()


def wait_for_database(cfg: Any, stop: threading.Event, first: float = BACKOFF_FIRST, most: float = BACKOFF_MAX) -> bool:
    """Retry opening the database with backoff until it works (True) or `stop` is set (False).

    Why here and not exit 1 as `serve` does: in the monitor's process an exit would take the
    status page down with the scheduler, and the page is what an operator opens when the
    database is away (it says so); the supervisor's restart backoff would also give up on a
    crash loop. So the scheduler part waits in its thread while the page keeps serving.
    """
    from appliance import db

    delay, failures = first, 0
    while not stop.is_set():
        try:
            _open_database(cfg)
        except Exception as exc:  # db.DatabaseError mostly; anything else must not end the wait either
            failures += 1
            log.warning(
                "scheduler cannot use the database %s: %s; trying again in %.0f s",
                db.describe(cfg),
                exc,
                delay,
                extra=fields(failures=failures, retry_in=delay),
            )
            if stop.wait(delay):
                return False
            delay = min(delay * 2, most)
            continue
        if failures:
            log.info("scheduler reached the database", extra=fields(failures=failures))
        return True
    return False


def hosted(cfg: Any, stop: threading.Event) -> int:
    """The scheduler as a thread of another role's process (the monitor's): returns the tasks fired once `stop` is set."""
    fired = 0
    if wait_for_database(cfg, stop):
        log.info("scheduler ready", extra=fields(hosted=True))
        fired = run(cfg, stop)
    log.info("scheduler stopped", extra=fields(fired=fired))
    return fired


def serve(cfg: Any, index: int) -> int:
    """The scheduler role: its own process (when [monitor] enabled = false); exits 0 on SIGTERM/SIGINT."""
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
