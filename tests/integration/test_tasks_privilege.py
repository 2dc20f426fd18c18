"""Who may run which task, and on whose upload: every way a task enters, on both backends.

Admin-only types (database_cleanup, report, sleep over a minute) answer a non-admin 403
naming the type through submit, batch, chain, schedule create/update and data processing,
and a schedule whose owner was demoted does not fire its task. Uploads are read only by their
owner or an admin: at submit (404, so ids are no oracle) and again when the task runs.
The API runs in-process; tasks run from the real queue (run_next).
"""

from __future__ import annotations

import datetime as dt

from appliance.db.models import AuditEvent, Schedule, Task, TaskHistory, TaskLog, Upload, User
from appliance.tasks import records, schedules
from appliance.times import utcnow
from tests.integration import test_tasks_support as support
from tests.integration.test_data_api import upload
from tests.integration.test_tasks_contract import run_next

tenv = support.tenv  # the fixture

CRON = {"type": "cron", "expression": "*/5 * * * *", "timezone": "UTC"}


def _forbidden(r, task_type: str, field: str = "task_type") -> None:
    assert r.status_code == 403, r.text
    err = r.json["error"]
    assert r.json["status"] == "error" and err["code"] == "admin_only_task_type"
    assert err["details"] == {"task_type": task_type, "field": field} and repr(task_type) in err["message"]


def test_submit_of_admin_only_types_is_refused_to_users(tenv):
    _forbidden(tenv.post("/tasks/submit", {"task_type": "database_cleanup", "data": {"days": 0}}), "database_cleanup")
    _forbidden(tenv.post("/tasks/submit", {"task_type": "report", "data": {"hours": 24}}), "report")
    r = tenv.post("/tasks/submit", {"task_type": "sleep", "data": {"seconds": 61}})
    _forbidden(r, "sleep")
    assert "longer than 60 seconds" in r.json["error"]["message"]
    assert Task.select().count() == 0
    assert tenv.post("/tasks/submit", {"task_type": "sleep", "data": {"seconds": 60}}).status_code == 200
    for task_type, data in (("database_cleanup", {"days": 30}), ("report", {}), ("sleep", {"seconds": 3600})):
        assert tenv.post("/tasks/submit", {"task_type": task_type, "data": data}, who="admin").status_code == 200
    types = {t["name"]: t for t in tenv.get("/tasks/types").json["data"]}
    assert types["report"]["admin_only"] and types["sleep"]["admin_only_when"] == "longer than 60 seconds"


def test_batch_and_chain_with_one_admin_only_step_are_refused_whole(tenv):
    steps = [{"task_type": "sample"}, {"task_type": "database_cleanup", "data": {"days": 0}}]
    _forbidden(tenv.post("/tasks/batch", {"tasks": steps}), "database_cleanup", "tasks[1].task_type")
    _forbidden(tenv.post("/tasks/chain", {"tasks": [{"task_type": "report"}, *steps]}), "report", "tasks[0].task_type")
    long_sleep = [{"task_type": "sample"}, {"task_type": "sample"}, {"task_type": "sleep", "data": {"seconds": 600}}]
    _forbidden(tenv.post("/tasks/batch", {"tasks": long_sleep, "execution_mode": "sequential"}), "sleep", "tasks[2].task_type")
    assert Task.select().count() == 0
    assert tenv.post("/tasks/chain", {"tasks": steps}, who="admin").status_code == 200


def test_schedules_of_admin_only_types_are_refused_to_users(tenv):
    _forbidden(tenv.post("/tasks/schedule", {"task_type": "database_cleanup", "schedule": CRON, "data": {"days": 0}}), "database_cleanup")
    r = tenv.post("/tasks/schedule", {"task_type": "sleep", "schedule": CRON, "data": {"seconds": 30}})
    assert r.status_code == 200, r.text
    sid = r.json["data"]["schedule_id"]
    patch = tenv.client.simulate_patch(f"/tasks/schedules/{sid}", json={"data": {"seconds": 90}}, headers=tenv.headers["alice"])
    _forbidden(patch, "sleep")
    assert Schedule.get_by_id(sid).data == {"seconds": 30}
    # switched off, a schedule enters no task: editing it is allowed; switching it on is admitted again
    off = tenv.client.simulate_patch(
        f"/tasks/schedules/{sid}", json={"active": False, "data": {"seconds": 90}}, headers=tenv.headers["alice"]
    )
    assert off.status_code == 200 and off.json["data"]["data"] == {"seconds": 90}
    _forbidden(tenv.client.simulate_patch(f"/tasks/schedules/{sid}", json={"active": True}, headers=tenv.headers["alice"]), "sleep")
    assert not Schedule.get_by_id(sid).active
    assert Schedule.select().count() == 1


def test_a_demoted_owners_schedule_does_not_fire_its_admin_only_task(tenv):
    admin_id = tenv.user_ids["admin"]
    body = {"task_type": "database_cleanup", "schedule": CRON, "data": {"days": 0}}
    sid = tenv.post("/tasks/schedule", body, who="admin").json["data"]["schedule_id"]
    keep = tenv.post("/tasks/schedule", {**body, "task_type": "sample", "data": {}}, who="admin").json["data"]["schedule_id"]
    AuditEvent.create(event="login_failed", user_id=tenv.user_ids["alice"], at=utcnow() - dt.timedelta(days=400))
    User.update(role="user").where(User.id == admin_id).execute()  # demoted after making the schedule
    now = utcnow().replace(second=0, microsecond=0)
    Schedule.update(next_run_at=now - dt.timedelta(minutes=1)).execute()
    fired = schedules.tick(tenv.cfg, now)
    records.flush()
    assert len(fired) == 1 and tenv.task(fired[0]).schedule_id == keep  # the plain schedule still fires
    (refused,) = Task.select().where(Task.schedule == sid)
    assert refused.status == "failed" and refused.error_code == "admin_only_task_type" and refused.started_at is None
    assert "may only be run by an administrator" in refused.error
    assert not Schedule.get_by_id(sid).active and Schedule.get_by_id(keep).active
    assert run_next(tenv) == fired[0] and run_next(tenv) is None  # nothing of the refused one reached the queue
    assert AuditEvent.select().where(AuditEvent.event == "login_failed").count() == 1
    assert [h.status for h in TaskHistory.select().where(TaskHistory.task == refused.id)] == ["failed"]
    # the owner, an admin again, can reactivate it
    User.update(role="admin").where(User.id == admin_id).execute()
    r = tenv.client.simulate_patch(f"/tasks/schedules/{sid}", json={"active": True}, headers=tenv.headers["admin"])
    assert r.status_code == 200 and r.json["data"]["active"]


