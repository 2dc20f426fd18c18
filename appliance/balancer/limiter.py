"""Rate limits with nginx `limit_req` semantics: named zones, leaky buckets, burst, nodelay or delay.

(Over 500 lines on purpose: the in-memory and the Redis limiter share the zone compiling, the
matching and the bucket arithmetic, which shared_buckets.py reuses too; apart, each would restate it.)

How it works
------------
Each zone ([[rate_limits.zones]]) has a rate r (requests per second), a burst b
and a key kind (client address, user, or both). Per key the zone keeps the
bucket's *excess* e, in thousandths of a request ("milli-requests", as nginx
does), and the time t of the last accepted request. A request at time now:

    cand = max(0, e - r * (now - t)_ms + 1000)        # drain, then add this request
    cand > b * 1000  -> refused (state untouched)     # 429, Retry-After
    otherwise        -> accepted, (e, t) = (cand, now)

A key seen for the first time starts with excess 0, exactly like nginx, so a
fresh key gets b + 1 requests at once and then one every 1/r seconds. A zone
with nodelay forwards an accepted request at once; without nodelay the request
waits cand / r seconds, which spaces the burst out at the zone's rate.

A request can match several zones (each zone matches by route prefix and
method); every matching zone applies and the request is refused when any zone
refuses. As in nginx, a refused request consumes nothing in the other zones:
all zones are checked first and only then charged.

Prefixes match as prefixes.py says (shared with authhook's public prefixes).

Two backends with one interface:
  RateLimiter       in memory, one process; per zone an LRU of at most max_keys
                    keys, and fully drained buckets are dropped as they age.
  RedisRateLimiter  one atomic Lua script (EVALSHA) per decision, so several
                    balancers share one limit; keys expire when drained; the
                    decisions of one event-loop turn share one pipeline.
Time is a parameter (`clock`), so tests run any schedule without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from appliance.balancer.prefixes import prefix_matcher
from appliance.config import RateLimitZone

log = logging.getLogger(__name__)

# Float rates (5/m = 0.0833.../s) make exact drains land a hair off the integer;
# this tolerance (a millionth of a request) keeps "one more request after 1/r s" exact.
_EPS = 1e-6
_ONE = 1000.0  # one request, in milli-requests
_ceil = math.ceil


def parse_rate(text: str) -> float:
    """'10/s' -> 10.0, '5/m' -> 0.0833...: requests per second."""
    number, _, unit = text.partition("/")
    value = float(number)
    if value <= 0 or unit not in ("s", "m"):
        raise ValueError(f"rate {text!r} is invalid; allowed: a positive number per s or m, e.g. 10/s or 5/m")
    return value if unit == "s" else value / 60.0


class Decision:
    """The verdict on one request, with the numbers for the RateLimit-* headers.

    allowed      False means answer 429
    delay        seconds to wait before forwarding (0 for nodelay zones or when refused)
    retry_after  whole seconds after which a retry can pass (>= 1 when refused, else 0)
    limit        requests the key may make at once (burst + 1)
    remaining    further requests that would pass right now
    reset        whole seconds until the key's bucket is fully drained
    zone         name of the zone these numbers come from (the refusing one, or the tightest)

    Only allowed and delay are computed up front; the header numbers are derived
    from the zone and the bucket's excess when read, so a request that sends no
    RateLimit headers pays nothing for them.
    """

    __slots__ = ("_cand", "_z", "allowed", "delay")

    def __init__(self, allowed: bool, delay: float, zone: _Zone, cand: float):
        self.allowed = allowed
        self.delay = delay
        self._z = zone
        self._cand = cand  # the bucket's excess with this request, in milli-requests

    @property
    def zone(self) -> str:
        return self._z.name

    @property
    def limit(self) -> int:
        return self._z.limit

    @property
    def remaining(self) -> int:
        if not self.allowed:
            return 0
        return int((self._z.burst_milli - self._cand) // _ONE)

    @property
    def retry_after(self) -> int:
        if self.allowed:
            return 0
        # A retry passes once the excess has drained down to the burst.
        retry = _ceil((self._cand - self._z.burst_milli) * self._z.seconds)
        return retry if retry > 1 else 1

    @property
    def reset(self) -> int:
        if self.allowed:
            return _ceil(self._cand * self._z.seconds - _EPS) if self._cand > 0.0 else 0
        # refused: the stored excess (without this request) drains fully
        return max(self.retry_after, _ceil((self._cand - _ONE) * self._z.seconds - _EPS))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """RateLimit-Limit, -Remaining, -Reset, and Retry-After when refused."""
        out = [
            (b"RateLimit-Limit", str(self.limit).encode()),
            (b"RateLimit-Remaining", str(self.remaining).encode()),
            (b"RateLimit-Reset", str(self.reset).encode()),
        ]
        if not self.allowed:
            out.append((b"Retry-After", str(self.retry_after).encode()))
        return out

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, delay={self.delay:.3f}, retry_after={self.retry_after}, limit={self.limit}, "
            f"remaining={self.remaining}, reset={self.reset}, zone={self.zone!r})"
        )


class _Zone:
    """A compiled zone: numbers in the units the bucket arithmetic uses."""

    __slots__ = ("burst", "burst_milli", "exact", "index", "key", "limit", "methods", "name", "nodelay", "rate", "seconds", "subtrees")

    def __init__(self, z: RateLimitZone, index: int = 0):
        self.index = index
        self.name = z.name
        self.rate = parse_rate(z.rate)  # requests per second == milli-requests per millisecond
        self.seconds = 1.0 / (self.rate * 1000.0)  # milli-requests -> seconds to drain them
        self.burst = z.burst
        self.burst_milli = z.burst * _ONE + _EPS
        self.limit = z.burst + 1
        self.nodelay = z.nodelay
        self.key = z.key
        self.methods = frozenset(m.upper() for m in z.methods) or None
        self.exact, self.subtrees = prefix_matcher(z.prefixes)

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return path in self.exact or path.startswith(self.subtrees)

    def bucket_key(self, address: str, user: str | None) -> str:
        # Distinct namespaces so that a user named like an address never shares a bucket with it.
        kind = self.key
        if kind == "address" or not user:
            return "a:" + address
        if kind == "user":
            return "u:" + user
        return "a:" + address + "|u:" + user

    def accepted(self, cand: float) -> Decision:
        return Decision(True, 0.0 if self.nodelay else cand * self.seconds, self, cand)

    def refused(self, cand: float) -> Decision:
        return Decision(False, 0.0, self, cand)


def _compile(zones: Sequence[RateLimitZone]) -> list[_Zone]:
    compiled = [_Zone(z, i) for i, z in enumerate(zones)]
    names = [z.name for z in compiled]
    if len(set(names)) != len(names):
        raise ValueError(f"rate limit zone names must be unique, got {names}")
    return compiled


def _combine(zones: list[_Zone], cands: list[float]) -> Decision:
    """One Decision for a request checked against `zones` whose candidate excesses are `cands`:
    the refusing zone with the longest Retry-After, else the zone with the fewest remaining
    requests, carrying the longest delay of all."""
    best: Decision | None = None
    for z, c in zip(zones, cands, strict=True):
        if c > z.burst_milli:
            d = z.refused(c)
            if best is None or d.retry_after > best.retry_after:
                best = d
    if best is not None:
        return best
    delay = 0.0
    for z, c in zip(zones, cands, strict=True):
        d = z.accepted(c)
        if d.delay > delay:
            delay = d.delay
        if best is None or d.remaining < best.remaining:
            best = d
    assert best is not None
    best.delay = delay
    return best


def matching_zones(zones: Sequence[_Zone], method: str, path: str) -> tuple[_Zone | None, list[_Zone] | None]:
    """(the zone, None) when one zone applies, (first, all of them) when several do, (None, None) when none."""
    first: _Zone | None = None
    more: list[_Zone] | None = None
    for z in zones:
        if (z.methods is None or method in z.methods) and (path in z.exact or path.startswith(z.subtrees)):
            if first is None:
                first = z
            elif more is None:
                more = [first, z]
            else:
                more.append(z)
    return first, more


class RateLimiter:
    """In-memory limiter for one process; `decide` is synchronous and allocation-light.

    State per zone is an OrderedDict key -> [excess, last] in least-recently-used
    order, bounded to `max_keys` (the least recently used key is dropped first);
    each new key also drops up to two of the oldest keys whose bucket has fully
    drained (as nginx does when it allocates a node), since such a key behaves
    exactly like a new one; so the table shrinks back as idle keys age out.
    """

    def __init__(self, zones: Sequence[RateLimitZone], max_keys: int = 100000, clock: Callable[[], float] = time.monotonic):
        self.zones = _compile(zones)
        self.max_keys = max(1, max_keys)
        self.clock = clock
        self._tables: list[OrderedDict[str, list[float]]] = [OrderedDict() for _ in self.zones]

    def decide(self, method: str, path: str, address: str, user: str | None) -> Decision | None:
        """The verdict for one request, or None when no zone applies. `path` is without the query."""
        first, more = matching_zones(self.zones, method, path)
        if first is None:
            return None
        now_ms = self.clock() * 1000.0
        if more is None:
            return self._decide_one(first, first.bucket_key(address, user), now_ms)
        return self._decide_many(more, address, user, now_ms)

    def _decide_one(self, z: _Zone, key: str, now_ms: float) -> Decision:
        # The common case, one zone: read, decide, charge, with nothing allocated but the Decision.
        table = self._tables[z.index]
        entry = table.get(key)
        if entry is None:
            table[key] = [0.0, now_ms]
            if len(table) > self.max_keys:
                table.popitem(last=False)
            self._expire(table, z, now_ms)
            return z.accepted(0.0)
        elapsed = now_ms - entry[1]
        cand = entry[0] - z.rate * (elapsed if elapsed > 0.0 else 0.0) + _ONE
        if cand < 0.0:
            cand = 0.0
        if cand > z.burst_milli:
            return z.refused(cand)
        entry[0] = cand
        entry[1] = now_ms
        table.move_to_end(key)
        return z.accepted(cand)

    def _decide_many(self, zones: list[_Zone], address: str, user: str | None, now_ms: float) -> Decision:
        # Check every zone first, charge them only when all accept (a refusal costs no zone anything).
        cands: list[float] = []
        entries: list[tuple[OrderedDict[str, list[float]], str, list[float] | None]] = []
        refused = False
        for z in zones:
            table = self._tables[z.index]
            key = z.bucket_key(address, user)
            entry = table.get(key)
            if entry is None:
                cand = 0.0
            else:
                elapsed = now_ms - entry[1]
                cand = entry[0] - z.rate * (elapsed if elapsed > 0.0 else 0.0) + _ONE
                if cand < 0.0:
                    cand = 0.0
            cands.append(cand)
            entries.append((table, key, entry))
            if cand > z.burst_milli:
                refused = True
        if not refused:
            for (table, key, entry), cand, z in zip(entries, cands, zones, strict=True):
                if entry is None:
                    table[key] = [cand, now_ms]
                    if len(table) > self.max_keys:
                        table.popitem(last=False)
                    self._expire(table, z, now_ms)
                else:
                    entry[0] = cand
                    entry[1] = now_ms
                    table.move_to_end(key)
        return _combine(zones, cands)

    @staticmethod
    def _expire(table: OrderedDict[str, list[float]], z: _Zone, now_ms: float) -> None:
        # Like nginx: look at the two least recently used keys and drop those that have fully drained.
        # (The key just added is last, and a fresh key never counts as drained, so it survives.)
        for _ in (0, 1):
            if not table:
                return
            key = next(iter(table))
            e, t = table[key]
            # A bucket is as good as new once a request would find it empty: e + 1000 drained.
            if e - z.rate * (now_ms - t) + _ONE > 0.0:
                return
            del table[key]

    def size(self, zone: str) -> int:
        """Keys currently tracked by `zone`."""
        return next(len(self._tables[z.index]) for z in self.zones if z.name == zone)


# KEYS[i]: bucket of zone i. ARGV[1]: now in ms, or "" for the Redis server's clock.
# ARGV[2i], ARGV[2i+1]: rate of zone i (milli-requests per ms) and burst (milli-requests, with tolerance).
# Returns "refused now_ms cand_1 ... cand_n" as one string: Lua numbers would be truncated to
# integers on the way back, and one bulk string is the cheapest reply to parse.
# Nothing is written when any zone refuses.
_LUA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = #KEYS
local cands = {}
local refused = 0
for i = 1, n do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local st = redis.call('HMGET', KEYS[i], 'e', 't')
  local c = 0
  if st[1] then
    local ms = now - tonumber(st[2])
    if ms < 0 then ms = 0 end
    c = tonumber(st[1]) - rate * ms + 1000
    if c < 0 then c = 0 end
  end
  cands[i] = c
  if c > burst then refused = 1 end
end
local out = {refused, string.format('%.3f', now)}
for i = 1, n do
  local c = cands[i]
  if refused == 0 then
    local rate = tonumber(ARGV[2 * i])
    redis.call('HSET', KEYS[i], 'e', string.format('%.6f', c), 't', string.format('%.3f', now))
    -- absent == fresh once (c + 1000) has drained; cap at 30 days for tiny rates
    redis.call('PEXPIRE', KEYS[i], string.format('%d', math.min(math.ceil((c + 1000) / rate) + 1000, 2592000000)))
  end
  out[i + 2] = string.format('%.6f', c)
end
return table.concat(out, ' ')
"""


