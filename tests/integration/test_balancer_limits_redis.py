"""The Redis rate limiter against the real Redis server: shared limits, atomicity, expiry, fail-open."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from appliance.balancer import limiter as limiter_module
from appliance.balancer.limiter import RateLimiter, RedisRateLimiter
from appliance.config import RateLimitZone

pytestmark = pytest.mark.redis


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def zone(name: str = "z", prefixes: list[str] | None = None, **kw) -> RateLimitZone:
    return RateLimitZone(name=name, prefixes=prefixes or ["/"], **kw)


@pytest.fixture
def prefix(redis_server, request) -> str:
    # one prefix per test (inside the session's), so tests never see each other's buckets
    return f"{redis_server['prefix']}{request.node.name}:"


def run(coro):
    return asyncio.run(coro)


async def admitted(rl, n: int, method: str = "GET", path: str = "/x", address: str = "10.0.0.1", user: str | None = None) -> int:
    count = 0
    for _ in range(n):
        d = await rl.decide(method, path, address, user)
        count += d.allowed
    return count


def test_same_numbers_as_the_memory_limiter(redis_server, prefix):
    zones = [zone(rate="5/m", burst=5, nodelay=False)]

    async def main():
        clock = Clock()
        rl = RedisRateLimiter(zones, redis_server["url"], prefix, clock=clock)
        mem = RateLimiter(zones, 100, clock=clock)
        try:
            for step in [0, 0, 0, 0, 0, 0, 0, 0, 11.9, 0.1, 0, 24, 0, 0, 0, 3600, 0]:
                clock.t += step
                got, want = await rl.decide("POST", "/x", "1.2.3.4", None), mem.decide("POST", "/x", "1.2.3.4", None)
                assert (got.allowed, got.retry_after, got.remaining, got.reset, got.limit) == (
                    want.allowed,
                    want.retry_after,
                    want.remaining,
                    want.reset,
                    want.limit,
                ), step
                assert got.delay == pytest.approx(want.delay)
        finally:
            await rl.close()

    run(main())


def test_two_limiters_share_one_limit(redis_server, prefix):
    zones = [zone(rate="10/s", burst=20)]

    async def main():
        clock = Clock()
        a = RedisRateLimiter(zones, redis_server["url"], prefix, clock=clock)
        b = RedisRateLimiter(zones, redis_server["url"], prefix, clock=clock)
        try:
            assert await admitted(a, 15) == 15
            assert await admitted(b, 15) == 6
            assert await admitted(a, 5) == 0
            clock.t += 1.0
            assert await admitted(b, 5) + await admitted(a, 10) == 10
        finally:
            await a.close()
            await b.close()

    run(main())


def test_concurrent_decisions_are_atomic(redis_server, prefix):
    zones = [zone(rate="1/m", burst=10)]

    async def main():
        limiters = [RedisRateLimiter(zones, redis_server["url"], prefix) for _ in range(2)]  # server clock
        try:
            results = await asyncio.gather(*(limiters[i % 2].decide("GET", "/x", "1.1.1.1", None) for i in range(50)))
            assert sum(d.allowed for d in results) == 11
            assert sorted(d.remaining for d in results if d.allowed) == list(range(11))
        finally:
            for rl in limiters:
                await rl.close()

    run(main())


def test_refusal_in_one_zone_charges_none_and_keys_expire(redis_server, prefix):
    login = zone("login", ["/auth/login"], key="address", rate="1/m", burst=5)
    api = zone("api", ["/auth/"], key="user", rate="10/s", burst=1)

    async def main():
        clock = Clock()
        rl = RedisRateLimiter([login, api], redis_server["url"], prefix, clock=clock)
        try:
            assert await admitted(rl, 12, "POST", "/auth/login", "a", "u") == 2
            assert await admitted(rl, 5, "POST", "/auth/login", "a", "v") == 2
            assert await admitted(rl, 5, "POST", "/auth/login", "a", "w") == 2
            assert await admitted(rl, 5, "POST", "/auth/login", "a", "x") == 0
        finally:
            await rl.close()

    run(main())
    client = redis.Redis.from_url(redis_server["url"])
    try:
        keys = sorted(k.decode() for k in client.keys(prefix + "*"))
        assert keys == [prefix + "rl:api:u:" + u for u in "uvwx"[:3]] + [prefix + "rl:login:a:a"]
        # api buckets drain in well under a second (+1 s slack); login's in minutes
        ttl_api = client.pttl(prefix + "rl:api:u:u")
        ttl_login = client.pttl(prefix + "rl:login:a:a")
        assert 0 < ttl_api <= 1300
        assert 300_000 < ttl_login <= 362_000
    finally:
        client.close()


def test_unreachable_redis_fails_open_with_one_warning(caplog):
    async def main():
        rl = RedisRateLimiter([zone(rate="1/m", burst=0)], "redis://127.0.0.1:1/0", "x:", timeout=0.2)
        rl.FAILURE_BACKOFF = 0.0  # ask (and fail) every time, to show the warning is still rate-limited
        try:
            return [await rl.decide("GET", "/x", "a", None) for _ in range(5)]
        finally:
            await rl.close()

    with caplog.at_level(logging.WARNING, logger="appliance.balancer.limiter"):
        assert run(main()) == [None] * 5
    warnings = [r for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) == 1


def test_one_pipeline_answers_each_decision_for_its_own_key(redis_server, prefix):
    zones = [zone(rate="1/m", burst=3, key="user")]

    async def main():
        clock = Clock()
        rl = RedisRateLimiter(zones, redis_server["url"], prefix, clock=clock)
        try:
            for user, used in (("a", 0), ("b", 1), ("c", 3), ("d", 4)):
                for _ in range(used):
                    await rl.decide("GET", "/x", "1.1.1.1", user)
            results = await asyncio.gather(*(rl.decide("GET", "/x", "1.1.1.1", u) for u in "abcd"))
            assert [(d.allowed, d.remaining) for d in results] == [(True, 3), (True, 2), (True, 0), (False, 0)]
        finally:
            await rl.close()

    run(main())


@pytest.mark.parametrize("concurrent", [1, 5])
def test_script_missing_from_redis_is_loaded_once(redis_server, prefix, monkeypatch, concurrent):
    import secrets

    # a script text Redis has never seen, as after a restart or SCRIPT FLUSH
    monkeypatch.setattr(limiter_module, "_LUA", limiter_module._LUA + f"\n-- {secrets.token_hex(8)}\n")

    async def main():
        rl = RedisRateLimiter([zone(rate="1/m", burst=0)], redis_server["url"], prefix)
        try:
            assert await rl._client.script_exists(rl._sha) == [False]
            results = await asyncio.gather(*(rl.decide("GET", "/x", f"k{i}", None) for i in range(concurrent)))
            assert all(d is not None and d.allowed for d in results)
            assert await rl._client.script_exists(rl._sha) == [True]
            assert not (await rl.decide("GET", "/x", "k0", None)).allowed
        finally:
            await rl.close()

    run(main())
