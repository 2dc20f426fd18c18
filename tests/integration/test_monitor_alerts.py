"""Alerts in a real appliance: a threshold crossed fires an alert that is logged once, counted in /metrics and shown to the page."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.integration.supervised import Appliance, wait_until
from tests.integration.test_status_page import ADMIN, ADMIN_PW, Browser

pytestmark = pytest.mark.slow


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, api_workers=1, task_workers=0, monitor=True)
    # A threshold this disk always crosses (free < 99.99 %) and no hold: the alert fires at the first sample.
    # Every other alert off, so the busy CI host's cpu cannot add one.
    off = dict.fromkeys(("cpu_percent", "memory_percent", "error_ratio", "p99_ms", "queue_age_seconds", "login_failures_per_min"), 0.0)
    alerts = {**off, "process_failed": False, "store_unreachable": False, "disk_free_percent": 99.99, "hold_seconds": 0.0}
    app.sections["monitor"] = {**app.sections["monitor"], "sample_interval": 0.5, "alerts": alerts}
    app.config = write_config(app.data, **app.sections)
    app.start()
    r = app.cli("user", "create", ADMIN, "--admin", "--password-stdin", stdin=ADMIN_PW + "\n")
    assert r.returncode == 0, r.stderr
    yield app
    app.stop()


def _metrics(app: Appliance) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.monitor_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_a_crossed_threshold_fires_one_alert_logged_counted_and_shown(appliance: Appliance) -> None:
    b = Browser(appliance.port)
    assert b.login(ADMIN, ADMIN_PW)[0] == 303

    def firing() -> list:
        status, _, text = b.request("GET", "/status/api/snapshot")
        return status == 200 and json.loads(text)["data"].get("alerts", {}).get("firing")

    alerts = wait_until(firing, timeout=30)
    assert alerts and [a["alert"] for a in alerts] == ["disk_free"]
    assert alerts[0]["threshold"] == 99.99 and alerts[0]["value"] < 99.99
    overview = json.loads(b.request("GET", "/status/api/snapshot")[2])["data"]["alerts"]
    assert overview["recent"][0]["state"] == "firing"
    text = wait_until(
        lambda: (m := _metrics(appliance)) and 'appliance_alerts_total{alert="disk_free",state="firing"} 1.0' in m and m, timeout=10
    )
    assert text and "appliance_alerts_firing 1.0" in text
    lines = [e for e in appliance.lines() if e.get("logger") == "appliance.alerts"]
    assert len(lines) == 1, lines  # samples keep coming; the alert is logged once
    assert lines[0]["alert"] == "disk_free" and lines[0]["state"] == "firing" and lines[0]["role"] == "monitor"
