"""Two appliances on one host, each with its own data dir, whose configs differ only in [balancer] listen.

Internal listeners need no port planning: every api worker and monitor binds a loopback port the
kernel picks and announces it to its own supervisor, which hands it to its own balancer. Both
appliances serve /health/ping and an authenticated request through their balancers, /metrics
reaches each one's own monitor, and the second stops cleanly while the first goes on serving.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.supervised import Appliance, Stream, http_json, wait_until

pytestmark = pytest.mark.slow

PASSWORD = "Side-by-side-12345"


def _differing_lines(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a.splitlines(), b.splitlines(), strict=True) if x != y]


def _serves(app: Appliance, name: str) -> None:
    """Ping and an authenticated call, both through the appliance's balancer."""
    status, body = http_json(app.port, "GET", "/health/ping")
    assert status == 200 and body["status"] == "ok", body
    status, body = http_json(app.port, "POST", "/auth/register", {"username": name, "email": f"{name}@example.com", "password": PASSWORD})
    assert status in (200, 201), body
    status, body = http_json(app.port, "POST", "/auth/login", {"username": name, "password": PASSWORD})
    assert status == 200, body
    status, body = http_json(app.port, "GET", "/api/protected", token=body["data"]["access_token"])
    assert status == 200 and body["status"] == "success", body


def _announced(app: Appliance) -> set[str]:
    status, body = http_json(app.port, "GET", "/health/nodes")
    assert status == 200, body
    return {n["info"].get("address") for n in body["data"]["nodes"] if n["role"] in ("api", "monitor") and not n["stale"]} - {None}


def test_two_appliances_run_side_by_side_with_only_the_listen_port_differing(tmp_path):
    first = Appliance(tmp_path / "first", api_workers=2, task_workers=1, monitor=True)
    second = Appliance(tmp_path / "second", api_workers=2, task_workers=1, monitor=True)
    differing = _differing_lines(first.config.read_text(), second.config.read_text())
    assert len(differing) == 1 and all(line.startswith("listen = ") for line in differing[0]), differing
    try:
        first.start()
        second.start()
        name = f"user{time.monotonic_ns() % 10**9}"
        _serves(first, name)
        _serves(second, name)  # its own data dir: the same user name is free there

        mine = {app.port: {*app.addresses("api").values(), *app.addresses("monitor").values()} for app in (first, second)}
        assert all(len(addresses) == 3 for addresses in mine.values()), mine  # 2 api workers and the monitor each
        assert not mine[first.port] & mine[second.port], mine
        for app in (first, second):
            applied = {m["address"] for ms in app.status()["upstreams"].values() for m in ms}
            assert mine[app.port] <= applied  # each balancer routes to its own workers only
            assert not applied & mine[second.port if app is first else first.port]
            # /health/nodes shows where each of its own processes listens (from their next heartbeat).
            assert wait_until(lambda app=app: _announced(app) == mine[app.port], 15), (_announced(app), mine[app.port])

        with Stream(first.port, threads=2) as stream:
            time.sleep(0.3)
            assert second.stop() == 0
            time.sleep(0.5)
        assert stream.failures == [], stream.failures
        assert stream.ok > 10
        assert "every process stopped; goodbye" in second.messages()
        _serves(first, name + "x")
        assert first.status()["healthy"]
    finally:
        second.stop()
        assert first.stop() == 0
