"""The worker role: Huey's Consumer run programmatically, plus a watcher thread.

`serve(cfg, index)` builds the consumer from [queue]: `concurrency` workers of
`worker_type` (process: pre-forked children, each running one task at a time;
thread: threads of this process). Huey's periodic enqueuing is off (cron is
the scheduler role's job); Huey's own scheduler thread only moves delayed
messages (eta, retry delays) onto the queue, every ETA_INTERVAL seconds.

Signals: SIGTERM stops taking tasks, lets running ones finish within
[supervisor] grace_period and exits 0 (tasks still running then are recovered
by a reaper as retries). SIGINT stops at once. SIGHUP is ignored (the
supervisor restarts workers with SIGTERM).

The watcher thread of the main process
- stops force-cancelled tasks of this node: in process mode it SIGKILLs the
  child running the task (Huey's health check starts a fresh child within a
  second) and records the task cancelled; in thread mode it raises
  TaskCancelled inside the task's thread, and records the task cancelled
  after FORCE_WAIT seconds even if the thread is stuck in a blocking call
  (its late result is then discarded by the conditional final update). A
  thread cannot be killed: one blocked in a call (time.sleep, a socket read
  without timeout, C code) keeps its slot until the call returns, and the
  worker runs one task fewer at a time meanwhile (logged as a warning). Task
  types that may block without a cancellation check belong on workers with
  worker_type = "process";
- runs the reaper (appliance.queue.reaper) every [queue] reaper_interval.
Forked children die with their parent (PR_SET_PDEATHSIG), so a kill -9 of
the worker leaves no orphan running tasks behind the reaper's back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from appliance.contract import EXIT_BOOT_FAILURE
from appliance.db.models import Task
from appliance.lean_import import import_without
from appliance.logs import fields
from appliance.queue import reaper
from appliance.queue.runner import Runner, Runtime
from appliance.tasks import broker, callbacks, lifecycle, records
from appliance.tasks.context import TaskCancelled
from appliance.tasks.registry import registry_for

# Greenlet workers are not offered ([queue] worker_type), so huey need not load gevent (appliance/lean_import.py).
_consumer = import_without("huey.consumer", "gevent")
Consumer, ConsumerStopped, Scheduler = _consumer.Consumer, _consumer.ConsumerStopped, _consumer.Scheduler

log = logging.getLogger(__name__)

ETA_INTERVAL = 0.25
FORCE_POLL = 0.5
FORCE_WAIT = 2.0


class _EtaScheduler(Scheduler):
    """Huey's scheduler, checking delayed messages every ETA_INTERVAL s instead of every second."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.interval = ETA_INTERVAL


