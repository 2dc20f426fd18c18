"""The rate-limit buckets the balancer processes of one host share (shared_buckets.py): the same verdicts as
the in-memory limiter, one limit across processes (real processes on one real file), eviction, and
limiter.build choosing it only for several balancer processes without Redis."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.balancer import limiter
from appliance.balancer.limiter import RateLimiter
from appliance.balancer.shared_buckets import SharedRateLimiter, slots_for
from appliance.config import RateLimitZone

T0 = 1000.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def zone(name: str = "z", prefixes: list[str] | None = None, **kw) -> RateLimitZone:
    return RateLimitZone(name=name, prefixes=prefixes or ["/"], **kw)


def test_two_limiters_on_one_file_share_one_bucket(tmp_path: Path):
    zones = [zone(rate="10/s", burst=4, nodelay=True, key="user")]
    clock = Clock()
    a = SharedRateLimiter(zones, tmp_path / "b", clock=clock)
    b = SharedRateLimiter(zones, tmp_path / "b", clock=clock)
    verdicts = [(a if i % 2 else b).decide("GET", "/x", "10.0.0.1", "alice").allowed for i in range(10)]
    assert verdicts == [True] * 5 + [False] * 5  # burst + 1 for the host, not per process
    clock.t += 0.1  # one request drains at 10/s
    assert a.decide("GET", "/x", "10.0.0.1", "alice").allowed
    assert not b.decide("GET", "/x", "10.0.0.1", "alice").allowed
    assert b.decide("GET", "/x", "10.0.0.1", "bob").allowed  # another key, another bucket


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.5), st.sampled_from(["/api/a", "/login", "/other"]), st.sampled_from(["u1", "u2"])),
        max_size=60,
    )
)
def test_same_verdicts_as_the_in_memory_limiter(tmp_path_factory, steps):
    zones = [
        zone("api", ["/api/"], rate="5/s", burst=3, key="user"),
        zone("login", ["/login"], rate="2/s", burst=1, nodelay=True, key="address"),
        zone("all", ["/"], rate="20/s", burst=5, nodelay=True, key="user"),
    ]
    clock = Clock()
    memory = RateLimiter(zones, 1000, clock=clock)
    shared = SharedRateLimiter(zones, tmp_path_factory.mktemp("sb") / "b", clock=clock)
    for dt, path, user in steps:
        clock.t += dt
        want, got = memory.decide("GET", path, "10.0.0.9", user), shared.decide("GET", path, "10.0.0.9", user)
        assert (got.allowed, got.zone, got.remaining, got.retry_after, round(got.delay, 6)) == (
            want.allowed,
            want.zone,
            want.remaining,
            want.retry_after,
            round(want.delay, 6),
        )


def _hammer(path: str, n: int, start, out) -> None:
    zones = [zone(rate="1/m", burst=1999, nodelay=True, key="user")]
    rl = SharedRateLimiter(zones, Path(path), clock=lambda: T0)  # a frozen clock: nothing drains
    start.wait(30)
    out.put(sum(rl.decide("GET", "/x", "10.0.0.1", "alice").allowed for _ in range(n)))


def test_concurrent_processes_never_over_admit(tmp_path: Path):
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / "b"), 2000, start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    # burst + 1, exactly, over 6,000 decisions racing from the same instant (without the lock some
    # read-check-charge sequences interleave and admit more)
    assert sum(admitted) == 2000, admitted


def test_a_full_neighbourhood_reuses_drained_then_oldest_slots(tmp_path: Path):
    clock = Clock()
    rl = SharedRateLimiter([zone(rate="10/s", burst=0, nodelay=True, key="address")], tmp_path / "b", max_keys=100, clock=clock)
    assert rl.store.slots == slots_for(100) == 1024
    for i in range(5000):  # far more keys than slots: every decision finds a slot, none fails
        clock.t += 0.001
        assert rl.decide("GET", "/", f"10.1.{i // 256}.{i % 256}", None).allowed
    # a key just refused stays tracked while it is recent
    assert not rl.decide("GET", "/", "10.1.19.135", None).allowed


def test_build_picks_the_shared_store_only_for_several_balancers_without_redis(make_config):
    zones = [{"name": "z", "prefixes": ["/"], "rate": "1/s"}]
    one = make_config(rate_limits={"zones": zones}, balancer={"processes": 1})
    two = make_config(rate_limits={"zones": zones}, balancer={"processes": 2})
    assert type(limiter.build(one)) is RateLimiter
    shared = limiter.build(two)
    assert type(shared) is SharedRateLimiter
    assert shared.store.map.size() > 0 and (two.data_dir / "run" / "rate-limits.buckets").exists()
    shared.close()
    # With Redis the limit is already shared (by every host, too): Redis wins.
    clustered = make_config(rate_limits={"zones": zones}, balancer={"processes": 2}, redis={"url": "redis://127.0.0.1:1/0"})
    assert type(limiter.build(clustered)) is limiter.RedisRateLimiter
