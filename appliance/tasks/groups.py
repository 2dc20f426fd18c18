"""Batches and chains: which task of a group runs next, and when a group stops.

A group's tasks are rows with group_id and group_index. In a parallel batch all
are enqueued at once; in a sequential batch or a chain only the first is, and
the rest wait as status queued with queued_at NULL ("not yet handed to the
queue"; the reaper leaves those alone). When a task reaches a terminal state
`advance` runs (in the worker that finished it, or in the API on a cancel):
- failed/cancelled with failure_strategy stop_on_error (always for chains):
  every waiting task of the group is cancelled and running ones are asked to stop;
- otherwise, in sequential mode, the next waiting task (by index) is enqueued;
  setting queued_at is a conditional update, so it is enqueued exactly once;
- when no task of the group is left unfinished, the group's status and
  finished_at are set: succeeded (all succeeded), failed or cancelled.
A chain step reads the previous step's result through `previous_result`.
"""

from __future__ import annotations

import logging
from typing import Any

import peewee as pw

from appliance.db.models import Task, TaskGroup
from appliance.tasks import broker, lifecycle
from appliance.times import utcnow

log = logging.getLogger(__name__)


def previous_result(task: Any) -> Any:
    """The result of the step before this one in a chain (None otherwise)."""
    if not task.group_id or not task.group_index:
        return None
    group = TaskGroup.get_or_none(TaskGroup.id == task.group_id)
    if group is None or group.kind != "chain":
        return None
    prev = Task.select(Task.result).where((Task.group == task.group_id) & (Task.group_index == task.group_index - 1)).first()
    return prev.result if prev else None


def hand_over(cfg: Any, task: Any) -> bool:
    """Enqueue a waiting group task (queued_at NULL) exactly once."""
    now = utcnow()
    claimed = Task.update(queued_at=now).where((Task.id == task.id) & (Task.status == "queued") & (Task.queued_at.is_null())).execute() == 1
    if claimed:
        broker.enqueue(cfg, task.id, task.attempt + 1, task.priority, task.eta)
    return claimed


def advance(cfg: Any, task: Any) -> None:
    group = TaskGroup.get_or_none(TaskGroup.id == task.group_id)
    if group is None:
        return
    stop = task.status != "succeeded" and (group.kind == "chain" or group.failure_strategy == "stop_on_error")
    if stop:
        stop_group(group, f"{group.kind} stopped: task {task.id} {task.status}")
    elif group.kind == "chain" or group.execution_mode == "sequential":
        nxt = (
            Task.select()
            .where((Task.group == group.id) & (Task.group_index > task.group_index) & (Task.status == "queued") & Task.queued_at.is_null())
            .order_by(Task.group_index)
            .first()
        )
        if nxt is not None:
            hand_over(cfg, nxt)
    settle(group)


def stop_group(group: Any, reason: str) -> None:
    """Cancel what has not started; ask running tasks of the group to stop at their next check."""
    waiting = Task.select(Task.id).where((Task.group == group.id) & Task.status.in_(lifecycle.ACTIVE))
    for row in waiting:
        lifecycle.cancel_waiting(row.id, reason)
    Task.update(cancel_requested=True, cancel_reason=reason[:500]).where((Task.group == group.id) & (Task.status == "running")).execute()


def settle(group: Any) -> None:
    """Set the group's final status once every task in it is finished."""
    counts = {
        row.status: row.n
        for row in Task.select(Task.status, pw.fn.COUNT(Task.id).alias("n")).where(Task.group == group.id).group_by(Task.status)
    }
    if any(counts.get(s) for s in ("queued", "running", "retrying")):
        if group.status == "queued" and (counts.get("running") or counts.get("succeeded") or counts.get("failed")):
            TaskGroup.update(status="running").where((TaskGroup.id == group.id) & (TaskGroup.status == "queued")).execute()
        return
    if counts.get("failed"):
        final = "failed"
    elif counts.get("cancelled"):
        final = "cancelled"
    else:
        final = "succeeded"
    TaskGroup.update(status=final, finished_at=utcnow()).where((TaskGroup.id == group.id) & TaskGroup.finished_at.is_null()).execute()


def summary(group: Any) -> dict[str, Any]:
    """Counts and per-task states of a group, for the batch status endpoint."""
    tasks = list(
        Task.select(Task.id, Task.status, Task.task_type, Task.group_index).where(Task.group == group.id).order_by(Task.group_index)
    )
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.status] = counts.get(t.status, 0) + 1
    return {
        "total": len(tasks),
        "counts": counts,
        "tasks": [{"task_id": t.id, "index": t.group_index, "task_type": t.task_type, "status": t.status} for t in tasks],
    }