class _Consumer(Consumer):
    scheduler_class = _EtaScheduler

    def _set_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._handle_signal)
        signal.signal(signal.SIGINT, self._handle_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def child_pids(self) -> set[int]:
        return {getattr(p, "pid", None) for _, p in self.worker_threads} - {None}  # type: ignore[return-value]


def _die_with_parent() -> None:
    """Linux: this forked child gets SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        log.debug("prctl unavailable")


def build_consumer(cfg: Any) -> _Consumer:
    huey = get_huey(cfg)
    parent = os.getpid()

    def _child_start() -> None:
        _die_with_parent()
        if os.getppid() != parent:  # parent died before prctl took effect
            os._exit(1)

    # Every process forked from here (task children and huey's own scheduler
    # process alike) dies with this worker, so a kill -9 leaves no orphan behind.
    os.register_at_fork(after_in_child=_child_start)

    @huey.on_shutdown(name="appliance_flush")
    def _flush() -> None:
        try:
            records.flush()
        except Exception:
            log.exception("final history write failed")
        callbacks.drain(2.0)

    return _Consumer(
        huey,
        workers=cfg.queue.concurrency,
        worker_type=cfg.queue.worker_type,
        periodic=False,
        initial_delay=0.05,
        backoff=1.3,
        max_delay=0.5 if not cfg.redis.url else 1.0,
        scheduler_interval=1,
        check_worker_health=True,
        health_check_interval=1.0,
        shutdown_timeout=cfg.supervisor.grace_period,
        graceful_signal="TERM",
    )


def get_huey(cfg: Any) -> Any:
    return broker.get_queue(cfg)


class Watcher(threading.Thread):
    """Forced cancellations of this node's tasks, and the reaper."""

    def __init__(self, cfg: Any, node: str, consumer: _Consumer, runner: Runner):
        super().__init__(name="task-watcher", daemon=True)
        self.cfg = cfg
        self.node = node
        self.consumer = consumer
        self.runner = runner
        self.stopped = threading.Event()
        self.forcing: dict[str, float] = {}

    def run(self) -> None:
        next_reap = 0.0
        while not self.stopped.wait(FORCE_POLL):
            try:
                self.force_cancels()
            except Exception:
                log.exception("forced cancellation check failed")
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + self.cfg.queue.reaper_interval
                try:
                    reaper.reap(self.cfg)
                except Exception:
                    log.exception("reaper pass failed")

    def force_cancels(self) -> None:
        rows = Task.select(Task.id, Task.worker_id, Task.attempt, Task.started_at, Task.cancel_reason).where(
            (Task.status == "running") & (Task.cancel_force == True) & Task.worker_id.startswith(self.node + "#")  # noqa: E712
        )
        for task in list(rows):
            _, _, pid = reaper.parse_worker_id(task.worker_id)
            if pid is None:
                continue
            if pid != os.getpid():
                if pid in self.consumer.child_pids():
                    log.warning("force-cancel: killing the process running a task", extra=fields(task_id=task.id, pid=pid))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._record(task)
                continue
            first = self.forcing.setdefault(task.id, time.monotonic())
            ident = self.runner.running.get(task.id)
            if ident is not None and time.monotonic() - first < FORCE_WAIT:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(TaskCancelled))
                continue
            if ident is not None:
                # The thread is inside a blocking call that Python cannot interrupt: the task is recorded
                # cancelled (its late result is discarded) but the thread keeps its slot until the call returns.
                log.warning(
                    "force-cancel: the task's thread is blocked in a call and keeps its slot until the call returns "
                    "(worker_type = process runs tasks in children that can be killed)",
                    extra=fields(task_id=task.id, busy_slots=len(self.runner.running), concurrency=self.cfg.queue.concurrency),
                )
            self._record(task)

    def _record(self, task: Any) -> None:
        self.forcing.pop(task.id, None)
        reason = (task.cancel_reason or "cancelled") + " (forced)"
        if lifecycle.finish(task.id, task.attempt, "cancelled", started_at=task.started_at, message=reason):
            records.flush()
            lifecycle.after_terminal(self.cfg, task.id)


def serve(cfg: Any, index: int) -> int:
    from appliance import db, heartbeat

    try:
        handle = db.open_for_role(cfg)
    except db.DatabaseError as exc:
        log.error("worker cannot use the database %s: %s", db.describe(cfg), exc)
        return 1  # transient: the supervisor retries with backoff
    node = heartbeat.node_id(cfg, "worker", index)
    try:
        reg = registry_for(cfg)  # operator modules load once, before children fork
        consumer = build_consumer(cfg)
        runner = Runner(Runtime(cfg, node, stopping=consumer.stop_flag.is_set)).install(consumer.huey)
    except Exception:
        log.exception("worker cannot start its queue consumer")
        return EXIT_BOOT_FAILURE
    if consumer.environment.forks:
        handle.close()  # children open their own connections
    log.info(
        "worker ready",
        extra=fields(node_id=node, concurrency=cfg.queue.concurrency, worker_type=cfg.queue.worker_type, task_types=reg.names()),
    )
    watcher = Watcher(cfg, node, consumer, runner)
    consumer.start()
    watcher.start()
    try:
        health_ts = time.monotonic()
        while True:
            try:
                health_ts = consumer.loop(health_ts)
            except ConsumerStopped:
                break
        consumer.huey.notify_interrupted_tasks()
    finally:
        watcher.stopped.set()
        heartbeat.set_status("stopping")
        records.flush()
        callbacks.drain(2.0)
    log.info("worker stopped", extra=fields(node_id=node))
    return 0
