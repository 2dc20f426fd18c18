"""The balancer's counters (per-upstream deltas, across an upstream removed and re-added) and its access log."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re

from prometheus_client import CollectorRegistry

from appliance.balancer.stats import AccessLog, Stats, process_log_format
from appliance.balancer.upstreams import UpstreamTable
from appliance.logs import setup_logging

A = "127.0.0.1:9101"
B = "127.0.0.1:9102"


def spec(version: int, *addresses: str) -> dict:
    return {"version": version, "groups": {"api": [{"address": a, "weight": 1, "state": "up"} for a in addresses]}}


def sample(reg: CollectorRegistry, name: str, address: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, {"group": "api", "upstream": address, **labels})


def two_upstreams(make_config) -> tuple[UpstreamTable, CollectorRegistry, Stats]:
    """Upstreams A and B applied (version 1), and Stats recording into a registry of the test's own."""
    upstreams = UpstreamTable(make_config(api={"workers": 1, "base_port": 9101}, monitor={"enabled": False}))
    upstreams.apply(spec(1, A, B))
    prom = CollectorRegistry()
    return upstreams, prom, Stats(registry=prom)


def test_upstream_removed_and_readded_at_same_address_counts_on(make_config) -> None:
    upstreams, prom, stats = two_upstreams(make_config)

    old = upstreams.groups["api"].find(A)
    old.requests, old.failures = 5, 1
    stats.flush(upstreams.groups, upstreams.take_retired())
    assert sample(prom, "appliance_balancer_upstream_requests_total", A) == 5
    assert sample(prom, "appliance_balancer_upstream_failures_total", A) == 1

    # The worker restarts: it leaves the control file, is drained and removed, then comes back.
    upstreams.apply(spec(2, B))
    old.requests = 8  # answered while draining, before the removal
    upstreams.sweep(0.0, 0.0)
    assert upstreams.groups["api"].find(A) is None
    upstreams.apply(spec(3, A, B))
    new = upstreams.groups["api"].find(A)
    assert new is not old and new.requests == 0
    new.requests, new.active = 2, 1

    stats.flush(upstreams.groups, upstreams.take_retired())  # used to raise: a negative counter increment
    assert sample(prom, "appliance_balancer_upstream_requests_total", A) == 8 + 2
    assert sample(prom, "appliance_balancer_upstream_failures_total", A) == 1
    assert sample(prom, "appliance_balancer_upstream_active", A) == 1
    assert sample(prom, "appliance_balancer_upstream_healthy", A, state="healthy") == 1

    # Nothing new: nothing added, and a later increment is counted once.
    stats.flush(upstreams.groups, upstreams.take_retired())
    assert sample(prom, "appliance_balancer_upstream_requests_total", A) == 10
    new.requests = 3
    stats.flush(upstreams.groups, upstreams.take_retired())
    assert sample(prom, "appliance_balancer_upstream_requests_total", A) == 11
    assert json.loads(upstreams.state_path.read_text())["version"] == 3


def test_removed_upstream_gauges_go_to_zero(make_config) -> None:
    upstreams, prom, stats = two_upstreams(make_config)
    gone = upstreams.groups["api"].find(B)
    gone.active = 2
    stats.flush(upstreams.groups, upstreams.take_retired())
    assert sample(prom, "appliance_balancer_upstream_active", B) == 2
    upstreams.apply(spec(2, A))
    gone.active = 0
    gone.requests = 4
    upstreams.sweep(0.0, 0.0)
    stats.flush(upstreams.groups, upstreams.take_retired())
    assert sample(prom, "appliance_balancer_upstream_requests_total", B) == 4
    assert sample(prom, "appliance_balancer_upstream_active", B) == 0
    assert all(sample(prom, "appliance_balancer_upstream_healthy", B, state=s) == 0 for s in ("healthy", "draining"))
    assert upstreams.take_retired() == []


def _read_lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return data.decode().splitlines()


def test_access_log_text_lines_for_people() -> None:
    r, w = os.pipe()
    try:
        access = AccessLog(True, "text", fd=w)
        access.line("rid1", "10.0.0.1", "GET", "/api/x", 200, "127.0.0.1:8101", 0, 57, 0.0012, "7")
        access.line("rid2", "10.0.0.2", "POST", "/auth/login", 401, None, 12, 80, 0.0004, None)
        assert _read_lines(r) == []  # buffered until flushed
        access.flush()
        lines = _read_lines(r)
        assert len(lines) == 2
        assert re.fullmatch(
            rf"\d\d:\d\d:\d\d INFO    balancer\[{os.getpid()}\] GET /api/x 200 1\.2ms client=10\.0\.0\.1 "
            r"upstream=127\.0\.0\.1:8101 in=0 out=57 user=7 \(request rid1\)",
            lines[0],
        ), lines[0]
        assert lines[1].endswith("POST /auth/login 401 0.4ms client=10.0.0.2 upstream=- in=12 out=80 user=- (request rid2)")
        assert not lines[0].startswith("{")
    finally:
        os.close(r)
        os.close(w)


def test_access_log_json_lines() -> None:
    r, w = os.pipe()
    try:
        access = AccessLog(True, "json", fd=w)
        access.line("rid1", "10.0.0.1", "GET", "/api/x", 200, "127.0.0.1:8101", 0, 57, 0.0012, "7")
        access.flush()
        (line,) = _read_lines(r)
        entry = json.loads(line)
        assert entry["logger"] == "appliance.balancer.access" and entry["role"] == "balancer" and entry["level"] == "info"
        assert (entry["request_id"], entry["status"], entry["path"], entry["user_id"]) == ("rid1", 200, "/api/x", "7")
        assert entry["duration_ms"] == 1.2 and entry["time"].endswith("Z")
    finally:
        os.close(r)
        os.close(w)


def test_access_log_follows_the_format_setup_logging_installed(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_LOG_FORMAT", "json")  # setup_logging sets it by default; keep this process's env
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("balancer", "text", "info", stream=io.StringIO())
        assert process_log_format("json") == "text"
        setup_logging("balancer", "json", "info", stream=io.StringIO())
        assert process_log_format("text") == "json"
        for handler in list(root.handlers):
            root.removeHandler(handler)
        assert process_log_format("text") == "text"  # no appliance handler: the config's format
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
