"""Per-user quotas and the fair share of worker slots.

Quotas are checked where work enters (appliance.tasks.service for tasks,
appliance.tasks.schedules for schedules, appliance.api.data for upload bytes)
and answer with QuotaExceeded: 429 for counts, 413 for bytes, code
`quota_exceeded`, details {quota: the config key, limit, current, requested}.
A schedule's slot that would pass the owner's pending quota is skipped (a
failed task row with that code; the schedule stays on). Stored uploads expire
after [api] upload_retention_hours (appliance.queue.retention, run by the scheduler).
Admins (the operators, who set these limits) and the system (owner None: the
CLI, scheduled system work) are exempt from quotas. A check reads the current
count and then the caller inserts, so requests racing each other can overshoot
a quota by the number in flight; the quota bounds what one account can hold,
not an exact count.

The fair share ([queue] user_max_running) is not a quota: it applies to every
owner, admins included. It is enforced when a worker claims a task
(`claim_condition` is added to the claim's UPDATE): a task whose owner already
has user_max_running tasks running is not claimed; the runner puts it back with
a short delay (`defer`), so the slot goes to the next message, another owner's.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from appliance.db.models import Schedule, Task, Upload
from appliance.errors import AppError
from appliance.times import utcnow

PENDING = ("queued", "running", "retrying")
DEFER_SECONDS = 1.0  # how long a task of an owner at their running cap waits before it is offered again
RETRY_AFTER = 5  # seconds a client is told to wait after a count quota refused it


class QuotaExceeded(AppError):
    """A per-user quota would be exceeded: 429 for counts, 413 for bytes."""

    status, code = 429, "quota_exceeded"

    def __init__(self, quota: str, limit: int, current: int, requested: int, what: str, *, status: int = 429):
        headers = {"Retry-After": str(RETRY_AFTER)} if status == 429 else {}
        super().__init__(
            f"quota exceeded: {what} (at most {limit}, {current} now; [{quota.replace('.', '] ', 1)})",
            status=status,
            details={"quota": quota, "limit": limit, "current": current, "requested": requested},
            headers=headers,
        )


def _exempt(caller: Any) -> bool:
    return caller.user_id is None or bool(caller.admin)


def pending_count(user_id: int) -> int:
    """Queued, running and retrying tasks of one user."""
    return Task.select().where((Task.owner == user_id) & Task.status.in_(PENDING)).count()


def check_pending(cfg: Any, caller: Any, adding: int = 1) -> None:
    """Refuse `adding` more tasks when the caller would hold more than [queue] user_max_pending."""
    limit = cfg.queue.user_max_pending
    if not limit or _exempt(caller):
        return
    current = pending_count(caller.user_id)
    if current + adding > limit:
        raise QuotaExceeded("queue.user_max_pending", limit, current, adding, "too many queued and running tasks")


def pending_refusal(cfg: Any, user_id: int | None, admin: bool) -> QuotaExceeded | None:
    """What check_pending would raise for one more task of this owner (a schedule's slot), else None."""
    try:
        check_pending(cfg, _Owner(user_id, admin))
    except QuotaExceeded as exc:
        return exc
    return None


class _Owner:
    __slots__ = ("user_id", "admin")

    def __init__(self, user_id: int | None, admin: bool):
        self.user_id, self.admin = user_id, admin


def check_schedules(cfg: Any, caller: Any) -> None:
    """Refuse one more schedule past [queue] user_max_schedules."""
    limit = cfg.queue.user_max_schedules
    if not limit or _exempt(caller):
        return
    current = Schedule.select().where(Schedule.owner == caller.user_id).count()
    if current + 1 > limit:
        raise QuotaExceeded("queue.user_max_schedules", limit, current, 1, "too many schedules")


def upload_budget(cfg: Any, caller: Any) -> tuple[int, int] | None:
    """(quota, bytes stored now) for the caller's uploads, or None when no quota applies."""
    limit = cfg.api.user_upload_quota_bytes
    if not limit or _exempt(caller):
        return None
    from peewee import fn

    stored = Upload.select(fn.COALESCE(fn.SUM(Upload.size), 0)).where(Upload.owner == caller.user_id).scalar() or 0
    return limit, int(stored)


def upload_exceeded(limit: int, stored: int, adding: int) -> QuotaExceeded:
    return QuotaExceeded("api.user_upload_quota_bytes", limit, stored, adding, "uploads stored by this user", status=413)


# --- fair share ---------------------------------------------------------------------------


def claim_condition(param: str) -> str:
    """SQL added to the claim's WHERE: the owner (if any) has fewer than `param` tasks running.

    Correlated on the row being claimed; the (owner, status, created_at) index makes it a
    short range count. On PostgreSQL two claims committed at the same instant can each see
    the other's task not yet running, so the cap can be passed by concurrent claims, briefly.
    """
    return (
        ' AND ("owner_id" IS NULL OR (SELECT COUNT(*) FROM "task" AS "t2" '
        f'WHERE "t2"."owner_id" = "task"."owner_id" AND "t2"."status" = \'running\') < {param})'
    )


def held_back(task_id: str, attempt: int) -> Any:
    """The row of a task whose claim failed only because its owner is at the running cap, else None."""
    row = (
        Task.select(Task.id, Task.owner, Task.status, Task.attempt, Task.cancel_requested, Task.priority).where(Task.id == task_id).first()
    )
    if row is None or row.owner_id is None or row.status not in ("queued", "retrying"):
        return None
    if row.attempt != attempt - 1 or row.cancel_requested:
        return None
    return row


def defer(task: Any, attempt: int, limit: int, now: _dt.datetime | None = None) -> _dt.datetime | None:
    """Mark a held-back task as waiting for its owner's turn; the time it is offered again, or None
    when the task changed meanwhile. The row's eta keeps the reaper from resending it as lost."""
    now = now or utcnow()
    eta = now + _dt.timedelta(seconds=DEFER_SECONDS)
    done = (
        Task.update(eta=eta, progress_message=f"waiting: its owner has {limit} tasks running ([queue] user_max_running)")
        .where((Task.id == task.id) & Task.status.in_(("queued", "retrying")) & (Task.attempt == attempt - 1))
        .execute()
    )
    return eta if done == 1 else None
