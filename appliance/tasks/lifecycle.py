"""Every write to a task's status, and the one retry-or-fail step.

A task moves queued -> running -> succeeded | failed | cancelled, with
retrying -> running again while retries remain (and queued/retrying ->
cancelled, queued -> failed when the queue refuses it). Each transition is one
conditional UPDATE (`WHERE status IN (...) AND attempt = ...`), so two workers
holding copies of the same queue message, a reaper and a cancel request can
race and exactly one wins; the winner notes it in the history
(appliance.tasks.records). Nobody else writes Task.status: the runner, the
reaper, the worker's forced cancels, the API's submit and cancel, the
scheduler and the groups all come here.

`attempt_failed` is the one retry-or-fail step of a failed attempt (the
runner's exception, the reaper's lost worker); `after_terminal` runs what a
finished task triggers (callbacks, its group's next step).
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

import peewee as pw

from appliance.db.models import Task, database
from appliance.tasks import broker, callbacks, quotas, records
from appliance.times import iso, utcnow

log = logging.getLogger(__name__)

QUEUED = "queued"
ACTIVE = ("queued", "retrying")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")


# --- new tasks ------------------------------------------------------------------------------


def create(rows: list[dict[str, Any]]) -> None:
    """Insert new task rows, queued unless `born_failed` marked them (records.insert_tasks)."""
    for row in rows:
        row.setdefault("status", QUEUED)
    records.insert_tasks(rows)


def born_failed(row: dict[str, Any], error: str, error_code: str, at: Any) -> None:
    """Mark a row about to be created as failed from the start (a schedule slot that may not run)."""
    row.update(status="failed", queued_at=None, finished_at=at, error=error[:2000], error_code=error_code)


def queue_refused(task_id: str) -> None:
    """queued -> failed: the queue would not take the task's message."""
    Task.update(status="failed", error="the queue is unavailable", error_code="queue_unavailable", finished_at=utcnow()).where(
        Task.id == task_id
    ).execute()
    records.add_history(task_id, "failed", "the queue is unavailable")


# --- transitions ----------------------------------------------------------------------------


_CLAIM_SET = (
    'UPDATE "task" SET "status" = \'running\', "attempt" = "attempt" + 1, "worker_id" = {p}, "started_at" = {p}, '
    '"finished_at" = NULL, "eta" = NULL, "progress" = 0, "progress_message" = \'\' '
    'WHERE "id" = {p} AND "status" IN (\'queued\', \'retrying\') AND "attempt" = {p} AND NOT "cancel_requested"'
)


_TASK_FIELDS = Task._meta.sorted_fields
_RETURNING = " RETURNING " + ", ".join(f'"{f.column_name}"' for f in _TASK_FIELDS)


def _returning(db: Any) -> bool:
    """Whether UPDATE ... RETURNING works here (PostgreSQL; SQLite since 3.35)."""
    if getattr(db, "returning_clause", False):
        return True
    import sqlite3

    return isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info >= (3, 35)


def _task_from(values: tuple[Any, ...]) -> Task:
    """A Task from a RETURNING row, as peewee's own cursor wrapper builds it (without resolving columns per row)."""
    task = Task(__no_default__=1, **{f.name: f.python_value(v) for f, v in zip(_TASK_FIELDS, values, strict=True)})
    task._dirty.clear()
    return task


def claim(task_id: str, attempt: int, worker_id: str, max_running: int = 0) -> Task | None:
    """queued/retrying -> running for exactly this attempt; the task row, or None when someone else won
    (or, with `max_running`, when the task's owner already has that many tasks running: the fair share).

    The hot path of every task: one hand-written statement, UPDATE ... RETURNING the row (or UPDATE
    then SELECT on an SQLite older than 3.35), because building it with peewee's query builder and
    resolving the returned columns cost more than the database round trip.
    """
    now = utcnow()
    db = database.obj
    sql = _CLAIM_SET.format(p=db.param)
    params: tuple[Any, ...] = (worker_id, Task.started_at.db_value(now), task_id, attempt - 1)
    if max_running > 0:
        sql += quotas.claim_condition(db.param)
        params += (max_running,)
    if _returning(db):
        rows = db.execute_sql(sql + _RETURNING, params).fetchall()  # fetch all: SQLite commits when the statement completes
        if not rows:
            return None
        row = _task_from(rows[0])
    else:
        if db.execute_sql(sql, params).rowcount != 1:
            return None
        row = Task.get_or_none(Task.id == task_id)
        if row is None:
            return None
    records.add_history(task_id, "running", f"attempt {attempt} on {worker_id}", at=now)
    return row


def finish(
    task_id: str,
    attempt: int,
    status: str,
    *,
    started_at: Any,
    result: Any = None,
    error: str | None = None,
    error_code: str | None = None,
    message: str = "",
    worker_id: str | None = None,
    progress_message: str | None = None,
) -> bool:
    """running -> succeeded/failed/cancelled for this attempt (and, given, this worker); False when the task
    was taken away meanwhile. A success sets progress to 100 (and, given, its message)."""
    now = utcnow()
    db = database.obj
    p = db.param
    running_time = (now - started_at).total_seconds() if started_at else None
    sets = f'"status" = {p}, "finished_at" = {p}, "running_time" = {p}, "error" = {p}, "error_code" = {p}'
    params: list[Any] = [status, Task.finished_at.db_value(now), running_time, error, error_code]
    if status == "succeeded":
        sets += f', "result" = {p}, "progress" = 100'
        params.append(Task.result.db_value(result))
        if progress_message is not None:
            sets += f', "progress_message" = {p}'
            params.append(progress_message)
    sql = f'UPDATE "task" SET {sets} WHERE "id" = {p} AND "status" = \'running\' AND "attempt" = {p}'
    params += [task_id, attempt]
    if worker_id is not None:
        sql += f' AND "worker_id" = {p}'
        params.append(worker_id)
    done = db.execute_sql(sql, params).rowcount == 1
    if done:
        records.add_history(task_id, status, message, at=now)
    return done


