"""/health/status and /health/nodes read the monitor's last sample of the host (appliance/hostsample.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import hostsample
from tests.api_support import client_for
from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, api_workers=1, task_workers=1, monitor=True)
    app.start()
    yield app
    app.stop()


def test_health_endpoints_show_what_the_monitor_sampled(appliance: Appliance) -> None:
    body = wait_until(lambda: (r := http_json(appliance.port, "GET", "/health/status"))[1]["system"].get("sampled_at") and r[1], timeout=20)
    assert body, "the monitor's sample never reached /health/status"
    system = body["system"]
    assert system["cpu"]["count"] >= 1 and 0 <= system["memory"]["percent"] <= 100 and system["disk"]["total"] > 0

    def api_node() -> dict | None:
        status, nodes = http_json(appliance.port, "GET", "/health/nodes")
        node = next(n for n in nodes["data"]["nodes"] if n["role"] == "api")
        return node if status == 200 and node["info"].get("state") == "up" else None

    api = wait_until(api_node, timeout=20)  # the first samples may predate the worker's start
    assert api, "the sampled state never reached /health/nodes"
    assert api["info"]["restarts"] == 0 and api["info"]["pss"] > 0


def test_without_a_fresh_sample_the_worker_measures_itself(make_config) -> None:
    cfg = make_config()
    client = client_for(cfg)
    assert client.simulate_get("/health/status").json["system"]["sampled_at"] is None
    host = {
        "cpu": 12.5,
        "cpus": 2,
        "memory": {"total": 8, "available": 4, "percent": 50.0},
        "disk": {"total": 10, "free": 5, "used": 5, "percent": 50.0},
    }
    hostsample.write(cfg, {"t": time.time(), "host": host, "processes": []})
    system = client.simulate_get("/health/status").json["system"]
    assert system["sampled_at"] is not None and system["cpu"] == {"percent": 12.5, "count": 2} and system["memory"]["percent"] == 50.0
    hostsample.write(cfg, {"t": time.time() - 3600, "host": host, "processes": []})  # a monitor that stopped an hour ago
    assert client.simulate_get("/health/status").json["system"]["sampled_at"] is None
