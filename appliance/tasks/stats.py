"""Task statistics for GET /tasks/stats, computed from the tasks table (the source of truth).

overview: counts by status and success rate; performance: average and median
running time of the last 1,000 finished tasks and tasks finished per hour;
by_type; workers: live worker processes from their heartbeats (active,
capacity = processes x [queue] concurrency, current load = running tasks);
queue: waiting tasks per priority plus the queue backend's own depth.
A user sees the counts of their own tasks; workers and queue are global.
"""

from __future__ import annotations

import datetime as _dt
import statistics
from typing import Any

import peewee as pw

from appliance.db.models import NodeHeartbeat, Task
from appliance.tasks import broker
from appliance.times import iso


def _scoped(query: Any, owner_id: int | None) -> Any:
    return query.where(Task.owner == owner_id) if owner_id is not None else query


def compute(cfg: Any, owner_id: int | None, now: _dt.datetime) -> dict[str, Any]:
    by_status = {r.status: r.n for r in _scoped(Task.select(Task.status, pw.fn.COUNT(Task.id).alias("n")), owner_id).group_by(Task.status)}
    total = sum(by_status.values())
    succeeded, failed = by_status.get("succeeded", 0), by_status.get("failed", 0)
    finished = succeeded + failed
    durations = [
        r.running_time
        for r in _scoped(Task.select(Task.running_time), owner_id)
        .where((Task.status == "succeeded") & Task.running_time.is_null(False))
        .order_by(Task.finished_at.desc())
        .limit(1000)
    ]
    hour_ago = now - _dt.timedelta(hours=1)
    day_ago = now - _dt.timedelta(hours=24)
    last_hour = _scoped(Task.select(), owner_id).where(Task.finished_at >= hour_ago).count()
    last_day = _scoped(Task.select(), owner_id).where(Task.finished_at >= day_ago).count()
    by_type = [
        {
            "task_type": r.task_type,
            "total": r.n,
            "succeeded": int(r.ok or 0),
            "failed": int(r.bad or 0),
            "avg_duration": round(r.avg, 4) if r.avg is not None else None,
        }
        for r in _scoped(
            Task.select(
                Task.task_type,
                pw.fn.COUNT(Task.id).alias("n"),
                pw.fn.SUM(pw.Case(None, [(Task.status == "succeeded", 1)], 0)).alias("ok"),
                pw.fn.SUM(pw.Case(None, [(Task.status == "failed", 1)], 0)).alias("bad"),
                pw.fn.AVG(Task.running_time).alias("avg"),
            ),
            owner_id,
        )
        .group_by(Task.task_type)
        .order_by(pw.fn.COUNT(Task.id).desc())
    ]
    return {
        "overview": {
            "total": total,
            "completed": succeeded,
            "failed": failed,
            "cancelled": by_status.get("cancelled", 0),
            "running": by_status.get("running", 0),
            "queued": by_status.get("queued", 0),
            "retrying": by_status.get("retrying", 0),
            "success_rate": round(succeeded / finished, 4) if finished else None,
        },
        "performance": {
            "avg_duration": round(statistics.fmean(durations), 4) if durations else None,
            "median_duration": round(statistics.median(durations), 4) if durations else None,
            "tasks_last_hour": last_hour,
            "tasks_per_hour_24h": round(last_day / 24.0, 2),
            "sample_size": len(durations),
        },
        "by_type": by_type,
        "workers": workers(cfg, now),
        "queue": queue_depth(cfg),
        "generated_at": iso(now),
    }


def workers(cfg: Any, now: _dt.datetime) -> dict[str, Any]:
    fresh = now - _dt.timedelta(seconds=cfg.supervisor.heartbeat_timeout)
    rows = list(NodeHeartbeat.select().where((NodeHeartbeat.role == "worker") & (NodeHeartbeat.last_heartbeat >= fresh)))
    load = Task.select().where(Task.status == "running").count()
    capacity = sum(int((r.info or {}).get("concurrency", cfg.queue.concurrency)) for r in rows)
    return {
        "active": len(rows),
        "capacity": capacity,
        "current_load": load,
        "utilization": round(load / capacity, 4) if capacity else None,
        "nodes": [
            {"node_id": r.node_id, "host": r.host, "pid": r.pid, "status": r.status, "last_heartbeat": iso(r.last_heartbeat)} for r in rows
        ],
    }


def queue_depth(cfg: Any) -> dict[str, Any]:
    waiting = {
        str(r.priority): r.n
        for r in Task.select(Task.priority, pw.fn.COUNT(Task.id).alias("n"))
        .where(Task.status.in_(("queued", "retrying")))
        .group_by(Task.priority)
        .order_by(Task.priority)
    }
    out: dict[str, Any] = {"waiting_by_priority": waiting, "waiting": sum(waiting.values())}
    try:
        out["backend"] = broker.depth(cfg)
    except Exception as exc:  # the queue being down is a fact to show, not an error of this endpoint
        out["backend"] = {"error": type(exc).__name__}
    return out
