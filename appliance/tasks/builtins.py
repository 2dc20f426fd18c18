"""The built-in task types that do real work: sample, sleep, database_cleanup, report.

- sample: echoes its data: the result holds every field it was given (known
  and unknown, e.g. {"test": "health_check"}) at its top level and again under
  `echo`, with `attempt` and the previous chain step's result. Known fields
  are validated: `duration` seconds in `steps` progress steps; `fail_times`
  makes the first N attempts fail (to exercise retries); `noop` skips progress
  writes (the benchmark's task).
- sleep: sleeps `seconds`, checking for cancellation every 0.2 s unless
  `uninterruptible` (which only a forced cancel stops). Longer than
  SLEEP_ANYONE seconds is for administrators only (it holds a worker slot).
- database_cleanup (administrators only): deletes task history, task logs,
  node heartbeats and audit events older than `days` in batches of
  `batch_size` rows per transaction; audit events younger than [queue]
  audit_retention_days are kept whatever `days` says.
- report (administrators only): task statistics over a period, over every
  user, and API statistics from the shared metrics (requests, errors) and
  audit events.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Annotated, Any

import msgspec
import peewee as pw
from msgspec import Meta

from appliance.db.models import AuditEvent, NodeHeartbeat, Task, TaskHistory, TaskLog, database
from appliance.tasks.registry import task_type
from appliance.times import iso, utcnow


class SampleInput(msgspec.Struct, kw_only=True):
    duration: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    steps: Annotated[int, Meta(ge=1, le=1000)] = 5
    fail_times: Annotated[int, Meta(ge=0, le=100)] = 0
    noop: bool = False
    message: str = ""
    payload: Any = None


# what sample's result says itself; an input field of the same name is still in `echo`
_SAMPLE_OWN = ("echo", "attempt", "previous_result")


@task_type("sample", schema=SampleInput, description="echoes its data; optional duration with progress", keep_unknown_fields=True)
def sample(ctx: Any, data: dict[str, Any]) -> dict[str, Any]:
    if data["noop"]:
        return {"ok": True}
    if ctx.attempt <= data["fail_times"]:
        raise RuntimeError(f"sample failure on attempt {ctx.attempt} (fail_times={data['fail_times']})")
    ctx.log(f"sample started (attempt {ctx.attempt})")
    steps = data["steps"]
    if data["duration"] > 0:
        step = data["duration"] / steps
        for i in range(1, steps + 1):
            ctx.sleep(step)
            ctx.progress(100.0 * i / steps, f"step {i} of {steps}")
    else:
        ctx.progress(100.0, "done")
    ctx.log("sample finished")
    out: dict[str, Any] = {k: v for k, v in data.items() if k not in _SAMPLE_OWN}
    out.update(echo=data, attempt=ctx.attempt)
    if ctx.previous_result is not None:
        out["previous_result"] = ctx.previous_result
    return out


class SleepInput(msgspec.Struct, kw_only=True):
    seconds: Annotated[float, Meta(ge=0, le=86400)] = 1.0
    uninterruptible: bool = False


SLEEP_ANYONE = 60.0  # seconds of sleep any user may ask for


def _long_sleep(data: SleepInput) -> bool:
    """longer than 60 seconds"""
    return data.seconds > SLEEP_ANYONE


@task_type(
    "sleep",
    schema=SleepInput,
    description="sleeps for `seconds` (cancellable unless uninterruptible); over 60 s administrators only",
    admin_only_when=_long_sleep,
)
def sleep(ctx: Any, data: SleepInput) -> dict[str, Any]:
    start = time.monotonic()
    ctx.log(f"sleeping {data.seconds}s")
    if data.uninterruptible:
        time.sleep(data.seconds)
    else:
        ctx.sleep(data.seconds)
    return {"slept": round(time.monotonic() - start, 3)}


class CleanupInput(msgspec.Struct, kw_only=True):
    days: Annotated[int, Meta(ge=0, le=36500)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=100000)] = 1000
    heartbeat_minutes: Annotated[int, Meta(ge=1, le=525600)] = 60


def _delete_older(model: Any, column: Any, cutoff: _dt.datetime, batch: int, ctx: Any) -> int:
    total = 0
    while True:
        ctx.check()
        ids = [r.id for r in model.select(model.id).where(column < cutoff).order_by(model.id).limit(batch)]
        if not ids:
            return total
        with database.atomic():
            total += model.delete().where(model.id.in_(ids)).execute()


AUDIT_RETENTION_DEFAULT = 90  # days; [queue] audit_retention_days


@task_type(
    "database_cleanup",
    schema=CleanupInput,
    description="deletes history, logs, heartbeats and audit rows older than N days (audit rows: never below the retention floor)",
    admin_only=True,
)
def database_cleanup(ctx: Any, data: CleanupInput) -> dict[str, Any]:
    days = data.days if data.days is not None else (ctx.cfg.queue.history_days if ctx.cfg else 30)
    now = utcnow()
    cutoff = now - _dt.timedelta(days=days)
    # the audit trail outlives any one cleanup request, an administrator's included
    audit_days = max(days, ctx.cfg.queue.audit_retention_days if ctx.cfg else AUDIT_RETENTION_DEFAULT)
    audit_cutoff = now - _dt.timedelta(days=audit_days)
    deleted: dict[str, int] = {}
    deleted["task_history"] = _delete_older(TaskHistory, TaskHistory.at, cutoff, data.batch_size, ctx)
    ctx.progress(25, "task history pruned")
    deleted["task_logs"] = _delete_older(TaskLog, TaskLog.at, cutoff, data.batch_size, ctx)
    ctx.progress(50, "task logs pruned")
    deleted["audit_events"] = _delete_older(AuditEvent, AuditEvent.at, audit_cutoff, data.batch_size, ctx)
    ctx.progress(75, "audit events pruned")
    hb_cutoff = now - _dt.timedelta(minutes=data.heartbeat_minutes)
    # a live node's row is never older than heartbeat_minutes, whatever `days` says
    deleted["node_heartbeats"] = NodeHeartbeat.delete().where(NodeHeartbeat.last_heartbeat < min(hb_cutoff, cutoff)).execute()
    ctx.log(f"cleanup older than {days} days (audit events older than {audit_days} days): {deleted}")
    return {"cutoff": iso(cutoff), "audit_cutoff": iso(audit_cutoff), "deleted": deleted}


class ReportInput(msgspec.Struct, kw_only=True):
    hours: Annotated[float, Meta(gt=0, le=24 * 366)] = 24.0


def _api_statistics() -> dict[str, Any]:
    """Requests and errors from the shared metrics (empty when this process has no metrics dir)."""
    import os

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return {}
    try:
        from appliance import metrics

        total = errors = 0.0
        for family in metrics.collect():
            if "request" not in family.name:
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    total += s.value
                    if str(s.labels.get("status", "")).startswith("5"):
                        errors += s.value
        return {"requests_total": total, "server_errors_total": errors}
    except Exception:
        return {}


@task_type("report", schema=ReportInput, description="task and API statistics over a period, over every user", admin_only=True)
def report(ctx: Any, data: ReportInput) -> dict[str, Any]:
    end = utcnow()
    start = end - _dt.timedelta(hours=data.hours)
    period = Task.created_at.between(start, end)
    by_status = {r.status: r.n for r in Task.select(Task.status, pw.fn.COUNT(Task.id).alias("n")).where(period).group_by(Task.status)}
    ctx.progress(30, "counted tasks")
    by_type = [
        {"task_type": r.task_type, "count": r.n, "avg_duration": r.avg}
        for r in Task.select(Task.task_type, pw.fn.COUNT(Task.id).alias("n"), pw.fn.AVG(Task.running_time).alias("avg"))
        .where(period)
        .group_by(Task.task_type)
        .order_by(pw.fn.COUNT(Task.id).desc())
    ]
    ctx.progress(60, "grouped by type")
    audit = {
        r.event: r.n
        for r in AuditEvent.select(AuditEvent.event, pw.fn.COUNT(AuditEvent.id).alias("n"))
        .where(AuditEvent.at.between(start, end))
        .group_by(AuditEvent.event)
    }
    total = sum(by_status.values())
    finished = by_status.get("succeeded", 0) + by_status.get("failed", 0)
    out = {
        "period": {"start": iso(start), "end": iso(end), "hours": data.hours},
        "tasks": {
            "total": total,
            "by_status": by_status,
            "success_rate": round(by_status.get("succeeded", 0) / finished, 4) if finished else None,
            "by_type": by_type,
        },
        "api": {**_api_statistics(), "audit_events": audit},
    }
    ctx.progress(100, "report ready")
    return out
