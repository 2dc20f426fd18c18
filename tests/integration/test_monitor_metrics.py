"""/metrics of a real appliance: promtool accepts it, counters move with traffic, random paths add no series."""

from __future__ import annotations

import http.client
import re
import secrets
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow

PROMTOOL = shutil.which("promtool")


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, api_workers=2, task_workers=1, monitor=True)
    app.start()
    r = app.cli("user", "create", "alice", "--password-stdin", stdin="Alice-pass-123\n")
    assert r.returncode == 0, r.stderr
    yield app
    app.stop()


def _scrape(app: Appliance) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.monitor_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _get_many(port: int, paths: list[str], token: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        for path in paths:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 404), (path, resp.status)
    finally:
        conn.close()


def test_metrics_pass_promtool_move_with_traffic_and_stay_bounded(appliance: Appliance) -> None:
    if PROMTOOL is None:
        pytest.fail("promtool (Debian package prometheus) is needed; .ci/services.sh installs it")
    status, body = http_json(appliance.port, "POST", "/auth/login", {"username": "alice", "password": "Alice-pass-123"})
    assert status == 200, body
    token = body["data"]["access_token"]
    protected = 'appliance_http_requests_total{code="200",method="GET",route="/api/protected"}'
    before = _value(_scrape(appliance), protected)
    _get_many(appliance.port, ["/api/protected"] * 25, token)
    status, body = http_json(appliance.port, "POST", "/tasks/submit", {"task_type": "sample", "data": {}}, token=token)
    assert status == 200, body
    done = 'appliance_tasks_total{status="succeeded",type="sample"}'
    families = (
        "appliance_http_request_duration_seconds_bucket",
        "appliance_upstream_up",
        "appliance_upstream_in_flight",
        "appliance_queue_depth",
        "appliance_process_cpu_seconds_total",
        "appliance_process_resident_memory_bytes",
        "appliance_alerts_firing",
    )

    def moved(t: str) -> bool:
        # The counters moved, and the monitor's sampler has taken a sample since the appliance came up
        # (the process and queue families come from its latest sample, one every sample_interval).
        return _value(t, protected) >= before + 25 and _value(t, done) >= 1 and all(re.search(rf"^{f}[{{ ]", t, re.M) for f in families)

    text = wait_until(lambda: (t := _scrape(appliance)) and moved(t) and t, timeout=30)
    assert text, "the request and task counters did not move, or a family never appeared: " + _scrape(appliance)[-3000:]
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    # Unknown paths: the first ones make the "unmatched" series; a thousand more add none.
    # (The balancer flushes its counts once a second: wait for its 404 count to include them before each snapshot.)
    not_found = 'appliance_balancer_requests_total{status="404"}'
    _get_many(appliance.port, [f"/nowhere/{secrets.token_hex(4)}" for _ in range(5)], token)
    text = wait_until(lambda: (t := _scrape(appliance)) and _value(t, not_found) >= 5 and t, timeout=15)
    assert text
    known = _series(text)
    _get_many(appliance.port, [f"/{secrets.token_hex(6)}/{secrets.token_hex(3)}?q={i}" for i in range(1000)], token)
    text = wait_until(lambda: (t := _scrape(appliance)) and _value(t, not_found) >= 1005 and t, timeout=15)
    assert text
    after = _series(text)
    assert after - known == set(), sorted(after - known)[:20]
    assert 'appliance_http_requests_total{code="404",method="GET",route="unmatched"}' in after
