"""Per-user quotas and the JSON depth bound, through the API on both backends (real database and queue)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import orjson
import pytest

from appliance.db.models import Schedule, Task, Upload
from appliance.queue import retention
from appliance.tasks import schedules
from appliance.times import utcnow
from tests.integration import test_tasks_support as support
from tests.integration.test_data_api import upload
from tests.integration.test_tasks_contract import run_next

tenv = support.tenv  # the fixture


def _quota_error(r, status, quota, limit, current):
    assert r.status_code == status, r.text
    err = r.json["error"]
    assert err["code"] == "quota_exceeded", err
    assert err["details"]["quota"] == quota and err["details"]["limit"] == limit and err["details"]["current"] == current, err
    assert quota.split(".")[1] in err["message"]


def test_pending_tasks_quota_counts_queued_and_running_per_user(tenv):
    tenv.cfg.queue.user_max_pending = 3
    ids = [tenv.submit("sample", {"n": i}) for i in range(3)]
    r = tenv.post("/tasks/submit", {"task_type": "sample"})
    _quota_error(r, 429, "queue.user_max_pending", 3, 3)
    assert r.headers["retry-after"]
    # a batch counts whole: bob has room for 3, so a batch of 4 is refused and leaves nothing behind
    r = tenv.post("/tasks/batch", {"tasks": [{"task_type": "sample"}] * 4}, who="bob")
    _quota_error(r, 429, "queue.user_max_pending", 3, 0)
    assert r.json["error"]["details"]["requested"] == 4
    assert Task.select().where(Task.owner == tenv.user_ids["bob"]).count() == 0
    assert tenv.post("/tasks/chain", {"tasks": [{"task_type": "sample"}] * 3}, who="bob").status_code == 200
    # running tasks count too; finished ones do not
    Task.update(status="running").where(Task.id == ids[0]).execute()
    assert tenv.post("/tasks/submit", {"task_type": "sample"}).status_code == 429
    Task.update(status="succeeded").where(Task.id.in_(ids[:2])).execute()
    assert tenv.post("/tasks/submit", {"task_type": "sample"}).status_code == 200
    # uploads and bulk imports are tasks as well
    assert tenv.post("/api/data/bulk-import", {"dataset": "d", "records": [{"a": 1}]}).status_code == 200
    r = tenv.post("/api/data/bulk-import", {"dataset": "d", "records": [{"a": 1}]})
    _quota_error(r, 429, "queue.user_max_pending", 3, 3)
    r = upload(tenv, b"a\n1\n")
    _quota_error(r, 429, "queue.user_max_pending", 3, 3)
    assert Upload.select().count() == 0
    assert not tenv.cfg.path("uploads").exists() or not any(tenv.cfg.path("uploads").iterdir())  # refused before writing
    # admins are exempt
    for _ in range(5):
        tenv.submit("sample", who="admin")


def test_schedules_quota(tenv):
    tenv.cfg.queue.user_max_schedules = 2
    body = {"task_type": "sample", "schedule": {"type": "cron", "expression": "*/5 * * * *"}}
    for _ in range(2):
        assert tenv.post("/tasks/schedule", body).status_code == 200
    r = tenv.post("/tasks/schedule", body)
    _quota_error(r, 429, "queue.user_max_schedules", 2, 2)
    assert Schedule.select().count() == 2
    assert tenv.post("/tasks/schedule", body, who="bob").status_code == 200
    assert tenv.post("/tasks/schedule", body, who="admin").status_code == 200
    sid = tenv.get("/tasks/schedules").json["data"][0]["schedule_id"]
    assert tenv.client.simulate_delete(f"/tasks/schedules/{sid}", headers=tenv.headers["alice"]).status_code == 200
    assert tenv.post("/tasks/schedule", body).status_code == 200


def test_upload_bytes_quota(tenv):
    tenv.cfg.api.user_upload_quota_bytes = 5000
    first = upload(tenv, b"a\n" + b"1\n" * 1500)  # 3002 bytes stored
    assert first.status_code == 200, first.text
    r = upload(tenv, b"a\n" + b"2\n" * 1500)
    _quota_error(r, 413, "api.user_upload_quota_bytes", 5000, 3002)
    assert Upload.select().count() == 1
    stored = [p for p in tenv.cfg.path("uploads").rglob("*") if p.is_file()]
    assert len(stored) == 1, stored  # the refused upload's partial file is gone
    assert upload(tenv, b"a\n" + b"3\n" * 900).status_code == 200  # what is left still fits
    assert upload(tenv, b"a\n" + b"4\n" * 1500, who="bob").status_code == 200
    tenv.cfg.api.user_upload_quota_bytes = 3500
    assert upload(tenv, b"a\n1\n").json["error"]["code"] == "quota_exceeded"  # full: refused before the body is read
    assert upload(tenv, b"a\n" + b"5\n" * 3000, who="admin").status_code == 200


def _nested(depth: int) -> dict:
    value: object = 1
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return {"v": value}


def test_json_nested_too_deep_is_400_everywhere(tenv):
    for depth in (65, 254, 255, 400, 5000):
        r = tenv.client.simulate_post(
            "/tasks/submit",
            body=orjson.dumps({"task_type": "sample", "data": _nested(depth)}) if depth < 250 else _deep_text(depth),
            headers={**tenv.headers["alice"], "Content-Type": "application/json"},
        )
        assert r.status_code == 400, (depth, r.text)
        err = r.json["error"]
        assert err["code"] == "json_too_deep" and err["details"]["limit"] == 64, err
    ok = tenv.post("/tasks/submit", {"task_type": "sample", "data": _nested(60)})
    assert ok.status_code == 200, ok.text
    # brackets inside strings do not nest
    assert tenv.post("/tasks/submit", {"task_type": "sample", "data": {"s": "[" * 500}}).status_code == 200
    r = upload(tenv, b"a\n1\n", params=_deep_text(300, prefix='{"x": ').decode())
    assert r.status_code == 400 and r.json["error"]["code"] == "json_too_deep" and r.json["error"]["details"]["field"] == "parameters"
    r = tenv.client.simulate_post("/auth/login", body=b'{"username": ' + b"[" * 300 + b"]" * 300 + b"}")
    assert r.status_code == 400 and r.json["error"]["code"] == "json_too_deep"


def _deep_text(depth: int, prefix: str = '{"task_type": "sample", "data": {"v": ') -> bytes:
    return prefix.encode() + b"[" * depth + b"]" * depth + b"}" * (prefix.count("{"))


def _age(upload_id: str, hours: float) -> None:
    Upload.update(created_at=utcnow() - dt.timedelta(hours=hours)).where(Upload.id == upload_id).execute()


def test_processed_uploads_are_removed_after_the_retention(tenv):
    tenv.cfg.api.upload_retention_hours = 24
    tenv.cfg.api.user_upload_quota_bytes = 3000
    done = upload(tenv, b"a\n" + b"1\n" * 1000).json["data"]
    run_next(tenv)  # processed
    waiting = upload(tenv, b"a\n2\n", who="bob").json["data"]  # its task has not run yet
    recent = upload(tenv, b"a\n3\n", who="bob").json["data"]
    run_next(tenv)
    run_next(tenv)
    Task.update(status="queued").where(Task.id == waiting["task_id"]).execute()
    for up in (done, waiting):
        _age(up["upload"]["upload_id"], 25)
    _age(recent["upload"]["upload_id"], 23)
    assert upload(tenv, b"a\n" + b"4\n" * 1000).json["error"]["code"] == "quota_exceeded"
    orphan = tenv.cfg.path("uploads") / ("0" * 32)  # a folder whose upload never got its row (cut off mid-stream)
    orphan.mkdir(parents=True)
    (orphan / "part.csv").write_bytes(b"x")
    old = time.time() - 25 * 3600
    os.utime(orphan, (old, old))
    folder = Path(Upload.get_by_id(done["upload"]["upload_id"]).path).parent

    result = retention.sweep(tenv.cfg)

    assert result == {"uploads": 1, "bytes": 2002, "orphans": 1}, result
    assert {u.id for u in Upload.select()} == {waiting["upload"]["upload_id"], recent["upload"]["upload_id"]}
    assert not folder.exists() and not orphan.exists()
    assert Path(Upload.get_by_id(waiting["upload"]["upload_id"]).path).exists()
    assert upload(tenv, b"a\n" + b"4\n" * 1000).status_code == 200  # the quota counts what is stored
    tenv.cfg.api.upload_retention_hours = 0
    _age(recent["upload"]["upload_id"], 10_000)
    assert retention.sweep(tenv.cfg)["uploads"] == 0  # 0 keeps uploads


@pytest.mark.slow
def test_the_scheduler_process_removes_expired_uploads(tenv):
    up = upload(tenv, b"a\n1\n").json["data"]
    run_next(tenv)
    _age(up["upload"]["upload_id"], 48)
    path = Path(Upload.get_by_id(up["upload"]["upload_id"]).path)
    tenv.start("scheduler")
    deadline = time.monotonic() + 20
    while Upload.get_or_none(Upload.id == up["upload"]["upload_id"]) is not None:
        assert time.monotonic() < deadline, tenv.logs()
        time.sleep(0.1)
    assert not path.exists()


def test_a_schedule_slot_is_skipped_while_its_owner_is_at_the_pending_quota(tenv):
    tenv.cfg.queue.user_max_pending = 2
    body = {"task_type": "sample", "schedule": {"type": "cron", "expression": "* * * * *"}}
    sid = tenv.post("/tasks/schedule", body).json["data"]["schedule_id"]
    now = utcnow()
    fired = []
    for minute in range(1, 5):  # nothing runs the tasks: they stay queued
        fired += schedules.tick(tenv.cfg, now + dt.timedelta(minutes=minute))
    assert len(fired) == 2, fired
    tasks = list(Task.select().where(Task.schedule == sid).order_by(Task.created_at))
    assert [t.status for t in tasks] == ["queued", "queued", "failed", "failed"]
    assert tasks[2].error_code == "quota_exceeded" and "user_max_pending" in tasks[2].error
    assert Schedule.get_by_id(sid).active  # skipped slots, not a refused schedule
    Task.update(status="succeeded").where(Task.id == tasks[0].id).execute()
    assert len(schedules.tick(tenv.cfg, now + dt.timedelta(minutes=6))) == 1


def test_a_held_back_task_is_not_resent_by_the_reaper_as_lost(tenv):
    """A task waiting for its owner's turn sits in the queue's schedule, not its list: the row's eta says so."""
    from appliance.queue import reaper
    from appliance.tasks import broker, quotas

    tid = tenv.submit("sample")
    huey = broker.get_queue(tenv.cfg)
    assert huey.dequeue() is not None  # a worker took the message ...
    Task.update(queued_at=utcnow() - dt.timedelta(minutes=5)).where(Task.id == tid).execute()
    row = quotas.held_back(tid, 1)
    assert row is not None  # ... and found alice at her cap (the claim failed on the fair share alone)
    eta = quotas.defer(row, 1, 2)
    broker.enqueue(tenv.cfg, tid, 1, row.priority, eta)
    assert broker.depth(tenv.cfg) == {"pending": 0, "scheduled": 1}
    assert reaper.reap(tenv.cfg)["resent"] == 0
    assert "user_max_running" in tenv.status(tid)["progress"]["message"]
    Task.update(eta=None).where(Task.id == tid).execute()  # without the row's eta it would count as lost
    assert reaper.reap(tenv.cfg)["resent"] == 1
