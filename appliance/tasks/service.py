"""What the /tasks API does, as plain functions over the database and the queue.

Every function takes the config and a `Caller` (user id, admin flag): a user
sees and changes only their own tasks and schedules (others' are 404, so ids
do not leak), an admin sees all. Bad input raises appliance.errors AppError
subclasses (400 naming the field, 404, 409), which the API renders.

Submitting writes the task row first (the source of truth) and then puts a
message on the queue; if the queue cannot take it, the task is marked failed
with error_code queue_unavailable and the caller gets a 503.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from appliance.db.models import Task, TaskGroup, TaskHistory, TaskLog, database
from appliance.errors import AppError, Conflict, NotFound, ServiceUnavailable, ValidationFailed
from appliance.logs import fields
from appliance.tasks import broker, callbacks, groups, lifecycle, quotas, records
from appliance.tasks.registry import field_of, registry_for
from appliance.times import iso, parse_iso, utcnow

log = logging.getLogger(__name__)

MAX_GROUP = 1000


@dataclass(frozen=True)
class Caller:
    """Who is asking: their user id (None for the system) and whether they are an admin."""

    user_id: int | None
    admin: bool = False


SYSTEM = Caller(None, True)


# --- request bodies (the API validates with these; tests and the CLI use `parse`) ----------------


class RetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_retries: Annotated[int, Meta(ge=0, le=100)] = 0
    retry_delay: Annotated[float, Meta(ge=0, le=86400)] = 0.0
    exponential_backoff: bool = False


CallbackUrl = Annotated[str, Meta(extra_json_schema={"format": "uri"}, description="http(s) URL; internal addresses are refused")]


class Callbacks(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    progress_url: CallbackUrl | None = None
    completion_url: CallbackUrl | None = None
    error_url: CallbackUrl | None = None


class SubmitRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    task_type: Annotated[str, Meta(min_length=1, max_length=100)]
    data: dict[str, Any] = {}
    priority: Annotated[int, Meta(ge=1, le=10)] = 5
    retry_config: RetryConfig | None = None
    callbacks: Callbacks | None = None
    eta: Annotated[str, Meta(extra_json_schema={"format": "date-time"}, description="ISO 8601 time to run at")] | None = None


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tasks: Annotated[list[SubmitRequest], Meta(min_length=1, max_length=MAX_GROUP)]
    batch_name: Annotated[str, Meta(max_length=200)] = ""
    execution_mode: Literal["sequential", "parallel"] = "parallel"
    failure_strategy: Literal["stop_on_error", "continue"] = "continue"


class ChainRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tasks: Annotated[list[SubmitRequest], Meta(min_length=1, max_length=MAX_GROUP)]
    chain_name: Annotated[str, Meta(max_length=200)] = ""


class CancelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(max_length=500)] = ""
    force: bool = False


def parse(kind: type, raw: Any) -> Any:
    """Validate a raw JSON value into a request Struct; ValidationFailed naming the field."""
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        name = field_of(str(exc))
        raise ValidationFailed(f"invalid request: {exc}", field=name) from None


# --- submit ---------------------------------------------------------------------------------------


def _prepare(cfg: Any, caller: Caller, req: SubmitRequest, where: str = "") -> dict[str, Any]:
    """Check one task request and return the column values of its row."""
    reg = registry_for(cfg)
    try:
        ttype = reg.get(req.task_type)
    except AppError as exc:
        if where:
            exc.details["field"] = f"{where}task_type"
        raise
    ttype.admit(req.data, caller.user_id, caller.admin, where=where)  # who may run it, on what: the one check
    retry = req.retry_config or RetryConfig(max_retries=cfg.queue.default_max_retries)
    cbs = callbacks.check_callbacks(
        msgspec.to_builtins(req.callbacks) if req.callbacks else None, where=f"{where}callbacks", policy=callbacks.policy_of(cfg)
    )
    cbs = {k: v for k, v in cbs.items() if v}
    eta = None
    if req.eta:
        try:
            eta = parse_iso(req.eta)
        except ValueError:
            raise ValidationFailed(f"{where}eta must be an ISO 8601 timestamp", field=f"{where}eta") from None
    return {
        "id": records.new_id(),
        "task_type": ttype.name,
        "owner": caller.user_id,
        "priority": req.priority,
        "input": req.data,
        "max_retries": retry.max_retries,
        "retry_delay": round(retry.retry_delay, 3),  # milliseconds: a float PostgreSQL's real column can hold
        "exponential_backoff": retry.exponential_backoff,
        "callbacks": cbs,
        "eta": eta,
        "created_at": utcnow(),
    }


def _hand_to_queue(cfg: Any, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        try:
            broker.enqueue(cfg, row["id"], 1, row["priority"], row["eta"])
        except Exception as exc:
            log.error("queue refused a task", extra=fields(task_id=row["id"], error=f"{type(exc).__name__}: {exc}"[:300]))
            lifecycle.queue_refused(row["id"])
            raise ServiceUnavailable("the task queue is unavailable; try again later", code="queue_unavailable") from None


def _history(rows: list[dict[str, Any]]) -> None:
    """History rows of new tasks; only after their rows are committed (they are written by another connection)."""
    for row in rows:
        records.add_history(row["id"], "queued", "submitted" if row.get("queued_at") else "waiting for its turn", at=row["created_at"])


def submit(cfg: Any, caller: Caller, req: SubmitRequest | dict[str, Any], *, schedule_id: int | None = None) -> dict[str, Any]:
    """Create and enqueue one task; the API's `data` of POST /tasks/submit."""
    if isinstance(req, dict):
        req = parse(SubmitRequest, req)
    row = _prepare(cfg, caller, req)
    quotas.check_pending(cfg, caller)
    row["queued_at"] = row["created_at"]
    if schedule_id is not None:
        row["schedule"] = schedule_id
    lifecycle.create([row])  # committed before its message is queued
    _history([row])
    _hand_to_queue(cfg, [row])
    return {
        "task_id": row["id"],
        "status": "queued",
        "priority": row["priority"],
        "task_type": row["task_type"],
        "created_at": iso(row["created_at"]),
        "eta": iso(row["eta"]),
    }


