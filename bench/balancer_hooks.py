"""Micro-benchmark of the balancer's per-request hooks (not run by the tests).

    .venv/bin/python bench/balancer_hooks.py [--n 200000]

Prints microseconds per call of RateLimiter.decide (one zone, two zones, many
keys, a refusal) and of the auth hook's check for a cached JWT, a public path
and a missing token; the Redis limiter too when Redis answers on
APPLIANCE_TEST_REDIS_URL (a round trip, so hundreds of µs one at a time; the
decisions of one loop turn share a pipeline). --uvloop runs the async parts on
uvloop. No database is needed: the revocation mirror is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import tokens
from appliance.balancer import authhook, limiter
from appliance.config import RateLimitZone, load_config
from appliance.revocation import RevocationMirror

ROUNDS = 5  # the best of several rounds: this machine is shared, the minimum is the cost


def per_call(fn, n: int) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(max(1, n // ROUNDS)):
            fn()
        rounds.append((time.perf_counter() - started) / max(1, n // ROUNDS) * 1e6)
    return min(rounds)


async def per_call_async(fn, n: int) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(max(1, n // ROUNDS)):
            await fn()
        rounds.append((time.perf_counter() - started) / max(1, n // ROUNDS) * 1e6)
    return min(rounds)


def config():
    from tests.conftest import write_config

    data = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    return load_config(write_config(data), env={})


def bench_limiter(n: int) -> None:
    zones = [
        RateLimitZone(name="login", prefixes=["/auth/login", "/auth/register"], methods=["POST"], key="address", rate="5/m", burst=5),
        RateLimitZone(name="api", prefixes=["/api/", "/tasks", "/auth/"], key="user", rate="1000000/s", burst=20),
    ]
    rl = limiter.RateLimiter(zones, 100000)
    print(f"limiter  no zone applies          {per_call(lambda: rl.decide('GET', '/health/ping', '10.0.0.1', None), n):6.2f} µs")
    print(f"limiter  one zone, one key        {per_call(lambda: rl.decide('GET', '/api/protected', '10.0.0.1', 'alice'), n):6.2f} µs")
    print(f"limiter  two zones, refused       {per_call(lambda: rl.decide('POST', '/auth/login', '10.0.0.1', None), n):6.2f} µs")
    users = [f"user{i}" for i in range(50000)]
    it = iter(users * (n // len(users) + 1))
    print(f"limiter  one zone, 50k keys       {per_call(lambda: rl.decide('GET', '/api/x', '10.0.0.1', next(it)), n):6.2f} µs")


def bench_redis(n: int) -> None:
    url = os.environ.get("APPLIANCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    zones = [RateLimitZone(name="api", prefixes=["/api/"], key="user", rate="1000000/s", burst=20)]

    async def main() -> None:
        rl = limiter.RedisRateLimiter(zones, url, f"bench-{os.getpid()}:")
        try:
            first = await rl.decide("GET", "/api/x", "10.0.0.1", "alice")
            if first is None:
                print("redis    not reachable; skipped")
                return
            us = await per_call_async(lambda: rl.decide("GET", "/api/x", "10.0.0.1", "alice"), n)
            print(f"redis    one at a time (wall)     {us:6.2f} µs")
            users = [f"user{i}" for i in range(64)]
            rounds = max(1, n // 64)
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                await asyncio.gather(*(rl.decide("GET", "/api/x", "10.0.0.1", u) for u in users))
            wall = (time.perf_counter() - started) / (rounds * 64) * 1e6
            cpu_us = (time.process_time() - cpu) / (rounds * 64) * 1e6
            print(f"redis    64 at once, pipelined    {wall:6.2f} µs wall, {cpu_us:6.2f} µs cpu each")
            await rl._client.delete(*(rl.key_prefix + "api:u:" + u for u in users))
            await rl._client.delete(rl.key_prefix + "api:u:alice")
        finally:
            await rl.close()

    asyncio.run(main())


def bench_auth(n: int) -> None:
    cfg = config()
    hook = authhook.build(cfg, RevocationMirror())
    token, _ = tokens.issue_access(
        tokens.TokenSettings.from_config(cfg), user_id=7, username="alice", role="user", generation=1, family="f"
    )
    headers = [
        (b"host", b"example.com"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"application/json"),
        (b"authorization", b"Bearer " + token.encode()),
    ]
    anonymous = headers[:3]

    async def main() -> None:
        assert (await hook.check("GET", "/api/protected", headers)).ok
        print(f"auth     cached jwt               {await per_call_async(lambda: hook.check('GET', '/api/protected', headers), n):6.2f} µs")
        print(f"auth     public path              {await per_call_async(lambda: hook.check('GET', '/health/ping', headers), n):6.2f} µs")
        print(f"auth     missing token            {await per_call_async(lambda: hook.check('GET', '/api/x', anonymous), n):6.2f} µs")
        print(f"auth     is_public (protected)    {per_call(lambda: hook.is_public('/api/protected'), n):6.2f} µs")
        hook._cache.clear()
        settings = hook.settings

        def uncached() -> None:
            tokens.verify(settings, token)

        print(f"auth     uncached jwt (pyjwt)     {per_call(uncached, max(1, n // 20)):6.2f} µs")

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200000, help="calls per measurement")
    parser.add_argument("--uvloop", action="store_true", help="run the async measurements on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    bench_limiter(args.n)
    bench_auth(args.n)
    bench_redis(max(1, args.n // 50))


if __name__ == "__main__":
    main()