class RedisRateLimiter:
    """Limiter shared by every balancer that uses the same Redis server and key prefix.

    One decision is one EVALSHA of an atomic Lua script covering every matching
    zone (read, check, charge all or nothing), so concurrent requests from any
    number of processes never over-admit. Bucket keys carry a TTL of their drain
    time and so vanish when idle. With `clock=None` (the default) the script uses
    the Redis server's clock, which all balancers share; a clock given here is
    used instead (tests).

    Decisions asked for in the same event-loop turn go to Redis together, as one
    pipeline (one write, one read): a round trip costs far more than a script
    call, so under load this is what keeps Redis off the critical path.

    Fails open: when Redis cannot be reached or answers with an error, `decide`
    returns None (no limit applied) and logs one warning line at most every 10 s;
    after a failure Redis is not asked again for 1 s, so an outage does not add a
    connect timeout to every request.
    """

    FAILURE_BACKOFF = 1.0
    WARN_EVERY = 10.0

    def __init__(
        self,
        zones: Sequence[RateLimitZone],
        redis_url: str,
        prefix: str = "appliance:",
        clock: Callable[[], float] | None = None,
        timeout: float = 0.5,
    ):
        import redis.asyncio as aioredis
        from redis.exceptions import NoScriptError, RedisError

        self.zones = _compile(zones)
        self.clock = clock
        self.key_prefix = prefix + "rl:"
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._noscript = NoScriptError
        self._client: Any = aioredis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._sha = hashlib.sha1(_LUA.encode()).hexdigest()
        self._pending: list[tuple[list[str], asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._last_warning = -math.inf
        self._zone_args: list[list[str]] = [[repr(z.rate), repr(z.burst_milli)] for z in self.zones]

    async def decide(self, method: str, path: str, address: str, user: str | None) -> Decision | None:
        """The verdict for one request, or None when no zone applies or Redis is unavailable (fail open)."""
        zones = [z for z in self.zones if z.matches(method, path)]
        if not zones:
            return None
        mono = time.monotonic()
        if mono < self._down_until:
            return None
        # EVALSHA sha numkeys key... now (rate burst)...
        command = [self._sha, str(len(zones))]
        command.extend(self.key_prefix + z.name + ":" + z.bucket_key(address, user) for z in zones)
        command.append("" if self.clock is None else repr(self.clock() * 1000.0))
        for z in zones:
            command.extend(self._zone_args[z.index])
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every request of this turn has queued its decision
        self._pending.append((command, future))
        try:
            reply = await future
        except self._errors as exc:
            self._failed(mono, exc)
            return None
        return _combine(zones, [float(c) for c in reply.split()[2:]])

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._batches.add(task)  # a strong reference until done
        task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[tuple[list[str], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._evalsha([command for command, _ in batch])
        except BaseException as exc:  # every waiter learns of it; decide() fails open
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, self._errors) else ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller went away
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _evalsha(self, commands: list[list[str]]) -> list[Any]:
        """Replies (or exceptions) for EVALSHA `commands`; the script is loaded once when Redis lacks it."""
        for attempt in (0, 1):
            if len(commands) == 1:
                try:
                    return [await self._client.execute_command("EVALSHA", *commands[0])]
                except self._noscript:
                    if attempt:
                        raise
            else:
                pipe = self._client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command("EVALSHA", *command)
                replies = await pipe.execute(raise_on_error=False)
                if attempt or not any(isinstance(r, self._noscript) for r in replies):
                    return replies
            await self._client.script_load(_LUA)  # after a Redis restart or SCRIPT FLUSH
        raise AssertionError("unreachable")

    def _failed(self, mono: float, exc: BaseException) -> None:
        self._down_until = mono + self.FAILURE_BACKOFF
        if mono - self._last_warning >= self.WARN_EVERY:
            self._last_warning = mono
            log.warning("rate limits not enforced: Redis is unavailable (%s: %s); failing open", type(exc).__name__, exc)

    async def close(self) -> None:
        for task in list(self._batches):
            task.cancel()
        await self._client.aclose()


def build(cfg: Any, clock: Callable[[], float] | None = None) -> RateLimiter | RedisRateLimiter | None:
    """The limiter the config asks for: None when [rate_limits] enabled is false or has no zones,
    Redis-backed when [redis] url is set, shared by several [balancer] processes, else in memory."""
    rl = cfg.rate_limits
    if not rl.enabled or not rl.zones:
        return None
    if cfg.redis.url:
        return RedisRateLimiter(rl.zones, cfg.redis.url, cfg.redis.key_prefix, clock=clock)
    if getattr(cfg, "balancer_processes", 1) > 1:
        from appliance.balancer.shared_buckets import SharedRateLimiter

        return SharedRateLimiter.for_config(cfg, clock)
    return RateLimiter(rl.zones, rl.max_keys, clock=clock or time.monotonic)
