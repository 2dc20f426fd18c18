"""Cron schedules: CRUD for the API, slot arithmetic, and the scheduler's tick.

A schedule has a 5-field cron expression evaluated in its IANA time zone
(zoneinfo; croniter handles DST; a slot is a local wall-clock time, so the
one inside the repeated autumn hour fires once), an active flag, an optional max_iterations
and `next_run_at` (naive UTC), shown in the API.

`tick(cfg, now)` fires every due schedule once: it inserts a ScheduleRun row
keyed by the unique (schedule, slot) pair in the same transaction that creates
the task and moves next_run_at forward. Several schedulers (on one host or
many) may tick at once; exactly one insert succeeds per slot, the others hit
the unique index and move on. After downtime only the latest missed slot
fires (once), and next_run_at becomes the first slot after `now`.
Each firing admits its task with the owner's rights of that moment (they may
have been demoted since the schedule was made): a refused slot leaves a failed
task saying why, and the schedule is deactivated.
Time is a parameter: tests pass `now` instead of waiting for the clock.
"""

from __future__ import annotations

import datetime as _dt
import logging
import zoneinfo
from typing import Annotated, Any, Literal

import msgspec
from croniter import croniter
from msgspec import Meta

from appliance.db.errors import ConstraintConflict, translated
from appliance.db.models import Schedule, ScheduleRun, database
from appliance.errors import AppError, NotFound, ValidationFailed
from appliance.logs import fields
from appliance.tasks import lifecycle, quotas, records
from appliance.tasks.registry import owner_rights, registry_for
from appliance.times import UTC, iso, utcnow

log = logging.getLogger(__name__)


class CronSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["cron"] = "cron"
    expression: Annotated[str, Meta(min_length=9, max_length=100)]
    timezone: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"


class ScheduleRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    task_type: Annotated[str, Meta(min_length=1, max_length=100)]
    schedule: CronSpec
    data: dict[str, Any] = {}
    active: bool = True
    max_iterations: Annotated[int, Meta(ge=1)] | None = None
    priority: Annotated[int, Meta(ge=1, le=10)] = 5
    name: Annotated[str, Meta(max_length=200)] = ""


class SchedulePatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schedule: CronSpec | None = None
    data: dict[str, Any] | None = None
    active: bool | None = None
    max_iterations: Annotated[int, Meta(ge=1)] | None = None
    priority: Annotated[int, Meta(ge=1, le=10)] | None = None
    name: Annotated[str, Meta(max_length=200)] | None = None


def check_cron(expression: str, timezone: str, where: str = "schedule") -> None:
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValidationFailed(f"{where}.expression must be a 5-field cron expression, e.g. '*/5 * * * *'", field=f"{where}.expression")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed(f"{where}.timezone {timezone!r} is not a known IANA time zone", field=f"{where}.timezone") from None


# A cron slot is a local wall-clock time. In the autumn hour that repeats, croniter yields the same
# wall-clock time twice (fold=0, then fold=1: two UTC instants), which would fire the slot twice.
# Slots are therefore identified by the first instant of their wall-clock time, and a fold=1
# repeat of a slot whose first instant already passed is skipped. (So "*/5 * * * *" in a DST zone
# does not fire again in the repeated hour, just as its slots in the spring gap never exist: use
# timezone UTC for strictly periodic work.) Bound on skips: a minutely expression over the longest
# repeated interval of any zone.
_MAX_SKIPS = 24 * 60 + 1


def _first_instant(local: _dt.datetime) -> _dt.datetime:
    """Naive UTC of the first moment the zone's clock showed this wall-clock time."""
    return local.replace(fold=0).astimezone(UTC).replace(tzinfo=None)


def next_slot(expression: str, timezone: str, after: _dt.datetime) -> _dt.datetime:
    """The first slot strictly after `after` (naive UTC in, naive UTC out); each wall-clock time once."""
    tz = zoneinfo.ZoneInfo(timezone)
    it = croniter(expression, after.replace(tzinfo=UTC).astimezone(tz))
    for _ in range(_MAX_SKIPS):
        slot = _first_instant(it.get_next(_dt.datetime))
        if slot > after:
            return slot
    raise ValueError(f"no cron slot of {expression!r} in {timezone} after {after}")  # pragma: no cover - unreachable for 5-field cron