def to_retry(
    task_id: str,
    attempt: int,
    eta: Any,
    error: str,
    error_code: str,
    message: str,
    from_status: str = "running",
    worker_id: str | None = None,
) -> bool:
    """running -> retrying with the next attempt due at `eta`."""
    now = utcnow()
    cond = (Task.id == task_id) & (Task.status == from_status) & (Task.attempt == attempt)
    if worker_id is not None:
        cond &= Task.worker_id == worker_id
    done = (
        Task.update(
            status="retrying",
            retries=Task.retries + 1,
            eta=eta,
            queued_at=now,
            error=error,
            error_code=error_code,
            finished_at=now,
            running_time=None,
        )
        .where(cond)
        .execute()
        == 1
    )
    if done:
        records.add_history(task_id, "retrying", message, at=now)
    return done


_PROGRESS_SET = (
    'UPDATE "task" SET "progress" = {p}, "progress_message" = {p} WHERE "id" = {p} AND "status" = \'running\' AND "attempt" = {p}'
)


def set_progress(task_id: str, attempt: int, pct: float, message: str) -> bool:
    """Store progress; return True when a cancel was requested (or the task is no longer running).

    On the hot path of every task that reports progress (sample does once): one hand-written
    UPDATE ... RETURNING the cancel flag; only when it matched no row does a SELECT say why.
    """
    db = database.obj
    sql = _PROGRESS_SET.format(p=db.param)
    params = (pct, message, task_id, attempt)
    if _returning(db):
        rows = db.execute_sql(sql + ' RETURNING "cancel_requested"', params).fetchall()
        if rows:
            return bool(rows[0][0])
    else:
        db.execute_sql(sql, params)
    row = Task.select(Task.cancel_requested, Task.status).where(Task.id == task_id).first()
    return row is None or bool(row.cancel_requested) or row.status != "running"


def cancel_waiting(task_id: str, reason: str, statuses: tuple[str, ...] = ACTIVE) -> bool:
    """queued/retrying -> cancelled (the queue message, if any, is dropped when it is dequeued)."""
    now = utcnow()
    done = (
        Task.update(status="cancelled", cancel_requested=True, cancel_reason=reason[:500], finished_at=now)
        .where((Task.id == task_id) & (Task.status.in_(statuses)))
        .execute()
        == 1
    )
    if done:
        records.add_history(task_id, "cancelled", reason, at=now)
    return done


# --- a failed attempt, a finished task --------------------------------------------------------


def retry_delay(task: Any, attempt: int) -> float:
    """Seconds before the next attempt after `attempt` (1-based) failed."""
    base = float(task.retry_delay or 0.0)
    return base * (2 ** (attempt - 1)) if task.exponential_backoff else base


def attempt_failed(
    cfg: Any, task: Any, attempt: int, *, error: str, error_code: str, note: str, delay: float, worker_id: str | None = None
) -> str | None:
    """The one retry-or-fail step: "retrying" (attempt + 1 queued `delay` s from now) while retries remain,
    else "failed" (then after_terminal); None when the task was taken away meanwhile.

    `error` is stored on the row, `note` starts the history line of a retry ("attempt 2 failed: ...");
    `task` has id, max_retries, priority and started_at; `worker_id`, when given, must still hold the task
    (the reaper's condition: a worker that it declared lost must not have finished meanwhile).
    """
    if attempt <= task.max_retries:
        eta = utcnow() + _dt.timedelta(seconds=delay)
        when = f"at {iso(eta)}" if delay > 0 else "queued"
        message = f"{note}; attempt {attempt + 1} {when}"
        if not to_retry(task.id, attempt, eta, error, error_code, message, worker_id=worker_id):
            return None
        broker.enqueue(cfg, task.id, attempt + 1, task.priority, eta if delay > 0 else None)
        return "retrying"
    if not finish(
        task.id, attempt, "failed", started_at=task.started_at, error=error, error_code=error_code, message=error[:500], worker_id=worker_id
    ):
        return None
    after_terminal(cfg, task.id)
    return "failed"


def after_terminal(cfg: Any, task_id: str) -> None:
    """Callbacks and group advancement once a task reached succeeded, failed or cancelled."""
    from appliance.tasks import groups  # groups cancel through this module

    task = Task.get_or_none(Task.id == task_id)
    if task is None:
        return
    urls = task.callbacks or {}
    payload = {"task_id": task.id, "task_type": task.task_type, "status": task.status, "attempt": task.attempt}
    if task.status == "succeeded" and urls.get("completion_url"):
        callbacks.send(cfg, urls["completion_url"], "completion", {**payload, "result": task.result})
    elif task.status in ("failed", "cancelled") and urls.get("error_url"):
        callbacks.send(
            cfg, urls["error_url"], "error", {**payload, "error": {"code": task.error_code, "message": task.error or task.cancel_reason}}
        )
    if task.group_id:
        try:
            groups.advance(cfg, task)
        except Exception:
            log.exception("advancing the group of task %s failed", task.id)
