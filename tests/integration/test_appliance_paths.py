"""The whole request and task path through `appliance run`, on SQLite and on PostgreSQL + Redis.

A client talks only to the balancer: it registers, logs in, calls protected
routes, submits a task that a real task worker runs, reads its status and logs,
and reads /metrics, which the balancer routes to the monitor (admins only).
"""

from __future__ import annotations

import http.client
import time

import pytest

from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "Admin-pass-12345"
USER_PASSWORD = "User-pass-12345"


def _get_raw(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def appliance(request, tmp_path):
    sections = {}
    if request.param != "sqlite":
        redis = request.getfixturevalue("redis_server")
        sections = {"database": {"url": request.getfixturevalue("pg_url")}, "redis": {"url": redis["url"], "key_prefix": redis["prefix"]}}
    app = Appliance(tmp_path, api_workers=2, task_workers=1, monitor=True, **sections)
    app.admin = f"root{time.monotonic_ns() % 10**9}"  # the PostgreSQL database is shared by the session
    try:
        app.start()
        created = app.cli("user", "create", app.admin, "--admin", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
        assert created.returncode == 0, created.stderr
        yield app
    finally:
        assert app.stop() == 0


def test_request_and_task_path_through_the_balancer(appliance):
    port = appliance.port
    name = f"user{time.monotonic_ns() % 10**9}"
    status, body = http_json(port, "POST", "/auth/register", {"username": name, "email": f"{name}@example.com", "password": USER_PASSWORD})
    assert status in (200, 201), body
    status, body = http_json(port, "POST", "/auth/login", {"username": name, "password": USER_PASSWORD})
    assert status == 200, body
    token = body["data"]["access_token"]

    status, body = http_json(port, "GET", "/api/protected")
    assert status == 401 and body["status"] == "error"
    status, body = http_json(port, "GET", "/api/protected", token=token)
    assert status == 200 and body["data"]["user"]["username"] == name

    status, body = http_json(port, "POST", "/tasks/submit", {"task_type": "sample", "data": {"message": "hi"}, "priority": 2}, token=token)
    assert status in (200, 201, 202), body
    task_id = body["data"]["task_id"]

    def finished():
        code, doc = http_json(port, "GET", f"/tasks/status/{task_id}", token=token)
        return doc["data"] if code == 200 and doc["data"]["status"] in ("succeeded", "failed") else None

    task = wait_until(finished, timeout=30)
    assert task is not None, "the task did not finish within 30 s"
    assert task["status"] == "succeeded"

    # History rows are written in batches (about 0.1 s behind the task row): wait for the final one.
    def history():
        code, doc = http_json(port, "GET", f"/tasks/status/{task_id}", token=token)
        statuses = [h["status"] for h in doc["data"]["history"]]
        return statuses if statuses[-1] == "succeeded" else None

    assert wait_until(history, timeout=5) == ["queued", "running", "succeeded"]
    assert task["execution"]["worker_id"]

    status, body = http_json(port, "GET", f"/tasks/logs/{task_id}", token=token)
    assert status == 200

    # Another user never sees it.
    status, body = http_json(port, "POST", "/auth/login", {"username": appliance.admin, "password": ADMIN_PASSWORD})
    admin = body["data"]["access_token"]
    status, body = http_json(port, "GET", f"/tasks/status/{task_id}", token=admin)
    assert status == 200  # an admin sees every task


def test_metrics_are_served_by_the_monitor_to_admins_only(appliance):
    port = appliance.port
    status, _ = _get_raw(port, "/metrics")
    assert status == 401
    name = f"plain{time.monotonic_ns() % 10**9}"
    http_json(port, "POST", "/auth/register", {"username": name, "email": f"{name}@example.com", "password": USER_PASSWORD})
    _, body = http_json(port, "POST", "/auth/login", {"username": name, "password": USER_PASSWORD})
    status, raw = _get_raw(port, "/metrics", body["data"]["access_token"])
    assert status == 403 and b'"status":"error"' in raw
    _, body = http_json(port, "POST", "/auth/login", {"username": appliance.admin, "password": ADMIN_PASSWORD})
    admin = body["data"]["access_token"]
    for _ in range(3):
        _get_raw(port, "/api/status")
    status, raw = _get_raw(port, "/metrics", admin)
    assert status == 200
    text = raw.decode()
    # One exposition with the balancer's and the API workers' series, from every process.
    assert "appliance_balancer" in text
    assert "appliance_api" in text or "appliance_http" in text
