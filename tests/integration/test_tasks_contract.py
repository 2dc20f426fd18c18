"""Contract tests of the task layer on both backends (SQLite+SqliteHuey, PostgreSQL+Redis).

The API runs in-process; queue messages are taken off the real queue and executed
in this process where a test needs a task to run (`run_next`). The reference
design's own health check (`sample` echoes its data) runs on a real worker process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from appliance.db.models import NodeHeartbeat, Schedule, ScheduleRun, Task
from appliance.queue import reaper
from appliance.queue.runner import Runner, Runtime
from appliance.tasks import broker, lifecycle, records, schedules, service
from appliance.times import utcnow
from tests.integration import test_tasks_support as support

tenv = support.tenv  # the fixture


@contextlib.contextmanager
def statements(handle: Any) -> Iterator[list[list[str]]]:
    """The first three words of every statement this thread runs meanwhile; an instrument: each still runs for real."""
    seen: list[list[str]] = []
    real = type(handle).execute_sql

    def counting(sql, params=None, *args, **kw):
        if threading.current_thread() is threading.main_thread():
            seen.append(sql.split(None, 3)[:3])
        return real(handle, sql, params, *args, **kw)

    handle.execute_sql = counting
    try:
        yield seen
    finally:
        del handle.execute_sql


def run_next(env) -> str | None:
    """Take one message off the queue and run it here; the task id, or None when empty."""
    huey = broker.get_queue(env.cfg)
    msg = huey.dequeue()
    if msg is None:
        return None
    Runner(Runtime(env.cfg, f"{reaper.host_name(env.cfg)}:worker:9")).install(huey)
    huey.execute(msg)
    records.flush()
    return msg.args[0]


def test_submit_validation_names_fields(tenv):
    r = tenv.post("/tasks/submit", {"task_type": "nope"})
    assert r.status_code == 400 and r.json["error"]["code"] == "unknown_task_type"
    assert "sample" in r.json["error"]["details"]["known"]
    r = tenv.post("/tasks/submit", {"task_type": "sample", "data": {"duration": "x"}})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "data.duration"
    r = tenv.post("/tasks/submit", {"task_type": "sample", "priority": 11})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "priority"
    r = tenv.post("/tasks/submit", {"task_type": "sample", "callbacks": {"completion_url": "file:///etc/passwd"}})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "callbacks.completion_url"
    r = tenv.post("/tasks/submit", {"task_type": "sample", "eta": "tomorrow"})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "eta"
    r = tenv.post("/tasks/batch", {"tasks": [{"task_type": "sample"}, {"task_type": "sample", "data": {"steps": 0}}]})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "tasks[1].data.steps"
    assert Task.select().count() == 0
    assert tenv.client.simulate_post("/tasks/submit", json={"task_type": "sample"}).status_code == 401


def test_submit_answers_like_the_reference_and_owners_see_their_own(tenv):
    r = tenv.post("/tasks/submit", {"task_type": "sample", "data": {"message": "x"}, "priority": 2})
    assert r.status_code == 200
    d = r.json["data"]
    assert d["status"] == "queued" and d["priority"] == 2 and d["created_at"].endswith("Z")
    assert r.json["links"] == {
        "status": f"/tasks/status/{d['task_id']}",
        "cancel": f"/tasks/cancel/{d['task_id']}",
        "logs": f"/tasks/logs/{d['task_id']}",
    }
    bobs = tenv.submit("sample", who="bob")
    assert tenv.get(f"/tasks/status/{bobs}").status_code == 404
    assert tenv.post(f"/tasks/cancel/{bobs}", {}).status_code == 404
    assert tenv.get(f"/tasks/logs/{bobs}").status_code == 404
    assert [t["task_id"] for t in tenv.get("/tasks").json["data"]] == [d["task_id"]]
    assert len(tenv.get("/tasks", who="admin").json["data"]) == 2
    assert tenv.get("/tasks", params={"status": "bogus"}).status_code == 400
    assert tenv.get("/tasks/stats").json["data"]["overview"]["queued"] == 1
    assert tenv.get("/tasks/stats", who="admin").json["data"]["queue"]["waiting_by_priority"] == {"2": 1, "5": 1}
    assert {t["name"] for t in tenv.get("/tasks/types").json["data"]} >= {"sample", "sleep", "csv_profile"}


def test_queue_priority_order(tenv):
    ids = [tenv.submit("sample", priority=p) for p in (10, 5, 1, 10)]
    order = [run_next(tenv) for _ in ids]
    assert order == [ids[2], ids[1], ids[0], ids[3]]
    assert run_next(tenv) is None
    assert all(tenv.task(t).status == "succeeded" for t in ids)


def test_duplicate_and_cancelled_messages_never_run(tenv):
    tid = tenv.submit("sample")
    broker.enqueue(tenv.cfg, tid, 1, 5)  # a duplicate of attempt 1 (e.g. the reaper resent it)
    assert run_next(tenv) == tid and run_next(tenv) == tid
    assert tenv.task(tid).attempt == 1 and tenv.task(tid).status == "succeeded"
    c = tenv.submit("sample")
    assert tenv.post(f"/tasks/cancel/{c}", {"reason": "no"}).json["data"]["status"] == "cancelled"
    assert run_next(tenv) == c
    t = tenv.task(c)
    assert t.status == "cancelled" and t.attempt == 0 and t.started_at is None
    assert tenv.post(f"/tasks/cancel/{c}", {}).status_code == 409


def test_chain_and_sequential_batch_hand_over_in_order(tenv):
    r = tenv.post(
        "/tasks/chain", {"tasks": [{"task_type": "sample", "data": {"message": "a"}}, {"task_type": "sample", "data": {"message": "b"}}]}
    )
    a, b = r.json["data"]["task_ids"]
    assert broker.depth(tenv.cfg)["pending"] == 1
    assert run_next(tenv) == a and run_next(tenv) == b
    assert tenv.status(b)["result"]["previous_result"]["echo"]["message"] == "a"
    r = tenv.post(
        "/tasks/batch", {"execution_mode": "sequential", "failure_strategy": "stop_on_error", "tasks": [{"task_type": "sample"}] * 3}
    )
    first, second, third = r.json["data"]["task_ids"]
    assert tenv.post(f"/tasks/cancel/{first}", {}).status_code == 200  # cancelling the head stops the batch
    assert tenv.task(second).status == "cancelled" and tenv.task(third).status == "cancelled"
    assert tenv.get(f"/tasks/batch/{r.json['data']['batch_id']}").json["data"]["status"] == "cancelled"


def test_schedule_crud_and_ticks_fire_once_per_slot(tenv):
    body = {
        "task_type": "sample",
        "schedule": {"type": "cron", "expression": "*/5 * * * *", "timezone": "Europe/Berlin"},
        "max_iterations": 2,
    }
    r = tenv.post("/tasks/schedule", body)
    assert r.status_code == 200, r.text
    sid = r.json["data"]["schedule_id"]
    assert r.json["data"]["next_run_at"].endswith("Z")
    bad = tenv.post("/tasks/schedule", {**body, "schedule": {"type": "cron", "expression": "61 * * * *"}})
    assert bad.status_code == 400 and bad.json["error"]["details"]["field"] == "schedule.expression"
    assert tenv.get(f"/tasks/schedules/{sid}", who="bob").status_code == 404
    assert [s["schedule_id"] for s in tenv.get("/tasks/schedules").json["data"]] == [sid]
    now = utcnow().replace(second=0, microsecond=0)
    Schedule.update(next_run_at=now - dt.timedelta(minutes=42)).where(Schedule.id == sid).execute()
    # two schedulers tick at the same instant, after a long downtime: one task
    fired = schedules.tick(tenv.cfg, now) + schedules.tick(tenv.cfg, now)
    assert len(fired) == 1 and ScheduleRun.select().count() == 1
    s = Schedule.get_by_id(sid)
    assert s.next_run_at > now and s.iterations == 1 and s.active
    assert schedules.tick(tenv.cfg, s.next_run_at + dt.timedelta(seconds=1)) != []
    assert not Schedule.get_by_id(sid).active  # max_iterations reached
    assert tenv.get(f"/tasks/schedules/{sid}").json["data"]["next_run_at"] is None
    r = tenv.client.simulate_patch(f"/tasks/schedules/{sid}", json={"active": True, "max_iterations": 10}, headers=tenv.headers["alice"])
    assert r.status_code == 200 and r.json["data"]["active"] and r.json["data"]["next_run_at"]
    assert tenv.client.simulate_delete(f"/tasks/schedules/{sid}", headers=tenv.headers["alice"]).json["data"]["deleted"]
    assert Task.select().where(Task.task_type == "sample").count() == 2


def test_schedule_fires_once_in_the_repeated_autumn_hour(tenv):
    """Two schedulers ticking every minute through the Berlin night of 2024-10-27: 02:30 local (it happens twice) fires once."""
    start = dt.datetime(2024, 10, 26, 22, 0)
    body = {"task_type": "sample", "schedule": {"type": "cron", "expression": "30 2 * * *", "timezone": "Europe/Berlin"}}
    sid = schedules.create(tenv.cfg, service.Caller(tenv.user_ids["alice"]), body, now=start)["schedule_id"]
    fired, clock = [], start
    while clock < dt.datetime(2024, 10, 27, 4, 0):
        fired += schedules.tick(tenv.cfg, clock) + schedules.tick(tenv.cfg, clock + dt.timedelta(seconds=1))
        clock += dt.timedelta(minutes=1)
    assert len(fired) == 1
    assert [r.slot for r in ScheduleRun.select()] == [dt.datetime(2024, 10, 27, 0, 30)]
    assert Schedule.get_by_id(sid).next_run_at == dt.datetime(2024, 10, 28, 1, 30)


def test_reaper_requeues_or_fails_tasks_of_dead_workers(tenv):
    here = reaper.host_name(tenv.cfg)
    retry = tenv.submit("sample", retry_config={"max_retries": 1})
    final = tenv.submit("sample")
    remote = tenv.submit("sample")
    huey = broker.get_queue(tenv.cfg)
    while huey.dequeue() is not None:  # the messages were "held by" workers that then died
        pass
    lifecycle.claim(retry, 1, f"{here}:worker:0#4000001")
    lifecycle.claim(final, 1, f"{here}:worker:0#4000002")
    lifecycle.claim(remote, 1, "elsewhere:worker:3#77")
    now = utcnow()
    NodeHeartbeat.create(node_id="elsewhere:worker:3", role="worker", host="elsewhere", pid=77, started_at=now, last_heartbeat=now)
    done = reaper.reap(tenv.cfg, now=now, alive=lambda pid, since: pid == 4000002)
    assert done == {"requeued": 1, "failed": 0, "resent": 0}
    assert tenv.task(retry).status == "retrying" and tenv.task(final).status == "running" and tenv.task(remote).status == "running"
    later = now + dt.timedelta(seconds=tenv.cfg.supervisor.heartbeat_timeout + 1)
    done = reaper.reap(tenv.cfg, now=later, alive=lambda pid, since: False)
    assert done["requeued"] == 0 and done["failed"] == 2
    for t in (final, remote):
        assert tenv.task(t).status == "failed" and tenv.task(t).error_code == "worker_lost"
    assert run_next(tenv) == retry
    assert tenv.task(retry).status == "succeeded" and tenv.task(retry).attempt == 2


def test_reaper_resends_lost_messages(tenv):
    tid = tenv.submit("sample")
    huey = broker.get_queue(tenv.cfg)
    assert huey.dequeue() is not None  # lost with a worker that died before claiming it
    assert reaper.reap(tenv.cfg, now=utcnow())["resent"] == 0  # not yet: it may still be starting
    assert reaper.reap(tenv.cfg, now=utcnow() + dt.timedelta(seconds=reaper.LOST_AFTER + 1))["resent"] == 1
    assert run_next(tenv) == tid and tenv.task(tid).status == "succeeded"


def test_submit_is_one_statement_and_one_queue_push(tenv):
    """The hot path: one INSERT of the task row on the caller's connection, one message; history comes batched."""
    service.submit(tenv.cfg, service.SYSTEM, {"task_type": "sample"})  # warm (connection, registry, queue)
    records.flush()
    before = broker.depth(tenv.cfg)["pending"]
    with statements(tenv.handle) as seen:
        ids = [service.submit(tenv.cfg, service.SYSTEM, {"task_type": "sample", "data": {"n": i}})["task_id"] for i in range(5)]
    assert seen == [["INSERT", "INTO", '"task"']] * 5
    assert broker.depth(tenv.cfg)["pending"] == before + 5
    records.flush()
    for tid in ids:
        t = tenv.task(tid)
        assert t.status == "queued" and t.attempt == 0 and t.retries == 0 and t.progress == 0.0 and t.callbacks == {}
        assert t.queued_at == t.created_at and t.cancel_requested is False and t.result is None
        assert [h["status"] for h in tenv.status(tid)["history"]] == ["queued"]