def test_data_processing_is_admitted_like_a_submit(tenv):
    r = upload(tenv, b"a\n1\n", ptype="database_cleanup", params='{"days": 0}')
    _forbidden(r, "database_cleanup")
    r = upload(tenv, b"a\n1\n", ptype="report")
    _forbidden(r, "report")
    assert Upload.select().count() == 0 and Task.select().count() == 0
    uploads = tenv.cfg.path("uploads")
    assert not uploads.exists() or not any(p.is_file() for p in uploads.rglob("*"))


def _bobs_upload(tenv) -> str:
    r = upload(tenv, b"name,n\nx,1\ny,2\n", who="bob")
    assert r.status_code == 200, r.text
    run_next(tenv)
    return r.json["data"]["upload"]["upload_id"]


def _not_found(r, field: str) -> None:
    assert r.status_code == 404, r.text
    assert r.json["error"]["code"] == "not_found" and r.json["error"]["details"]["field"] == field


def test_another_users_upload_is_not_found_at_every_entry(tenv):
    bobs = _bobs_upload(tenv)
    before = Task.select().count()
    _not_found(tenv.post("/tasks/submit", {"task_type": "csv_profile", "data": {"upload_id": bobs}}), "data.upload_id")
    _not_found(tenv.post("/tasks/submit", {"task_type": "csv_profile", "data": {"upload_id": "0" * 32}}), "data.upload_id")
    body = {"task_type": "bulk_import", "data": {"dataset": "stolen", "source_file_id": bobs}}
    _not_found(tenv.post("/tasks/submit", body), "data.source_file_id")
    _not_found(tenv.post("/tasks/batch", {"tasks": [{"task_type": "sample"}, body]}), "data.source_file_id")
    _not_found(tenv.post("/tasks/schedule", {**body, "schedule": CRON}), "data.source_file_id")
    _not_found(tenv.post("/api/data/bulk-import", {"dataset": "stolen", "source_file_id": bobs}), "source_file_id")
    # the upload endpoint cannot be used to point a task at someone else's file either
    r = upload(tenv, b"x\n", ptype="bulk_import", params=f'{{"dataset": "stolen", "source_file_id": "{bobs}"}}')
    _not_found(r, "data.source_file_id")
    assert Task.select().count() == before
    # the owner and an admin may
    ok = tenv.submit("csv_profile", {"upload_id": bobs}, who="bob")
    admins = tenv.submit("csv_profile", {"upload_id": bobs}, who="admin")
    assert {run_next(tenv), run_next(tenv)} == {ok, admins}
    assert tenv.status(ok)["result"]["rows"] == 2 and tenv.status(admins)["result"]["rows"] == 2


def test_the_task_checks_the_upload_owner_again_when_it_runs(tenv):
    bobs = _bobs_upload(tenv)
    alices = upload(tenv, b"a\n1\n").json["data"]
    run_next(tenv)
    # alice's upload changes hands after her task was admitted (or the row was written some other way)
    tid = tenv.submit("csv_profile", {"upload_id": alices["upload"]["upload_id"]})
    Upload.update(owner=tenv.user_ids["bob"]).where(Upload.id == alices["upload"]["upload_id"]).execute()
    # an admin's task on bob's file, and the admin demoted before it runs
    admins = tenv.submit("bulk_import", {"dataset": "d", "source_file_id": bobs}, who="admin")
    User.update(role="user").where(User.id == tenv.user_ids["admin"]).execute()
    assert {run_next(tenv), run_next(tenv)} == {tid, admins}
    for t in (tid, admins):
        task = tenv.task(t)
        assert task.status == "failed" and task.error_code == "not_found" and "no uploaded file" in task.error, task.error
        assert task.result is None
    assert tenv.get("/api/data/d", who="bob").json["metadata"]["total"] == 0


def test_cleanup_never_goes_below_the_audit_retention_floor(tenv):
    now = utcnow()
    for days in (5, 89, 91, 400):
        AuditEvent.create(event=f"e{days}", at=now - dt.timedelta(days=days))
    tid = tenv.submit("sample")
    run_next(tenv)
    records.add_log(tid, "a log line")
    records.flush()
    c = tenv.submit("database_cleanup", {"days": 0}, who="admin")
    run_next(tenv)
    res = tenv.status(c)["result"]
    assert res["deleted"]["audit_events"] == 2
    assert sorted(e.event for e in AuditEvent.select() if e.event.startswith("e")) == ["e5", "e89"]
    assert TaskLog.select().where(TaskLog.task == tid).count() == 0  # days 0 still prunes what has no floor
    tenv.cfg.queue.audit_retention_days = 3  # an operator's lower floor is honoured as well
    c = tenv.submit("database_cleanup", {"days": 0}, who="admin")
    run_next(tenv)
    assert [e.event for e in AuditEvent.select() if e.event.startswith("e")] == []