def latest_slot(expression: str, timezone: str, at_or_before: _dt.datetime) -> _dt.datetime:
    """The last slot at or before the given time (naive UTC), as the first instant of its wall-clock time."""
    tz = zoneinfo.ZoneInfo(timezone)
    # croniter's get_prev excludes its start; one microsecond (its resolution) makes it inclusive
    # without reaching a slot still ahead (a second did, and fired a slot up to 1 s early).
    probe = (at_or_before + _dt.timedelta(microseconds=1)).replace(tzinfo=UTC).astimezone(tz)
    return _first_instant(croniter(expression, probe).get_prev(_dt.datetime))


def view(s: Schedule) -> dict[str, Any]:
    return {
        "schedule_id": s.id,
        "name": s.name,
        "task_type": s.task_type,
        "schedule": {"type": "cron", "expression": s.expression, "timezone": s.timezone},
        "data": s.data,
        "priority": s.priority,
        "active": s.active,
        "max_iterations": s.max_iterations,
        "iterations": s.iterations,
        "last_run_at": iso(s.last_run_at),
        "next_run_at": iso(s.next_run_at) if s.active else None,
        "owner_id": s.owner_id,
        "created_at": iso(s.created_at),
        "updated_at": iso(s.updated_at),
    }


def _parse(kind: type, raw: Any) -> Any:
    from appliance.tasks.service import parse

    return parse(kind, raw)


def create(cfg: Any, caller: Any, req: ScheduleRequest | dict[str, Any], now: _dt.datetime | None = None) -> dict[str, Any]:
    if isinstance(req, dict):
        req = _parse(ScheduleRequest, req)
    ttype = registry_for(cfg).get(req.task_type)
    ttype.admit(req.data, caller.user_id, caller.admin)
    check_cron(req.schedule.expression, req.schedule.timezone)
    quotas.check_schedules(cfg, caller)
    now = now or utcnow()
    s = Schedule.create(
        owner=caller.user_id,
        name=req.name,
        task_type=ttype.name,
        expression=req.schedule.expression,
        timezone=req.schedule.timezone,
        data=req.data,
        priority=req.priority,
        active=req.active,
        max_iterations=req.max_iterations,
        next_run_at=next_slot(req.schedule.expression, req.schedule.timezone, now),
        created_at=now,
        updated_at=now,
    )
    return view(s)


def _visible(caller: Any, schedule_id: Any) -> Schedule:
    try:
        sid = int(schedule_id)
    except (TypeError, ValueError):
        raise NotFound(f"no schedule {schedule_id!r}") from None
    s = Schedule.get_or_none(Schedule.id == sid)
    if s is None or not (caller.admin or s.owner_id == caller.user_id):
        raise NotFound(f"no schedule {schedule_id!r}")
    return s


def get(cfg: Any, caller: Any, schedule_id: Any) -> dict[str, Any]:
    return view(_visible(caller, schedule_id))


def list_schedules(cfg: Any, caller: Any, page: int = 1, per_page: int = 20) -> tuple[list[dict[str, Any]], int]:
    query = Schedule.select()
    if not caller.admin:
        query = query.where(Schedule.owner == caller.user_id)
    return [view(s) for s in query.order_by(Schedule.id).paginate(page, per_page)], query.count()


def update(
    cfg: Any, caller: Any, schedule_id: Any, patch: SchedulePatch | dict[str, Any], now: _dt.datetime | None = None
) -> dict[str, Any]:
    if isinstance(patch, dict):
        patch = _parse(SchedulePatch, patch)
    s = _visible(caller, schedule_id)
    now = now or utcnow()
    ttype = registry_for(cfg).get(s.task_type)
    if s.active if patch.active is None else patch.active:
        # an active schedule is admitted again, whatever changed: its owner may have lost the right since
        ttype.admit(s.data if patch.data is None else patch.data, caller.user_id, caller.admin)
    elif patch.data is not None:
        ttype.parse(patch.data)  # switching it off (or editing it while off) is anyone's; turning it on admits it
    if patch.data is not None:
        s.data = patch.data
    if patch.schedule is not None:
        check_cron(patch.schedule.expression, patch.schedule.timezone)
        s.expression, s.timezone = patch.schedule.expression, patch.schedule.timezone
    for name in ("active", "max_iterations", "priority", "name"):
        value = getattr(patch, name)
        if value is not None:
            setattr(s, name, value)
    if patch.schedule is not None or patch.active:
        s.next_run_at = next_slot(s.expression, s.timezone, now)
    s.updated_at = now
    s.save()
    return view(s)


