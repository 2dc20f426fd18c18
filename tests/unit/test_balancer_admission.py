"""Admission as a verdict: token hook then limiter, nothing written, refusals counted once."""

from __future__ import annotations

import asyncio

from appliance import tokens
from appliance.balancer import authhook
from appliance.balancer.admission import Admission
from appliance.balancer.limiter import RateLimiter
from appliance.balancer.stats import Stats
from appliance.config import RateLimitZone

T0 = 1_750_000_000.0


def test_a_valid_token_is_admitted_with_its_identity_and_a_missing_one_refused(make_config) -> None:
    cfg = make_config()
    hook = authhook.build(cfg, None, lambda: T0)
    token, _ = tokens.issue_access(
        tokens.TokenSettings.from_config(cfg), now=T0, user_id=7, username="alice", role="user", generation=1, family="f"
    )
    stats = Stats()
    adm = Admission(hook, None, stats)
    assert adm.in_place(False) and adm.in_place(True)  # jwt never waits
    ok = adm.decide(b"GET", "/api/protected", [(b"authorization", b"Bearer " + token.encode())], "127.0.0.1", False)
    assert ok.ok and ok.user_id == "7" and ok.identity and ok.delay == 0 and ok.lines == b""
    no = adm.decide(b"GET", "/api/protected", [], "127.0.0.1", False)
    assert (no.ok, no.status, no.code) == (False, 401, "missing_token")
    assert no.extra.lower().startswith(b"www-authenticate: bearer")
    assert stats.auth_failures == {"missing_token": 1}
    public = adm.decide(b"GET", "/health/ping", [], "127.0.0.1", adm.is_public("/health/ping"))
    assert public.ok and public.identity is None


def test_the_limiter_refuses_with_its_lines_and_counts_the_zone() -> None:
    t = [1000.0]
    limiter = RateLimiter([RateLimitZone(name="z", prefixes=["/"], rate="1/s", burst=0, nodelay=True)], 100, clock=lambda: t[0])
    stats = Stats()
    adm = Admission(None, limiter, stats)
    first = adm.decide(b"GET", "/x", [], "10.0.0.1", True)
    assert first.ok and first.lines  # RateLimit-* lines go on the answer
    second = adm.decide(b"GET", "/x", [], "10.0.0.1", True)
    assert (second.ok, second.status, second.code, second.details) == (False, 429, "rate_limited", {"zone": "z"})
    assert b"retry-after" in second.lines.lower()
    assert stats.rate_limited == {"z": 1}


def test_waiting_modes_are_decided_in_a_task_with_the_same_verdicts(make_config) -> None:
    cfg = make_config(balancer={"auth_mode": "callable", "auth_callable": "tests.unit.test_balancer_admission:allow_alice"})
    adm = Admission(authhook.build(cfg, None, lambda: T0), None, Stats())
    assert not adm.in_place(False) and adm.in_place(True)
    verdict = asyncio.run(adm.decide_async(b"POST", "/api/x", [], "127.0.0.1", False))
    assert verdict.ok and verdict.user_id == "3" and verdict.identity


def allow_alice(method: str, path: str, headers: dict[str, str]) -> dict[str, str]:
    return {"sub": "3", "usr": "alice", "role": "user"}
