"""A process restarted on a port the kernel picks is found again: the supervisor learns it, the balancer routes to it.

With one api worker and the monitor, nothing else could answer for them: after kill -9 each comes
back on a new loopback port, and requests through the balancer (/health/ping to the api group,
/status to the monitor group) reach the new process.
"""

from __future__ import annotations

import http.client
import os
import signal

import pytest

from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow


def _status_code(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _applied(app: Appliance, group: str) -> set[str]:
    ups = app.status().get("upstreams") or {}
    return {m["address"] for m in ups.get(group, []) if m.get("state") != "draining"}


@pytest.mark.parametrize(("role", "group", "path"), [("api", "api", "/health/ping"), ("monitor", "monitor", "/status")])
def test_a_killed_listener_comes_back_on_a_new_port_and_the_balancer_follows(tmp_path, role, group, path):
    app = Appliance(tmp_path, api_workers=1, task_workers=0, monitor=True)
    app.start()
    try:
        expected = _status_code(app.port, path)
        assert expected < 500
        (old_pid,) = app.pids(role).values()
        (old_address,) = app.addresses(role).values()
        assert old_address in _applied(app, group)

        os.kill(old_pid, signal.SIGKILL)
        new = wait_until(lambda: app.pids(role) and set(app.pids(role).values()) != {old_pid} and app.addresses(role), 30)
        assert new, "the killed process was not restarted"
        (new_address,) = app.addresses(role).values()
        assert new_address != old_address
        assert wait_until(lambda: _applied(app, group) == {new_address}, 10), _applied(app, group)
        assert _status_code(app.port, path) == expected  # answered by the new process: the only one of its group
        if role == "api":
            status, body = http_json(app.port, "GET", "/health/ping")
            assert status == 200 and body["status"] == "ok"
        assert f"{role}[0] listens on {new_address}" in app.messages()
    finally:
        assert app.stop() == 0
