"""The reaper: no task stays "running" after its worker died, no queued task is forgotten.

Huey gives at-most-once delivery (a killed consumer loses what it held), so the
tasks table is the truth and this module repairs the queue from it. It runs in
every worker process (its watcher thread, every [queue] reaper_interval
seconds), so recovery needs no extra role and works on SQLite and Redis alike;
all its writes are conditional updates, so several reapers at once are safe.

Recovery rules:
1. Dead worker. Task.worker_id is "<node id>#<pid>" where node id is
   "<host>:worker:<index>" and pid the process that ran the task. On this host
   the worker is dead when that pid no longer exists or was started after the
   task (pid reused). On another host it is dead when its node heartbeat is
   older than [supervisor] heartbeat_timeout, or the node restarted after the
   task started. A task of a dead worker goes through the same retry-or-fail
   step as a failed attempt (lifecycle.attempt_failed): a retry, next attempt
   queued at once, while retries remain, else failed with error_code worker_lost.
2. Lost message. A task queued or retrying whose due time passed more than
   LOST_AFTER seconds ago while the queue is empty (so a consumer drains it and
   the message is gone) is put on the queue again. The message names the
   attempt, so if the original turns up after all, only one of them runs.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import psutil

from appliance.db.models import NodeHeartbeat, Task
from appliance.logs import fields
from appliance.tasks import broker, lifecycle
from appliance.times import utcnow

log = logging.getLogger(__name__)

LOST_AFTER = 30.0


def host_name(cfg: Any) -> str:
    return cfg.server.node_name or socket.gethostname()


def parse_worker_id(worker_id: str) -> tuple[str, str, int | None]:
    """(node id, host, pid) from "<host>:worker:<index>#<pid>"."""
    node, _, pid = (worker_id or "").rpartition("#")
    host = node.rsplit(":", 2)[0] if node.count(":") >= 2 else node
    try:
        return node, host, int(pid)
    except ValueError:
        return node, host, None


def pid_alive(pid: int, since: _dt.datetime | None) -> bool:
    """True when `pid` runs and was started no later than `since` (naive UTC)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return pid == os.getpid()
    if since is None:
        return True
    return started <= since.replace(tzinfo=_dt.UTC).timestamp() + 1.0


def _dead(cfg: Any, task: Any, now: _dt.datetime, here: str, alive: Callable[[int, Any], bool]) -> str | None:
    """Why the worker of a running task is dead, or None when it is (or may be) alive."""
    node, host, pid = parse_worker_id(task.worker_id or "")
    if not node:
        return "no worker recorded"
    if host == here and pid is not None:
        return None if alive(pid, task.started_at) else f"process {pid} is gone"
    hb = NodeHeartbeat.get_or_none(NodeHeartbeat.node_id == node)
    if hb is None:
        return None
    if hb.last_heartbeat < now - _dt.timedelta(seconds=cfg.supervisor.heartbeat_timeout):
        return f"node {node} stopped sending heartbeats"
    if task.started_at and hb.started_at > task.started_at + _dt.timedelta(seconds=1):
        return f"node {node} restarted"
    return None


def reap(
    cfg: Any, now: _dt.datetime | None = None, here: str | None = None, alive: Callable[[int, Any], bool] = pid_alive
) -> dict[str, int]:
    """One pass of both recovery rules; returns what was done."""
    now = now or utcnow()
    here = here or host_name(cfg)
    done = {"requeued": 0, "failed": 0, "resent": 0}
    running = Task.select(Task.id, Task.worker_id, Task.attempt, Task.max_retries, Task.started_at, Task.priority).where(
        Task.status == "running"
    )
    for task in list(running):
        why = _dead(cfg, task, now, here, alive)
        if why is None:
            continue
        _recover(cfg, task, why, done)
    _resend_lost(cfg, now, done)
    if any(done.values()):
        log.warning("reaper recovered tasks", extra=fields(**done))
    return done


def _recover(cfg: Any, task: Any, why: str, done: dict[str, int]) -> None:
    msg = f"worker lost ({why})"
    verdict = lifecycle.attempt_failed(
        cfg, task, task.attempt, error=msg, error_code="worker_lost", note=msg, delay=0.0, worker_id=task.worker_id
    )
    if verdict == "retrying":
        done["requeued"] += 1
    elif verdict == "failed":
        done["failed"] += 1


def _resend_lost(cfg: Any, now: _dt.datetime, done: dict[str, int]) -> None:
    if broker.depth(cfg)["pending"] > 0:
        return
    cutoff = now - _dt.timedelta(seconds=LOST_AFTER)
    stale = Task.select(Task.id, Task.attempt, Task.priority, Task.eta, Task.queued_at).where(
        Task.status.in_(lifecycle.ACTIVE)
        & Task.queued_at.is_null(False)
        & (Task.queued_at < cutoff)
        & (Task.eta.is_null() | (Task.eta < cutoff))
    )
    for task in stale.limit(1000):
        broker.enqueue(cfg, task.id, task.attempt + 1, task.priority)
        Task.update(queued_at=now).where((Task.id == task.id) & Task.status.in_(lifecycle.ACTIVE)).execute()
        done["resent"] += 1
