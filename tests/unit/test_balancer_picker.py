"""Least-connection picking (ties, weights, down upstreams) and the health transition table, with time as a parameter."""

from __future__ import annotations

from collections import Counter

from appliance.balancer.picker import Group, Upstream
from appliance.balancer.upstream_state import DRAINING, EJECTED, HEALTHY, UNHEALTHY, Health


def group(*weights: int) -> Group:
    return Group("api", [Upstream(f"127.0.0.1:{8100 + i}", w) for i, w in enumerate(weights)])


def test_sequential_requests_spread_evenly() -> None:
    g = group(1, 1, 1)
    counts = Counter(g.pick().address for _ in range(100))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_least_connections_wins_over_rotation() -> None:
    g = group(1, 1, 1)
    a, b, c = g.upstreams
    a.active, b.active, c.active = 3, 0, 1
    assert g.pick() is b
    b.active = 5
    assert g.pick() is c


def test_weights_share_load_and_ties() -> None:
    g = group(2, 1)
    counts = Counter(g.pick().address for _ in range(300))
    assert counts["127.0.0.1:8100"] == 200 and counts["127.0.0.1:8101"] == 100
    heavy, light = g.upstreams
    heavy.active, light.active = 2, 1  # equal load per weight: the tie-break decides
    assert g.pick() in (heavy, light)
    heavy.active = 3
    assert g.pick() is light


def test_down_and_excluded_upstreams_get_nothing() -> None:
    g = group(1, 1, 1)
    a, b, c = g.upstreams
    a.health.state = UNHEALTHY
    c.health.state = DRAINING
    assert {g.pick().address for _ in range(10)} == {b.address}
    assert g.pick(exclude={b}) is None
    b.health.state = EJECTED
    assert g.pick() is None and not g.any_up()


def test_newcomer_starts_level() -> None:
    g = group(1, 1)
    for _ in range(50):
        g.pick()
    g.add(Upstream("127.0.0.1:9000"))
    counts = Counter(g.pick().address for _ in range(30))
    assert counts["127.0.0.1:9000"] <= 11


def test_active_checks_rise_and_fall() -> None:
    h = Health(rise=2, fall=3)
    assert not h.check_result(False, 0) and not h.check_result(False, 1)
    assert h.check_result(False, 2) and h.state == UNHEALTHY
    assert not h.check_result(True, 3) and h.state == UNHEALTHY
    assert h.check_result(True, 4) and h.state == HEALTHY


def test_passive_failures_eject_for_fail_timeout() -> None:
    h = Health(max_fails=3, fail_timeout=10)
    assert not h.passive_failure(0) and not h.passive_failure(5)
    assert not h.passive_failure(11)  # the first failure is out of the window
    assert h.passive_failure(12) and h.state == EJECTED
    assert not h.tick(21.9) and h.tick(22) and h.state == HEALTHY
    assert not h.passive_failure(23)  # the window starts afresh after coming back


def test_drain_table() -> None:
    h = Health()
    changes = []
    h.on_change = lambda old, new: changes.append((old, new))
    assert h.drain() and h.state == DRAINING
    assert not h.check_result(True, 0) and not h.check_result(True, 1) and h.state == DRAINING
    assert not h.passive_failure(2) or h.state == DRAINING
    assert h.undrain() and h.state == HEALTHY
    assert changes == [(HEALTHY, DRAINING), (DRAINING, HEALTHY)]
