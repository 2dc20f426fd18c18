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


class _Waiter:
    """A waiting request whose pick finds no slot it may use (a retry whose free upstream it already tried)."""

    def __init__(self, group: Group):
        self.group, self.queued, self.woken = group, True, 0
        self.client = self
        self.ex = self

    def pick_and_send(self) -> None:
        self.woken += 1
        assert self.woken < 5, "woken again and again in one call"
        self.queued = True
        self.group.waiting.append(self)  # back to the end of the line, as Exchange.wait_for_slot does


def test_wake_group_looks_at_each_waiter_once_per_call():
    from appliance.balancer.exchange import wake_group

    group = Group("api", [Upstream("127.0.0.1:1"), Upstream("127.0.0.1:2")])
    group.upstreams[0].active = 1  # the other has room
    first, second = _Waiter(group), _Waiter(group)
    group.waiting.extend([first, second])
    wake_group(group, 1)
    assert (first.woken, second.woken) == (1, 1)
    assert list(group.waiting) == [first, second] and not group.waking
    first.queued = False  # its client left: skipped, and dropped from the line
    wake_group(group, 1)
    assert (first.woken, second.woken) == (1, 2) and list(group.waiting) == [second]