def _group(cfg: Any, caller: Caller, kind: str, items: list[SubmitRequest], name: str, mode: str, strategy: str) -> dict[str, Any]:
    rows = [_prepare(cfg, caller, item, where=f"tasks[{i}].") for i, item in enumerate(items)]
    quotas.check_pending(cfg, caller, len(rows))  # once for the whole group: all its tasks count
    gid = records.new_id()
    now = utcnow()
    for i, row in enumerate(rows):
        row.update(group=gid, group_index=i, created_at=now)
        if mode == "parallel" or i == 0:
            row["queued_at"] = now
    with database.atomic():
        TaskGroup.create(id=gid, kind=kind, name=name, owner=caller.user_id, execution_mode=mode, failure_strategy=strategy, created_at=now)
        lifecycle.create(rows)
    _history(rows)
    _hand_to_queue(cfg, [r for r in rows if r.get("queued_at")])
    return {
        f"{kind}_id": gid,
        "name": name,
        "execution_mode": mode,
        "failure_strategy": strategy,
        "status": "queued",
        "task_ids": [r["id"] for r in rows],
        "created_at": iso(now),
    }


def batch(cfg: Any, caller: Caller, req: BatchRequest | dict[str, Any]) -> dict[str, Any]:
    if isinstance(req, dict):
        req = parse(BatchRequest, req)
    return _group(cfg, caller, "batch", req.tasks, req.batch_name, req.execution_mode, req.failure_strategy)


def chain(cfg: Any, caller: Caller, req: ChainRequest | dict[str, Any]) -> dict[str, Any]:
    if isinstance(req, dict):
        req = parse(ChainRequest, req)
    return _group(cfg, caller, "chain", req.tasks, req.chain_name, "sequential", "stop_on_error")


def group_status(cfg: Any, caller: Caller, group_id: str) -> dict[str, Any]:
    group = TaskGroup.get_or_none(TaskGroup.id == group_id)
    if group is None or not (caller.admin or group.owner_id == caller.user_id):
        raise NotFound(f"no batch or chain {group_id!r}")
    return {
        f"{group.kind}_id": group.id,
        "kind": group.kind,
        "name": group.name,
        "status": group.status,
        "execution_mode": group.execution_mode,
        "failure_strategy": group.failure_strategy,
        "created_at": iso(group.created_at),
        "finished_at": iso(group.finished_at),
        **groups.summary(group),
    }


# --- reading --------------------------------------------------------------------------------------


def _visible(caller: Caller, task_id: str) -> Task:
    task = Task.get_or_none(Task.id == task_id) if isinstance(task_id, str) and len(task_id) <= 32 else None
    if task is None or not (caller.admin or task.owner_id == caller.user_id):
        raise NotFound(f"no task {task_id!r}")
    return task


