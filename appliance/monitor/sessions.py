"""Server-side sessions of the status page, and the CSRF checks of its forms.

A session is a random 256-bit id in a cookie (HttpOnly, SameSite=Strict, Path
/status, Secure and __Host- named when the balancer terminates TLS); the
monitor keeps only its SHA-256, with the user, the token generation at login,
a CSRF token and an absolute expiry ([monitor] session_minutes). A forged id
matches nothing; an expired one is dropped when seen. Every login makes a new
id (and drops the one the browser brought), so a fixated id never becomes a
logged-in one. The store is bounded: expired sessions are swept at each login
and the oldest go first beyond MAX_SESSIONS.

Forms are CSRF-safe three ways: the cookies are SameSite=Strict (a cross-site
POST carries none), every form carries a token bound to the browser (the
session's CSRF token; before login, an HMAC of a pre-login cookie), and a POST
whose Origin or Sec-Fetch-Site names another site is refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

MAX_SESSIONS = 1000
COOKIE = "appliance_status"
LOGIN_COOKIE = "appliance_status_login"


@dataclass
class Session:
    user_id: int
    username: str
    generation: int
    csrf: str
    expires: float


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8", "replace")).hexdigest()


class Sessions:
    def __init__(self, lifetime_seconds: float, key: bytes):
        self.lifetime = lifetime_seconds
        self.key = key
        self._by_digest: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user_id: int, username: str, generation: int, now: float | None = None) -> tuple[str, Session]:
        """A new session id (for the cookie) and its session."""
        now = time.time() if now is None else now
        sid = secrets.token_urlsafe(32)
        session = Session(user_id, username, generation, secrets.token_urlsafe(24), now + self.lifetime)
        with self._lock:
            for d in [d for d, s in self._by_digest.items() if s.expires <= now]:
                del self._by_digest[d]
            while len(self._by_digest) >= MAX_SESSIONS:
                del self._by_digest[min(self._by_digest, key=lambda d: self._by_digest[d].expires)]
            self._by_digest[_digest(sid)] = session
        return sid, session

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        """The live session of a cookie value, or None (unknown, forged or expired)."""
        if not sid or len(sid) > 100:
            return None
        now = time.time() if now is None else now
        d = _digest(sid)
        with self._lock:
            session = self._by_digest.get(d)
            if session is not None and session.expires <= now:
                del self._by_digest[d]
                return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._by_digest.pop(_digest(sid), None)

    def drop_user(self, user_id: int) -> None:
        """End every session of a user (demoted, disabled, logged out everywhere)."""
        with self._lock:
            for d in [d for d, s in self._by_digest.items() if s.user_id == user_id]:
                del self._by_digest[d]

    def __len__(self) -> int:
        return len(self._by_digest)

    # -- CSRF of the login form (no session yet) ------------------------------------------
    def login_token(self, pre: str) -> str:
        """The form token bound to a pre-login cookie value."""
        return hmac.new(self.key, b"status-login." + pre.encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    def login_token_ok(self, pre: str | None, token: str | None) -> bool:
        return bool(pre and token) and hmac.compare_digest(self.login_token(pre or ""), token or "")


def same_site(environ: dict[str, Any]) -> bool:
    """False when the browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return False
    origin = environ.get("HTTP_ORIGIN")
    if origin:
        hosts = {environ.get("HTTP_HOST"), environ.get("HTTP_X_FORWARDED_HOST")} - {None, ""}
        if origin == "null" or origin.partition("://")[2] not in hosts:
            return False
    return True


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf, token or "")


def cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, Path=/status; Secure and __Host- named behind TLS."""
    if secure:
        name = "__Host-" + name
    parts = [f"{name}={value}", "Path=/" if secure else "Path=/status", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def read_cookie(environ: dict[str, Any], name: str, *, secure: bool) -> str | None:
    wanted = ("__Host-" + name) if secure else name
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == wanted:
            return value
    return None