def delete(cfg: Any, caller: Any, schedule_id: Any) -> dict[str, Any]:
    s = _visible(caller, schedule_id)
    s.delete_instance()
    return {"schedule_id": s.id, "deleted": True}


# --- the scheduler's work -------------------------------------------------------------------------


def tick(cfg: Any, now: _dt.datetime | None = None) -> list[str]:
    """Fire every due schedule once; return the ids of the tasks created by this caller."""
    now = now or utcnow()
    fired: list[str] = []
    due = list(Schedule.select().where((Schedule.active == True) & (Schedule.next_run_at <= now)).order_by(Schedule.next_run_at))  # noqa: E712
    for s in due:
        try:
            task_id = _fire(cfg, s, now)
        except Exception:
            log.exception("schedule %s could not fire", s.id)
            continue
        if task_id:
            fired.append(task_id)
    return fired


def _fire(cfg: Any, s: Schedule, now: _dt.datetime) -> str | None:
    from appliance.tasks import service

    user_id, admin = owner_rights(s.owner_id)
    slot = latest_slot(s.expression, s.timezone, now)
    if slot < s.next_run_at:
        slot = s.next_run_at  # next_run_at itself is due (clock rounding); fire that slot
    nxt = next_slot(s.expression, s.timezone, max(now, slot))
    row: dict[str, Any] | None = None
    refused: AppError | None = None
    skipped: AppError | None = None
    try:
        with translated(), database.atomic():
            ScheduleRun.insert(schedule=s.id, slot=slot, fired_at=now).execute()
            try:
                registry_for(cfg).get(s.task_type).admit(s.data, user_id, admin)
            except AppError as exc:
                refused = exc
            skipped = quotas.pending_refusal(cfg, user_id, admin) if refused is None else None  # the slot only
            row = {
                "id": records.new_id(),
                "task_type": s.task_type,
                "owner": s.owner_id,
                "priority": s.priority,
                "input": s.data,
                "max_retries": cfg.queue.default_max_retries,
                "created_at": now,
                "queued_at": now,
                "schedule": s.id,
            }
            if refused is not None:
                error = f"schedule {s.id} may not run: {refused.message}; the schedule was deactivated"
                lifecycle.born_failed(row, error, refused.code, now)
            elif skipped is not None:
                error = f"schedule {s.id} slot {iso(slot)} skipped: {skipped.message}"
                lifecycle.born_failed(row, error, skipped.code, now)
            lifecycle.create([row])
            ScheduleRun.update(task_id=row["id"]).where((ScheduleRun.schedule == s.id) & (ScheduleRun.slot == slot)).execute()
            iterations = s.iterations + 1
            active = refused is None and not (s.max_iterations and iterations >= s.max_iterations)
            Schedule.update(iterations=Schedule.iterations + 1, last_run_at=now, next_run_at=nxt, active=active, updated_at=now).where(
                Schedule.id == s.id
            ).execute()
    except ConstraintConflict:
        # Another scheduler fired this slot: its transaction also moved next_run_at.
        log.debug("slot already fired elsewhere", extra=fields(schedule_id=s.id, slot=iso(slot)))
        return None
    if refused is not None or skipped is not None:
        records.add_history(row["id"], "failed", row["error"], at=now)
        code = (refused or skipped).code  # type: ignore[union-attr]
        log.warning(
            "schedule refused" if refused else "schedule slot skipped",
            extra=fields(schedule_id=s.id, slot=iso(slot), task_id=row["id"], code=code),
        )
        return None
    records.add_history(row["id"], "queued", f"schedule {s.id} slot {iso(slot)}", at=now)
    log.info("schedule fired", extra=fields(schedule_id=s.id, slot=iso(slot), task_id=row["id"]))
    service._hand_to_queue(cfg, [{"id": row["id"], "priority": s.priority, "eta": None}])
    return row["id"]
