"""Admission: may this request go upstream? The token hook, then the rate limiter, as one verdict.

`Admission.decide` (in place) and `decide_async` (awaited in a task) return a
Verdict and write nothing: the proxy answers a refusal, waits out a delay and
forwards the rest. Which of the two applies is known before the call:
`in_place(public)` is True when nothing would wait (jwt and off hooks, or a public
route, with no limiter or the in-memory one), so the common request makes no
task and no coroutine. Refusals are counted here (auth failures by code, rate
limiting by zone), once per refused request.
"""

from __future__ import annotations

import asyncio
from typing import Any

_METHOD_STR = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE")}


def method_str(method: bytes) -> str:
    return _METHOD_STR.get(method) or method.decode("latin-1")


class Verdict:
    """What admission decided for one request.

    ok         False: answer status/code/message with `extra` header lines (and `details`)
    identity   the X-Appliance-Identity value to send upstream (None: nobody identified)
    user_id    who is calling, for the access log
    delay      seconds to wait before forwarding (a zone without nodelay)
    lines      RateLimit-* header lines for the answer, refused or not
    """

    __slots__ = ("code", "delay", "details", "extra", "identity", "lines", "message", "ok", "status", "user_id")

    def __init__(self, identity: str | None = None, user_id: str | None = None, lines: bytes = b"") -> None:
        self.ok = True
        self.identity = identity
        self.user_id = user_id
        self.lines = lines
        self.delay = 0.0
        self.status = 200
        self.code = ""
        self.message = ""
        self.extra = b""
        self.details: dict[str, Any] | None = None

    def refuse(self, status: int, code: str, message: str, extra: bytes = b"", details: dict[str, Any] | None = None) -> Verdict:
        self.ok = False
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.details = details
        return self


ALLOWED = Verdict()  # public route, no limiter: shared, never changed


class Admission:
    """The token hook and the limiter of this process, asked in that order."""

    def __init__(self, hook: Any, limiter: Any, stats: Any):
        self.hook = hook
        self.limiter = limiter
        self.stats = stats
        self.limiter_async = limiter is not None and asyncio.iscoroutinefunction(limiter.decide)
        # jwt and off hooks never await: they are called in place (check_sync), no task per request.
        self.hook_sync = hook is None or getattr(hook, "mode", "") in ("jwt", "off")

    def is_public(self, path: str) -> bool:
        hook = self.hook
        return hook is None or hook.is_public(path)

    def in_place(self, public: bool) -> bool:
        """True when `decide` applies (nothing to wait for); else `decide_async` in a task."""
        return (public or self.hook_sync) and not self.limiter_async

    def decide(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]], client_ip: str, public: bool) -> Verdict:
        identity = user_id = None
        if not public:
            result = self.hook.check_sync(method_str(method), path, headers)
            if not result.ok:
                return self._refused(result)
            identity = result.identity_value
            user_id = result.user_id
        if self.limiter is not None:
            decision = self.limiter.decide(method_str(method), path, client_ip, user_id)
            if decision is not None:
                return self._limited(decision, identity, user_id)
        if identity is None and user_id is None:
            return ALLOWED
        return Verdict(identity, user_id)

    async def decide_async(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]], client_ip: str, public: bool) -> Verdict:
        identity = user_id = None
        if not public:
            result = await self.hook.check(method_str(method), path, headers)
            if not result.ok:
                return self._refused(result)
            identity = result.identity_value
            user_id = result.user_id
        if self.limiter is not None:
            decision = self.limiter.decide(method_str(method), path, client_ip, user_id)
            if self.limiter_async:
                decision = await decision
            if decision is not None:
                return self._limited(decision, identity, user_id)
        return Verdict(identity, user_id)

    def _refused(self, result: Any) -> Verdict:
        stats = self.stats.auth_failures
        stats[result.code] = stats.get(result.code, 0) + 1
        extra = b"".join(n + b": " + v + b"\r\n" for n, v in result.headers())
        return Verdict().refuse(result.status, result.code, result.message, extra)

    def _limited(self, decision: Any, identity: str | None, user_id: str | None) -> Verdict:
        verdict = Verdict(identity, user_id, b"".join(n + b": " + v + b"\r\n" for n, v in decision.headers()))
        if not decision.allowed:
            stats = self.stats.rate_limited
            stats[decision.zone] = stats.get(decision.zone, 0) + 1
            return verdict.refuse(429, "rate_limited", "too many requests; retry later", details={"zone": decision.zone})
        verdict.delay = decision.delay
        return verdict
