"""The template process (appliance/template.py) under a real `appliance run`: children forked from it serve,
they are the supervisor's own children, kill -9 of the template under a stream of GETs loses no request and
it comes back (children forked from the new one serve), a child's crash leaves it alone, a SIGHUP's new config
reaches the children it forks, a broken operator file fails only its role naming the file, and
`[supervisor] template = false` starts every child with exec as before."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.integration.supervised import Appliance, Stream, http_json, wait_until


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("template"), api_workers=2, task_workers=1, monitor=True)
    app.start()
    yield app
    assert app.stop() == 0


def template_row(app: Appliance) -> dict:
    return next(r for r in app.status()["processes"] if r["role"] == "template")


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_every_child_is_forked_from_the_template_and_is_the_supervisors_child(appliance):
    status = appliance.status()
    rows = [r for r in status["processes"] if r["role"] != "template"]
    assert {r["role"] for r in rows} == {"api", "worker", "monitor", "balancer"}  # the monitor runs the scheduler too
    assert all(r["via"] == "template" and r["state"] == "up" for r in rows), rows
    template = template_row(appliance)
    assert template["state"] == "up" and template["pid"]
    for r in rows:
        # Forked, never exec'd: the command line is the supervisor's; re-parented to it (it is their subreaper).
        assert cmdline(r["pid"]) == cmdline(appliance.proc.pid)
        assert ppid(r["pid"]) == appliance.proc.pid
    assert http_json(appliance.port, "GET", "/health/ping")[0] == 200
    # Each api worker took the app the template built from the inherited config (app.prebuild): shared pages.
    ready = [e for e in appliance.lines() if e.get("role") == "api" and e.get("message") == "api worker ready"]
    assert [e["app"] for e in ready] == ["template", "template"], ready
    assert sorted(e["node_id"].rpartition(":")[2] for e in ready) == ["0", "1"]
    result = appliance.cli("status")
    assert result.returncode == 0 and "\ntemplate " in result.stdout, result.stdout


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[16])  # field 19 of stat: nice


def test_every_child_but_the_balancer_runs_worker_nice_lower_in_each_of_its_threads(appliance):
    base = _nice(appliance.proc.pid)
    rows = [r for r in appliance.status()["processes"] if r["role"] not in ("template",) and r["pid"]]
    for r in rows:
        expected = base if r["role"] == "balancer" else min(base + 5, 19)  # [supervisor] worker_nice = 5
        threads = [int(t) for t in os.listdir(f"/proc/{r['pid']}/task")]
        assert len(threads) > 1 or r["role"] == "balancer"
        assert {_nice(r["pid"], t) for t in threads} == {expected}, r
    assert _nice(template_row(appliance)["pid"]) == base  # it forks the balancer too


@pytest.mark.slow
def test_kill_9_of_the_template_under_gets_loses_no_request(appliance):
    old = template_row(appliance)["pid"]
    children = {r["pid"] for r in appliance.status()["processes"] if r["role"] != "template" and r["pid"]}
    with Stream(appliance.port, threads=3) as stream:
        time.sleep(0.3)
        os.kill(old, signal.SIGKILL)
        back = wait_until(lambda: (row := template_row(appliance))["state"] == "up" and row["pid"] not in (None, old), 30)
        assert back, template_row(appliance)
        time.sleep(0.5)
        # The children never noticed: not one was restarted.
        assert {r["pid"] for r in appliance.status()["processes"] if r["role"] != "template" and r["pid"]} == children
        # A child that dies now is forked from the new template, and serves.
        slot, pid = next(iter(appliance.pids("api").items()))
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: appliance.pids("api").get(slot) not in (None, pid), 15)
        time.sleep(0.5)
    assert stream.failures == [], stream.failures
    assert stream.ok > 20 and stream.refused == 0
    line = appliance.wait_for(f"the template (pid {old}) was killed by SIGKILL")
    assert "children keep serving" in line
    new_api = next(r for r in appliance.status()["processes"] if r["role"] == "api" and r["slot"] == slot)
    assert new_api["via"] == "template" and "_template" in cmdline(new_api["pid"])  # the new template is exec'd
    assert ppid(new_api["pid"]) == appliance.proc.pid


@pytest.mark.slow
def test_a_childs_crash_leaves_the_template_alone(appliance):
    template = template_row(appliance)
    slot, pid = next(iter(appliance.pids("worker").items()))
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: appliance.pids("worker").get(slot) not in (None, pid), 15)
    after = template_row(appliance)
    assert (after["pid"], after["restarts"], after["state"]) == (template["pid"], template["restarts"], "up")


@pytest.mark.slow
def test_a_sighup_config_reaches_the_children_the_template_forks(appliance):
    good = appliance.config.read_text()
    done_before = appliance.count("reload done")
    assert "threads = 4" in good
    try:
        appliance.config.write_text(good.replace("threads = 4", "threads = 3"))
        appliance.signal(signal.SIGHUP)
        appliance.wait_for("reload done", timeout=60, after=done_before)
    finally:
        appliance.config.write_text(good)
    ready = [e for e in appliance.lines() if e.get("role") == "api" and e.get("message") == "api worker ready"]
    assert ready[-1]["threads"] == 3 and ready[-2]["threads"] == 3
    assert ready[-1]["app"] == ready[-2]["app"] == "own"  # the template's app was built from the old config
    assert all(r["via"] == "template" for r in appliance.status()["processes"] if r["role"] == "api")


@pytest.mark.slow
def test_a_broken_operator_file_fails_its_role_naming_the_file(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "broken.py").write_text("import nonexistent_module_xyz\n")
    app = Appliance(tmp_path, api_workers=1, task_workers=1)
    app.sections["api"]["apps_dir"] = str(apps)
    write_config(app.data, **app.sections)
    app.start(wait=False)
    try:
        assert app.proc.wait(60) == 1
        text = app.log.read_text()
        assert str(apps / "broken.py") in text and "nonexistent_module_xyz" in text
        assert "api[0] could not boot" in text
        assert "started api[0] (pid" in text and "forked from the template" in text
    finally:
        app.stop()


HELLO_APP = """
from appliance.api import ok, operation