def view(task: Task, history: list[Any] | None = None) -> dict[str, Any]:
    """The API's picture of one task."""
    running_time = task.running_time
    if task.status == "running" and task.started_at:
        running_time = (utcnow() - task.started_at).total_seconds()
    out: dict[str, Any] = {
        "task_id": task.id,
        "task_type": task.task_type,
        "status": task.status,
        "priority": task.priority,
        "owner_id": task.owner_id,
        "created_at": iso(task.created_at),
        "eta": iso(task.eta),
        "progress": {"percentage": task.progress, "message": task.progress_message},
        "execution": {
            "worker_id": task.worker_id,
            "started_at": iso(task.started_at),
            "finished_at": iso(task.finished_at),
            "running_time": running_time,
            "attempt": task.attempt,
            "retries": task.retries,
            "max_retries": task.max_retries,
        },
        "result": task.result,
        "error": {"code": task.error_code, "message": task.error} if task.error and task.status != "succeeded" else None,
        "cancel_requested": task.cancel_requested,
        "group_id": task.group_id,
        "group_index": task.group_index,
        "schedule_id": task.schedule_id,
    }
    if history is not None:
        out["history"] = [{"status": h.status, "message": h.message, "timestamp": iso(h.at)} for h in history]
    return out


def status(cfg: Any, caller: Caller, task_id: str) -> dict[str, Any]:
    task = _visible(caller, task_id)
    records.flush()
    history = list(TaskHistory.select().where(TaskHistory.task == task.id).order_by(TaskHistory.at, TaskHistory.id))
    out = view(task, history)
    out["input"] = task.input
    out["callbacks"] = sorted(task.callbacks or {})
    return out


def logs(cfg: Any, caller: Caller, task_id: str, page: int = 1, per_page: int = 1000) -> tuple[list[dict[str, Any]], int]:
    task = _visible(caller, task_id)
    records.flush()
    query = TaskLog.select().where(TaskLog.task == task.id)
    total = query.count()
    rows = query.order_by(TaskLog.at, TaskLog.id).paginate(page, per_page)
    return [{"timestamp": iso(r.at), "level": r.level, "line": r.line} for r in rows], total


def list_tasks(
    cfg: Any,
    caller: Caller,
    *,
    status: str | None = None,
    task_type: str | None = None,
    page: int = 1,
    per_page: int = 20,
    all_users: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    if status and status not in lifecycle.STATUSES:
        raise ValidationFailed(f"status must be one of {', '.join(lifecycle.STATUSES)}", field="status")
    query = Task.select()
    if not caller.admin or not all_users:
        query = query.where(Task.owner == caller.user_id)
    if status:
        query = query.where(Task.status == status)
    if task_type:
        query = query.where(Task.task_type == task_type)
    total = query.count()
    rows = query.order_by(Task.created_at.desc(), Task.id).paginate(page, per_page)
    return [view(t) for t in rows], total


# --- cancel ---------------------------------------------------------------------------------------


def cancel(cfg: Any, caller: Caller, task_id: str, req: CancelRequest | dict[str, Any] | None = None) -> dict[str, Any]:
    """Cancel: queued/retrying never run; running stop at their next check, or at once with force."""
    if req is None or isinstance(req, dict):
        req = parse(CancelRequest, req or {})
    task = _visible(caller, task_id)
    reason = req.reason or (
        "cancelled by an administrator" if caller.admin and task.owner_id != caller.user_id else "cancelled by the owner"
    )
    if task.status in lifecycle.ACTIVE and lifecycle.cancel_waiting(task.id, reason):
        records.flush()
        lifecycle.after_terminal(cfg, task.id)
        return {"task_id": task.id, "status": "cancelled", "cancel_requested": True, "force": req.force}
    task = Task.get_by_id(task.id)
    if task.status in lifecycle.TERMINAL:
        raise Conflict(f"task {task.id} already {task.status}", code="task_finished", details={"status": task.status})
    values: dict[str, Any] = {"cancel_requested": True, "cancel_reason": reason[:500]}
    if req.force:
        values["cancel_force"] = True
    Task.update(**values).where((Task.id == task.id) & (Task.status == "running")).execute()
    log.info("cancel requested", extra=fields(task_id=task.id, force=req.force))
    return {"task_id": task.id, "status": task.status, "cancel_requested": True, "force": req.force}


# --- stats ----------------------------------------------------------------------------------------


def _seconds_ago(seconds: float) -> _dt.datetime:
    return utcnow() - _dt.timedelta(seconds=seconds)


def stats(cfg: Any, caller: Caller, now: _dt.datetime | None = None) -> dict[str, Any]:
    from appliance.tasks import stats as stats_mod

    return stats_mod.compute(cfg, None if caller.admin else caller.user_id, now or utcnow())
