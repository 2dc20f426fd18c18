"""The balancer's counters: per-upstream deltas into prometheus, across an upstream removed and re-added."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from appliance.balancer.stats import Stats
from appliance.balancer.upstreams import Registry

A = "127.0.0.1:9101"
B = "127.0.0.1:9102"


def spec(version: int, *addresses: str) -> dict:
    return {"version": version, "groups": {"api": [{"address": a, "weight": 1, "state": "up"} for a in addresses]}}


def sample(reg: CollectorRegistry, name: str, address: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, {"group": "api", "upstream": address, **labels})


def test_upstream_removed_and_readded_at_same_address_counts_on(make_config) -> None:
    cfg = make_config(api={"workers": 1, "base_port": 9101}, monitor={"enabled": False})
    upstreams = Registry(cfg)
    upstreams.apply(spec(1, A, B))
    prom = CollectorRegistry()
    stats = Stats(registry=prom)

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
    cfg = make_config(api={"workers": 1, "base_port": 9101}, monitor={"enabled": False})
    upstreams = Registry(cfg)
    upstreams.apply(spec(1, A, B))
    prom = CollectorRegistry()
    stats = Stats(registry=prom)
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