CRASH_BETWEEN = """
import os, sys
from appliance import db
from appliance.config import load_config
from appliance.tasks import broker, service
cfg = load_config(sys.argv[1], env={})
db.open_database(cfg)
def crash(*args, **kw):  # the process dies after the row committed, before the queue got the message
    print(service.records.Task.select().count(), flush=True)
    os._exit(9)
broker.enqueue = crash
service.submit(cfg, service.SYSTEM, {"task_type": "sample"})
"""


def test_crash_between_row_and_message_is_recovered_by_the_reaper(tenv):
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN, str(tenv.path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9 and proc.stdout.strip() == "1", proc.stderr  # the row was committed before the push
    (task,) = Task.select()
    assert task.status == "queued" and broker.depth(tenv.cfg)["pending"] == 0
    assert reaper.reap(tenv.cfg, now=utcnow())["resent"] == 0
    assert reaper.reap(tenv.cfg, now=utcnow() + dt.timedelta(seconds=reaper.LOST_AFTER + 1))["resent"] == 1
    assert run_next(tenv) == task.id and tenv.task(task.id).status == "succeeded"


def test_cleanup_and_report_do_real_work(tenv):
    old = utcnow() - dt.timedelta(days=40)
    tid = tenv.submit("sample")
    run_next(tenv)
    records.history_now(tid, "running", "ancient")
    from appliance.db.models import TaskHistory

    TaskHistory.update(at=old).where(TaskHistory.message == "ancient").execute()
    c = tenv.submit("database_cleanup", {"days": 30, "batch_size": 1}, who="admin")
    run_next(tenv)
    res = tenv.status(c)["result"]
    assert res["deleted"]["task_history"] == 1
    rep = tenv.submit("report", {"hours": 1}, who="admin")
    run_next(tenv)
    out = tenv.status(rep)["result"]
    assert out["tasks"]["by_status"]["succeeded"] == 2 and out["tasks"]["success_rate"] == 1.0
    assert service.stats(tenv.cfg, service.SYSTEM)["overview"]["completed"] == 3


def test_sample_echoes_its_data_like_the_reference_health_check(tenv):
    """API.md: sample echoes its data; the reference's health check submits {"test": "health_check"}."""
    tenv.start()
    r = tenv.post("/tasks/submit", {"task_type": "sample", "data": {"test": "health_check"}})
    assert r.status_code == 200, r.text
    s = tenv.wait(r.json["data"]["task_id"])
    assert s["status"] == "succeeded", s
    assert s["result"]["test"] == "health_check" and s["result"]["echo"]["test"] == "health_check"
    # known fields still work and are validated, unknown ones of any JSON shape come back as sent
    data = {"duration": 0.2, "steps": 2, "test_id": 7, "nested": {"a": [1, None]}, "attempt": "mine"}
    s = tenv.wait(tenv.submit("sample", data))
    assert s["status"] == "succeeded" and s["progress"]["percentage"] == 100.0
    assert s["result"]["test_id"] == 7 and s["result"]["nested"] == {"a": [1, None]}
    assert s["result"]["attempt"] == 1 and s["result"]["echo"]["attempt"] == "mine"  # its own fields win at the top
    assert s["result"]["echo"]["duration"] == 0.2 and s["result"]["echo"]["steps"] == 2
    r = tenv.post("/tasks/submit", {"task_type": "sample", "data": {"test": "health_check", "duration": "long"}})
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "data.duration"


def test_a_sample_task_is_two_statements_in_the_worker(tenv):
    """The worker's hot path: claim and finish, one statement each; sample's progress(100, "done") right
    after the claim is held and goes with the finish (TaskContext.progress)."""
    tenv.submit("sample")
    run_next(tenv)  # warm (connection, registry, queue)
    tid = tenv.submit("sample", {"message": "hi"})
    with statements(tenv.handle) as seen:
        assert run_next(tenv) == tid
    # then run_next's flush: the history and log lines of the task, one multi-row INSERT each
    assert seen == [["UPDATE", '"task"', "SET"]] * 2 + [["INSERT", "INTO", '"task_history"'], ["INSERT", "INTO", '"task_log"']]
    t = tenv.task(tid)
    assert t.status == "succeeded" and t.progress == 100.0 and t.progress_message == "done"
    assert [h["status"] for h in tenv.status(tid)["history"]] == ["queued", "running", "succeeded"]


def test_progress_is_written_at_most_every_check_interval_and_held_progress_is_never_lost(tenv, monkeypatch):
    # This process's record flusher would write held progress within 0.1 s: here only records.flush() does.
    monkeypatch.setattr(records, "FLUSH_INTERVAL", 3600.0)
    buf = records._buf()
    buf.wake.set()  # the flusher's current wait ends, and its next one is the long one
    time.sleep(0.3)
    try:
        _held_progress_steps(tenv)
    finally:
        monkeypatch.undo()
        buf.wake.set()  # back to its usual pace for the tests after this one


def _held_progress_steps(tenv) -> None:
    from appliance.tasks.context import CHECK_INTERVAL, TaskCancelled, TaskContext

    def row(task_id: str) -> Task:  # as stored now (tenv.task would flush the buffer first)
        return Task.get_by_id(task_id)

    tid = tenv.submit("sample")
    huey = broker.get_queue(tenv.cfg)
    while huey.dequeue() is not None:
        pass
    assert lifecycle.claim(tid, 1, f"{reaper.host_name(tenv.cfg)}:worker:9#1") is not None
    now = [100.0]
    ctx = TaskContext(tid, 1, clock=lambda: now[0], claimed=True)
    ctx.progress(10, "a tenth")  # right after the claim: held
    assert row(tid).progress == 0.0
    records.flush()  # the record flusher writes what is held (every FLUSH_INTERVAL in a worker)
    assert (row(tid).progress, row(tid).progress_message) == (10.0, "a tenth")
    now[0] += CHECK_INTERVAL  # long enough since that write: the next one goes at once
    ctx.progress(20, "a fifth")
    assert row(tid).progress == 20.0
    ctx.progress(25, "a quarter")
    assert ctx.take_held() == (25.0, "a quarter") and ctx.take_held() is None  # the runner's final update takes it
    records.flush()  # and the flusher has nothing left to write
    assert row(tid).progress == 20.0
    Task.update(cancel_requested=True).where(Task.id == tid).execute()
    ctx.progress(30, "held")  # held: the cancel is not seen before the interval is over ...
    assert row(tid).progress == 20.0
    now[0] += CHECK_INTERVAL
    try:
        ctx.progress(40, "two fifths")  # ... and then it is, with this progress written
        raise AssertionError("no TaskCancelled")
    except TaskCancelled:
        pass
    assert (row(tid).progress, row(tid).progress_message) == (40.0, "two fifths")
    records.flush()  # the held 30 % was replaced by the 40 % written at once, not written after it
    assert row(tid).progress == 40.0


def test_a_failing_task_keeps_the_progress_it_held(tenv):
    from appliance.tasks.registry import registry_for, task_type

    def half_then_fail(ctx: Any, data: Any) -> None:
        ctx.progress(50, "half way")  # right after the claim: held, then written before the failure
        raise RuntimeError("broke half way")

    reg = registry_for(tenv.cfg)
    reg.add(task_type("half_then_fail")(half_then_fail))
    try:
        tid = tenv.submit("half_then_fail")
        assert run_next(tenv) == tid
    finally:
        reg._types.pop("half_then_fail")
    t = tenv.task(tid)
    assert (t.status, t.progress, t.progress_message) == ("failed", 50.0, "half way")


def test_progress_reports_a_cancel_request_and_a_lost_attempt(tenv):
    tid = tenv.submit("sample")
    huey = broker.get_queue(tenv.cfg)
    while huey.dequeue() is not None:
        pass
    assert lifecycle.claim(tid, 1, f"{reaper.host_name(tenv.cfg)}:worker:9#1") is not None
    assert lifecycle.set_progress(tid, 1, 10.0, "a tenth") is False and tenv.task(tid).progress == 10.0
    assert lifecycle.set_progress(tid, 2, 30.0, "another attempt's") is False  # stored nowhere, and nothing to cancel
    Task.update(cancel_requested=True).where(Task.id == tid).execute()
    assert lifecycle.set_progress(tid, 1, 20.0, "a fifth") is True
    assert tenv.task(tid).progress == 20.0
    Task.update(status="failed").where(Task.id == tid).execute()  # taken away (a reaper, a forced cancel)
    Task.update(cancel_requested=False).where(Task.id == tid).execute()
    assert lifecycle.set_progress(tid, 1, 40.0, "too late") is True and tenv.task(tid).progress == 20.0


def test_history_and_log_lines_are_flushed_without_the_query_builder(tenv, monkeypatch):
    """The worker's batched writes: multi-row INSERTs whose text is built once, every line durable in order."""
    import peewee as pw

    from appliance.db.models import TaskHistory, TaskLog

    tid = tenv.submit("sample")
    records.flush()
    built: list[str] = []
    real = pw.Insert.__sql__
    monkeypatch.setattr(pw.Insert, "__sql__", lambda self, ctx: built.append("insert") or real(self, ctx))
    for i in range(300):  # more than one statement's worth on SQLite (999 bound values)
        records.add_history(tid, "running", f"step {i}")
        records.add_log(tid, f"line {i}", "warning" if i % 2 else "info")
    records.flush()
    assert built == []
    steps = [h.message for h in TaskHistory.select().where(TaskHistory.task == tid).order_by(TaskHistory.id) if h.status == "running"]
    assert steps == [f"step {i}" for i in range(300)]
    lines = list(TaskLog.select().where(TaskLog.task == tid).order_by(TaskLog.id))
    assert [(r.line, r.level) for r in lines] == [(f"line {i}", "warning" if i % 2 else "info") for i in range(300)]
