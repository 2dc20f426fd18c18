"""The in-memory rate limiter with a fake clock: exact admissions, delays, zones, keys, memory bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.balancer import limiter
from appliance.balancer.limiter import Decision, RateLimiter, RedisRateLimiter, parse_rate
from appliance.config import RateLimitZone


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def zone(name: str = "z", prefixes: list[str] | None = None, **kw) -> RateLimitZone:
    return RateLimitZone(name=name, prefixes=prefixes or ["/"], **kw)


def make(*zones: RateLimitZone, max_keys: int = 1000) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(list(zones), max_keys, clock=clock), clock


def burst_count(rl: RateLimiter, n: int, method: str = "GET", path: str = "/x", address: str = "10.0.0.1", user: str | None = None) -> int:
    return sum(1 for _ in range(n) if rl.decide(method, path, address, user).allowed)


def test_parse_rate():
    assert parse_rate("10/s") == 10.0
    assert parse_rate("5/m") == pytest.approx(5 / 60)
    assert parse_rate("2.5/s") == 2.5
    with pytest.raises(ValueError):
        parse_rate("0/s")


def test_five_per_minute_burst_five_nodelay():
    rl, clock = make(zone(rate="5/m", burst=5, nodelay=True))
    results = [rl.decide("POST", "/x", "1.2.3.4", None) for _ in range(8)]
    assert [d.allowed for d in results] == [True] * 6 + [False] * 2
    assert all(d.delay == 0 for d in results)
    refused = results[-1]
    assert refused.retry_after == 12 and refused.remaining == 0 and refused.limit == 6
    clock.t += 11.9
    assert not rl.decide("POST", "/x", "1.2.3.4", None).allowed
    clock.t += 0.1  # 12 s after the burst: exactly one more
    assert rl.decide("POST", "/x", "1.2.3.4", None).allowed
    assert not rl.decide("POST", "/x", "1.2.3.4", None).allowed
    clock.t += 24  # two more intervals: two more
    assert burst_count(rl, 5, address="1.2.3.4") == 2


def test_refused_requests_do_not_consume():
    rl, clock = make(zone(rate="5/m", burst=5))
    assert burst_count(rl, 100) == 6
    clock.t += 12
    assert burst_count(rl, 100) == 1


def test_ten_per_second_burst_twenty():
    rl, clock = make(zone(rate="10/s", burst=20, nodelay=True))
    assert burst_count(rl, 50) == 21
    clock.t += 1.0  # ten drained
    assert burst_count(rl, 50) == 10
    clock.t += 0.05  # half a request: nothing
    assert burst_count(rl, 5) == 0
    clock.t += 0.05
    assert burst_count(rl, 5) == 1


def test_steady_rate_is_admitted_forever():
    rl, clock = make(zone(rate="10/s", burst=0))
    accepted = 0
    for _ in range(1000):
        accepted += rl.decide("GET", "/x", "a", None).allowed
        clock.t += 0.1
    assert accepted == 1000
    # but twice the rate gets only half through
    accepted = 0
    for _ in range(1000):
        accepted += rl.decide("GET", "/x", "a", None).allowed
        clock.t += 0.05
    assert accepted == 500


def test_fully_idle_key_gets_the_whole_burst_again():
    rl, clock = make(zone(rate="10/s", burst=20))
    assert burst_count(rl, 30) == 21
    clock.t += 3600
    assert burst_count(rl, 30) == 21


def test_delay_mode_spaces_requests_at_the_rate():
    rl, clock = make(zone(rate="10/s", burst=3, nodelay=False))
    results = [rl.decide("GET", "/x", "a", None) for _ in range(5)]
    assert [d.allowed for d in results] == [True, True, True, True, False]
    assert [d.delay for d in results[:4]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert results[4].delay == 0 and results[4].retry_after == 1
    clock.t += 0.25  # 2.5 requests drained: excess 0.5 + 1 -> 0.15 s
    d = rl.decide("GET", "/x", "a", None)
    assert d.allowed and d.delay == pytest.approx(0.15)


def test_delay_mode_slow_rate():
    rl, clock = make(zone(rate="6/m", burst=2, nodelay=False))
    delays = [rl.decide("GET", "/x", "a", None).delay for _ in range(3)]
    assert delays == pytest.approx([0.0, 10.0, 20.0])
    assert not rl.decide("GET", "/x", "a", None).allowed


def test_decision_numbers_and_headers():
    rl, clock = make(zone(name="login", rate="5/m", burst=2))
    first = rl.decide("GET", "/x", "a", None)
    assert (first.allowed, first.limit, first.remaining, first.reset, first.zone) == (True, 3, 2, 0, "login")
    assert first.headers() == [(b"RateLimit-Limit", b"3"), (b"RateLimit-Remaining", b"2"), (b"RateLimit-Reset", b"0")]
    second = rl.decide("GET", "/x", "a", None)
    assert (second.remaining, second.reset) == (1, 12)
    rl.decide("GET", "/x", "a", None)
    refused = rl.decide("GET", "/x", "a", None)
    assert not refused.allowed
    assert refused.retry_after == 12
    assert (b"Retry-After", b"12") in refused.headers()
    assert dict(refused.headers())[b"RateLimit-Remaining"] == b"0"
    clock.t += 5
    refused = rl.decide("GET", "/x", "a", None)
    assert refused.retry_after == 7 and refused.reset >= 7


def test_retry_after_is_at_least_one_second():
    rl, clock = make(zone(rate="100/s", burst=0))
    assert rl.decide("GET", "/x", "a", None).allowed
    refused = rl.decide("GET", "/x", "a", None)
    assert not refused.allowed and refused.retry_after == 1


def test_prefix_matching_is_segment_aware():
    rl, _ = make(zone(prefixes=["/auth/login", "/api/"], rate="1/m", burst=0))
    assert rl.decide("GET", "/auth/login", "a", None) is not None
    assert rl.decide("GET", "/auth/login/again", "b", None) is not None
    assert rl.decide("GET", "/auth/loginx", "c", None) is None
    assert rl.decide("GET", "/api/users", "d", None) is not None
    assert rl.decide("GET", "/api", "e", None) is None
    assert rl.decide("GET", "/apix", "f", None) is None
    assert rl.decide("GET", "/", "g", None) is None


def test_method_matching():
    rl, _ = make(zone(prefixes=["/auth/login"], methods=["POST", "put"], rate="1/m", burst=0))
    assert rl.decide("GET", "/auth/login", "a", None) is None
    assert rl.decide("POST", "/auth/login", "a", None).allowed
    assert not rl.decide("POST", "/auth/login", "a", None).allowed
    assert not rl.decide("PUT", "/auth/login", "a", None).allowed  # same zone, same key


def test_every_matching_zone_applies_and_a_refusal_charges_nothing():
    login = zone("login", ["/auth/login"], methods=["POST"], rate="5/m", burst=1)
    api = zone("api", ["/auth/"], rate="10/s", burst=2)
    rl, clock = make(login, api)
    # login allows 2 at once, api 3: login refuses the third and api is not charged for it
    assert [rl.decide("POST", "/auth/login", "a", None).allowed for _ in range(3)] == [True, True, False]
    refused = rl.decide("POST", "/auth/login", "a", None)
    assert refused.zone == "login" and refused.retry_after == 12
    # api still has exactly one left for this address (2 charged by the two accepted logins)
    d = rl.decide("GET", "/auth/profile", "a", None)
    assert d.allowed and d.zone == "api" and d.remaining == 0
    assert not rl.decide("GET", "/auth/profile", "a", None).allowed
    assert rl.size("login") == 1 and rl.size("api") == 1


def test_refusal_by_one_zone_charges_no_other_zone():
    login = zone("login", ["/auth/login"], key="address", rate="1/m", burst=5)
    api = zone("api", ["/auth/"], key="user", rate="1/m", burst=1)
    rl, _ = make(login, api)
    assert [rl.decide("POST", "/auth/login", "a", "u").allowed for _ in range(12)] == [True, True] + [False] * 10
    # the ten refusals (by api) left login with 4 of its 6: users v, w, x get 2 + 2 + 0
    assert burst_count(rl, 5, "POST", "/auth/login", "a", "v") == 2
    assert burst_count(rl, 5, "POST", "/auth/login", "a", "w") == 2
    assert burst_count(rl, 5, "POST", "/auth/login", "a", "x") == 0


def test_combined_decision_reports_tightest_zone_and_longest_delay():
    slow = zone("slow", ["/a/"], rate="1/s", burst=5, nodelay=False)
    fast = zone("fast", ["/a/"], rate="10/s", burst=2, nodelay=True)
    rl, _ = make(slow, fast)
    rl.decide("GET", "/a/x", "k", None)
    d = rl.decide("GET", "/a/x", "k", None)
    assert d.allowed and d.zone == "fast" and d.remaining == 1 and d.delay == pytest.approx(1.0)


def test_key_kinds():
    by_address = zone("addr", ["/a/"], key="address", rate="1/m", burst=0)
    by_user = zone("user", ["/u/"], key="user", rate="1/m", burst=0)
    by_both = zone("both", ["/b/"], key="address_user", rate="1/m", burst=0)
    rl, _ = make(by_address, by_user, by_both)
    # address: users share their address's bucket
    assert rl.decide("GET", "/a/x", "1.1.1.1", "alice").allowed
    assert not rl.decide("GET", "/a/x", "1.1.1.1", "bob").allowed
    assert rl.decide("GET", "/a/x", "2.2.2.2", "alice").allowed
    # user: one user from two addresses shares a bucket; two users from one address do not
    assert rl.decide("GET", "/u/x", "1.1.1.1", "alice").allowed
    assert not rl.decide("GET", "/u/x", "2.2.2.2", "alice").allowed
    assert rl.decide("GET", "/u/x", "1.1.1.1", "bob").allowed
    # user zone, anonymous: falls back to the address, apart from a user named like the address
    assert rl.decide("GET", "/u/x", "3.3.3.3", None).allowed
    assert not rl.decide("GET", "/u/x", "3.3.3.3", None).allowed
    assert rl.decide("GET", "/u/x", "9.9.9.9", "3.3.3.3").allowed
    # address_user: the pair
    assert rl.decide("GET", "/b/x", "1.1.1.1", "alice").allowed
    assert not rl.decide("GET", "/b/x", "1.1.1.1", "alice").allowed
    assert rl.decide("GET", "/b/x", "2.2.2.2", "alice").allowed
    assert rl.decide("GET", "/b/x", "1.1.1.1", "bob").allowed
    assert rl.decide("GET", "/b/x", "1.1.1.1", None).allowed
    assert not rl.decide("GET", "/b/x", "1.1.1.1", None).allowed


def test_memory_is_bounded_by_max_keys_lru():
    rl, clock = make(zone(rate="1/m", burst=0), max_keys=100)
    for i in range(1000):
        assert rl.decide("GET", "/x", f"10.0.{i // 256}.{i % 256}", None).allowed
    assert rl.size("z") == 100
    # the most recent keys are still tracked, the oldest were evicted
    assert not rl.decide("GET", "/x", "10.0.3.231", None).allowed  # i = 999
    assert rl.decide("GET", "/x", "10.0.0.0", None).allowed  # i = 0, evicted


def test_drained_keys_are_dropped_as_new_keys_arrive():
    rl, clock = make(zone(rate="10/s", burst=5))
    for i in range(50):
        rl.decide("GET", "/x", f"old{i}", None)
    assert rl.size("z") == 50
    clock.t += 1.0  # every old bucket has drained
    for i in range(25):  # each new key drops up to two drained ones
        rl.decide("GET", "/x", f"new{i}", None)
    assert rl.size("z") == 25
    assert rl.decide("GET", "/x", "new0", None).remaining == 4  # the new keys kept their state


def test_a_key_is_not_dropped_before_it_is_as_good_as_new():
    rl, clock = make(zone(rate="1/m", burst=0))
    assert rl.decide("GET", "/x", "a", None).allowed
    for i in range(5):  # other keys trigger expiry passes at the same instant
        rl.decide("GET", "/x", f"o{i}", None)
    assert not rl.decide("GET", "/x", "a", None).allowed


def test_duplicate_zone_names_are_refused():
    with pytest.raises(ValueError):
        RateLimiter([zone("a"), zone("a")], 10)


def test_build_follows_the_config(make_config):
    assert limiter.build(make_config(rate_limits={"enabled": False})) is None
    rl = limiter.build(make_config())
    assert isinstance(rl, RateLimiter) and [z.name for z in rl.zones] == ["login", "api"]
    # the defaults: login 5/m burst 5 per address (POST only), api 20/s burst 60 per user
    assert burst_count(rl, 10, "POST", "/auth/login", "1.1.1.1") == 6
    assert rl.decide("GET", "/api/users", "1.1.1.1", "alice").limit == 61
    redis_rl = limiter.build(make_config(redis={"url": "redis://127.0.0.1:1/0", "key_prefix": "x:"}))
    assert isinstance(redis_rl, RedisRateLimiter) and redis_rl.key_prefix == "x:rl:"


def test_decision_repr_is_readable():
    rl, _ = make(zone("login", rate="5/m", burst=0))
    rl.decide("GET", "/x", "a", None)
    d = rl.decide("GET", "/x", "a", None)
    assert isinstance(d, Decision)
    assert repr(d) == "Decision(allowed=False, delay=0.000, retry_after=12, limit=1, remaining=0, reset=12, zone='login')"


@settings(max_examples=150, deadline=None)
@given(
    rate=st.sampled_from(["1/s", "10/s", "3/m", "2.5/s"]),
    burst=st.integers(min_value=0, max_value=8),
    gaps=st.lists(st.floats(min_value=0, max_value=2.0, allow_nan=False), min_size=1, max_size=120),
)
def test_no_window_admits_more_than_burst_plus_rate(rate, burst, gaps):
    rl, clock = make(zone(rate=rate, burst=burst))
    r = parse_rate(rate)
    times = []
    for gap in gaps:
        clock.t += gap
        if rl.decide("GET", "/x", "a", None).allowed:
            times.append(clock.t)
    # the leaky bucket's promise: in any window of length T at most burst + 1 + r*T requests pass
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + 1 + r * (times[j] - start) + 1e-6
    # and a client that waits 1/r between requests is never refused
    rl2, clock2 = make(zone(rate=rate, burst=burst))
    for _ in range(20):
        assert rl2.decide("GET", "/x", "a", None).allowed
        clock2.t += 1 / r
