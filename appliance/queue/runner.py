"""Running one attempt of a task inside a worker: claim, run, record, retry, notify.

How it works:
1. The queue message is `(task_id, attempt)`. `records.claim` moves the row from
   queued/retrying to running only for that attempt and only when no cancel was
   requested, so duplicate or stale messages (a reaper's requeue racing the
   original, a cancelled task) are dropped here: a queued task that was
   cancelled never runs. With [queue] user_max_running set, the claim also
   fails while the task's owner has that many tasks running; such a task goes
   back on the queue with a short delay (appliance.tasks.quotas), so one user's
   backlog cannot hold every worker slot while others wait.
2. The task type's function runs with a TaskContext. Success stores the result;
   TaskCancelled (raised at a progress/cancellation point) records cancelled;
   any other exception is logged with its traceback into the task log and the
   process log (never into the API's error field), then becomes a retry
   (`retry_delay`, doubled per attempt with exponential_backoff) while retries
   remain, else failed.
3. After a terminal state, callbacks are queued and the task's group (batch or
   chain) advances (appliance.tasks.groups).
Every final UPDATE is conditional on (status running, attempt), so a task that
the reaper or a forced cancel took away meanwhile keeps their verdict.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.db.models import Task
from appliance.logs import fields
from appliance.tasks import broker, callbacks, groups, lifecycle, quotas, records
from appliance.tasks.context import TaskCancelled, TaskContext
from appliance.tasks.registry import registry_for

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


@dataclass
class Runtime:
    """What the runner needs from the worker that consumes: who we are, which config, whether we stop."""

    cfg: Any
    node_id: str = ""
    stopping: Callable[[], bool] = _never  # the consumer's stop flag (shared with forked children)

    def worker_id(self) -> str:
        """What Task.worker_id holds: "<node id>#<pid of the process running the task>" (the reaper's key)."""
        return f"{self.node_id or f'{socket.gethostname()}:worker:x'}#{os.getpid()}"


@dataclass
class Runner:
    """Runs the attempts a consumer takes off the queue; `running` maps task id -> thread ident
    of the thread running it in this process (the watcher's forced cancel in thread mode)."""

    runtime: Runtime
    running: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, huey: Any) -> Runner:
        """Make this runner execute the messages of `huey` in this process."""
        broker.set_executor(huey, self.execute)
        return self

    def execute(self, task_id: str, attempt: int, priority: int = 5) -> None:
        """Run attempt `attempt` of task `task_id` (called by the Huey consumer)."""
        cfg = self.runtime.cfg
        if self.runtime.stopping():
            # A blocking read can hand a stopping worker one more message: give it back untouched.
            row = Task.select(Task.priority).where(Task.id == task_id).first()
            broker.enqueue(cfg, task_id, attempt, row.priority if row else priority)
            return
        wid = self.runtime.worker_id()
        cap = cfg.queue.user_max_running
        task = lifecycle.claim(task_id, attempt, wid, cap)
        if task is None:
            if cap and _hold_back(cfg, task_id, attempt, cap):
                return
            log.debug("message dropped", extra=fields(task_id=task_id, attempt=attempt))
            return
        with self._lock:
            self.running[task_id] = threading.get_ident()
        try:
            _run(cfg, task, attempt)
        finally:
            with self._lock:
                self.running.pop(task_id, None)


def _hold_back(cfg: Any, task_id: str, attempt: int, cap: int) -> bool:
    """Fair share: a task not claimed because its owner has `cap` tasks running goes back on the
    queue a moment later, and this slot takes the next message (another owner's)."""
    row = quotas.held_back(task_id, attempt)
    if row is None:
        return False
    eta = quotas.defer(row, attempt, cap)
    if eta is not None:
        broker.enqueue(cfg, task_id, attempt, row.priority, eta)
        log.debug("task held back: its owner is at the running cap", extra=fields(task_id=task_id, owner=row.owner_id, cap=cap))
    return True


def _progress_hook(cfg: Any, task: Any) -> Any:
    url = (task.callbacks or {}).get("progress_url")
    if not url:
        return None

    def hook(pct: float, message: str) -> None:
        callbacks.send(cfg, url, "progress", {"task_id": task.id, "status": "running", "progress": {"percentage": pct, "message": message}})

    return hook


def _run(cfg: Any, task: Any, attempt: int) -> None:
    previous = groups.previous_result(task)
    ctx = TaskContext(
        task.id,
        attempt,
        task_type=task.task_type,
        owner_id=task.owner_id,
        previous_result=previous,
        cfg=cfg,
        on_progress=_progress_hook(cfg, task),
        claimed=True,
    )
    log.debug("task started", extra=fields(task_id=task.id, task_type=task.task_type, attempt=attempt, worker_id=task.worker_id))
    try:
        ttype = registry_for(cfg).get(task.task_type)
        data = ttype.parse(task.input)
        value = ttype(ctx, data)
        result = _jsonable(value)
    except TaskCancelled:
        ctx.write_held()
        reason = task.cancel_reason or "cancelled on request"
        done = lifecycle.finish(task.id, attempt, "cancelled", started_at=task.started_at, message=reason)
        log.info("task cancelled", extra=fields(task_id=task.id, attempt=attempt))
        if done:
            lifecycle.after_terminal(cfg, task.id)
        return
    except Exception as exc:
        ctx.write_held()  # the progress it reached stays on the failed (or retrying) row
        _failed(cfg, task, attempt, exc)
        return
    held = ctx.take_held()  # progress reported since the last write goes with the final update
    done = lifecycle.finish(
        task.id, attempt, "succeeded", started_at=task.started_at, result=result, progress_message=held[1] if held else None
    )
    log.debug("task succeeded", extra=fields(task_id=task.id, task_type=task.task_type, attempt=attempt))
    if done and (task.callbacks or task.group_id):  # nothing else to do for a plain task: no extra query
        lifecycle.after_terminal(cfg, task.id)


def _jsonable(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value, str_keys=True, enc_hook=str)


def _failed(cfg: Any, task: Any, attempt: int, exc: BaseException) -> None:
    error = f"{type(exc).__name__}: {exc}"[:2000]
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    records.add_log(task.id, f"attempt {attempt} failed: {error}\n{tb}", "error")
    code = getattr(exc, "code", None) if isinstance(getattr(exc, "code", None), str) else "task_error"
    delay = lifecycle.retry_delay(task, attempt)
    note = f"attempt {attempt} failed: {error[:300]}"
    verdict = lifecycle.attempt_failed(cfg, task, attempt, error=error, error_code=code, note=note, delay=delay)
    if verdict == "retrying":
        log.warning("task failed, will retry", extra=fields(task_id=task.id, attempt=attempt, delay=delay, error=error[:200]))
    elif verdict == "failed":
        log.warning("task failed", extra=fields(task_id=task.id, attempt=attempt, error=error[:200]))