class Hello:
    @operation("says hello", response=dict)
    def on_get(self, req, resp):
        ok(resp, {"hello": ctx_of_app.node_id})


def setup(app, ctx):
    global ctx_of_app
    ctx_of_app = ctx
    app.add_route("/health/hello", Hello())  # under a public prefix of the balancer
"""


@pytest.mark.slow
def test_an_operator_app_is_loaded_into_the_templates_app_by_each_worker(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "hello.py").write_text(HELLO_APP)
    app = Appliance(tmp_path, api_workers=2, task_workers=1)
    app.sections["api"]["apps_dir"] = str(apps)
    write_config(app.data, **app.sections)
    app.start()
    try:
        seen = set()
        for _ in range(20):
            status, body = http_json(app.port, "GET", "/health/hello")
            assert status == 200, body
            seen.add(body["data"]["hello"].rpartition(":")[2])
        assert seen == {"0", "1"}  # each worker's own context, though the app was built once, in the template
        ready = [e for e in app.lines() if e.get("role") == "api" and e.get("message") == "api worker ready"]
        assert [e["app"] for e in ready] == ["template", "template"], ready
    finally:
        assert app.stop() == 0


@pytest.mark.slow
def test_template_off_starts_every_child_with_exec(tmp_path):
    app = Appliance(tmp_path, api_workers=1, task_workers=1, supervisor={"template": False})
    app.start()
    try:
        rows = app.status()["processes"]
        assert all(r["role"] != "template" for r in rows)
        assert all(r["via"] == "exec" for r in rows)
        assert all("_child" in cmdline(r["pid"]) for r in rows if r["pid"])
        assert http_json(app.port, "GET", "/health/ping")[0] == 200
    finally:
        assert app.stop() == 0
