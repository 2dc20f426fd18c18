"""The balancer's token-validation hook: who is calling, decided before a request reaches a worker.

How it works
------------
`build(cfg, mirror)` returns one AuthHook for [balancer] auth_mode:

  jwt         the Bearer token is verified in-process with appliance.tokens (pinned
              algorithm, signature, exp, iss, aud, typ=access). Verified tokens are
              cached by Authorization value (bounded LRU, each entry valid until the
              token's exp), so pyjwt runs once per token; expiry and the RevocationMirror are
              checked on EVERY request, so a logout is refused within the mirror's
              poll interval (~0.5 s). The balancer starts the mirror's thread.
  subrequest  like nginx auth_request: GET [balancer] auth_subrequest_url with the
              client's Authorization header; 2xx allows (identity from the JSON answer's
              data.user or data: id, username, role), 401/403 are passed back, anything
              else or an unreachable endpoint is a 500. Answers are cached by SHA-256 of
              the Authorization value for auth_cache_seconds (bounded); concurrent misses
              for one token share one subrequest. The subrequest goes over the proxy's
              own client side: keep-alive connections from pool.py, answers read by
              framing.ResponseFramer (no second HTTP client).
  callable    [balancer] auth_callable "module:function", imported once, is called with
              (method, path, headers as a str->str dict with lowercase names) and returns
              a claims-like dict (sub, usr, role) to allow, or None to refuse (401). It
              may be a coroutine function.
  off         everything is allowed, nobody is identified.

Public prefixes ([balancer] public_prefixes) are served without any check; a prefix
ending in "/" matches its subtree, any other prefix the exact path or a path below it
("/auth/login" matches "/auth/login/x" but never "/auth/loginx"). A path with dot
segments (or any segment starting with a dot), percent-escapes, backslashes or
empty segments is never public, so it cannot smuggle a protected route past the
check behind a public prefix.

The hook only *returns* the identity (AuthResult.identity_value, an
X-Appliance-Identity value made with appliance.identity.sign). It never trusts an
identity the client sent: removing every client-sent X-Appliance-Identity,
X-User-*, X-Forwarded-User and X-Remote-User header is the proxy's job, on every
request, public or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import logging
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from appliance import identity, tokens
from appliance.balancer import pool
from appliance.balancer.framing import ProtocolError, ResponseHead
from appliance.balancer.picker import Upstream
from appliance.balancer.prefixes import prefix_matcher
from appliance.errors import error_body

log = logging.getLogger(__name__)

CACHE_SIZE = 10000  # tokens (jwt) or token hashes (subrequest) remembered at once
IDENTITY_REFRESH = 15.0  # seconds a signed identity is reused; workers accept up to identity.MAX_AGE
SUBREQUEST_TIMEOUT = 5.0  # seconds for one whole subrequest answer
SUBREQUEST_MAX_BODY = 65536
WARN_EVERY = 10.0  # seconds between warnings about a failing auth endpoint
_WWW_AUTHENTICATE = b"www-authenticate"


class AuthResult:
    """The hook's verdict. On refusal: status (401/403/500), code and message for the error
    envelope (`body()`), and `headers()` for the answer (WWW-Authenticate on 401)."""

    __slots__ = ("challenge", "code", "identity_value", "message", "ok", "role", "status", "user_id", "username")

    def __init__(
        self,
        ok: bool,
        status: int = 200,
        code: str = "",
        message: str = "",
        identity_value: str | None = None,
        user_id: str | None = None,
        username: str | None = None,
        role: str | None = None,
        challenge: bytes | None = None,
    ):
        self.ok = ok
        self.status = status
        self.code = code
        self.message = message
        self.identity_value = identity_value
        self.user_id = user_id
        self.username = username
        self.role = role
        self.challenge = challenge

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra answer headers of a refusal: WWW-Authenticate on a 401."""
        if self.status != 401:
            return []
        return [(b"WWW-Authenticate", self.challenge or b'Bearer realm="appliance"')]

    def body(self, request_id: str | None = None) -> bytes:
        """The JSON error envelope of a refusal."""
        return error_body(self.code, self.message, request_id=request_id)

    def __repr__(self) -> str:
        return f"AuthResult(ok={self.ok}, status={self.status}, code={self.code!r}, user_id={self.user_id!r})"


ALLOWED = AuthResult(True)  # public routes and mode "off": allowed, nobody identified
MISSING = AuthResult(False, 401, "missing_token", "authentication required: send Authorization: Bearer <token>")
AMBIGUOUS = AuthResult(False, 401, "invalid_token", "more than one Authorization header")
REVOKED = AuthResult(False, 401, "token_revoked", "token has been revoked", challenge=b'Bearer realm="appliance", error="invalid_token"')
EXPIRED = AuthResult(False, 401, "token_expired", "token has expired", challenge=b'Bearer realm="appliance", error="invalid_token"')
AUTH_UNAVAILABLE = AuthResult(False, 500, "auth_unavailable", "the authentication service could not be asked")


def _refused(code: str, message: str) -> AuthResult:
    return AuthResult(False, 401, code, message, challenge=b'Bearer realm="appliance", error="invalid_token"')


def _authorization(headers: list[tuple[bytes, bytes]]) -> bytes | None | AuthResult:
    """The one Authorization value; None when absent; AMBIGUOUS when repeated."""
    found = None
    for name, value in headers:
        if name == b"authorization":
            if found is not None:
                return AMBIGUOUS
            found = value
    return found


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


class _Verified:
    """A cached successful verification: the result to hand out and what it depends on."""

    __slots__ = ("claims", "exp", "result", "signed_at")

    def __init__(self, claims: dict[str, Any], exp: float, result: AuthResult, signed_at: float):
        self.claims = claims
        self.exp = exp
        self.result = result
        self.signed_at = signed_at


class AuthHook:
    """Base of the four modes: public routes, identity signing, the bounded cache."""

    mode = "off"

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._exact, self._subtrees = prefix_matcher(cfg.balancer.public_prefixes)
        self._key = identity.key_bytes(cfg.secrets.identity_key)
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self.cache_size = CACHE_SIZE

    def is_public(self, path: str) -> bool:
        """True when `path` (without the query) is served without a token."""
        if path in self._exact:
            return True
        if not path.startswith(self._subtrees):
            return False
        # Only reached for paths under a public prefix: refuse anything a worker might normalise
        # elsewhere ("/." covers "/./", "/../" and a trailing "/." or "/.."; dot-files lose too).
        return not ("/." in path or "%" in path or "//" in path or "\\" in path)

    async def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        """The verdict for one request; headers are (lowercase name, value) bytes pairs."""
        return ALLOWED

    def check_sync(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        """`check` for the modes that never wait (off, jwt): a plain call, no coroutine per request."""
        if self.mode != "off":  # subrequest and callable modes wait: they must be awaited through check()
            raise TypeError(f"auth mode {self.mode!r} has no synchronous check")
        return ALLOWED

    def _allow(self, claims: dict[str, Any], now: float) -> AuthResult:
        sub = claims.get("sub")
        return AuthResult(
            True,
            identity_value=identity.sign(claims, self._key, now=now),
            user_id=None if sub is None else str(sub),
            username=claims.get("usr"),
            role=claims.get("role"),
        )

    def _remember(self, key: bytes, entry: _Verified) -> None:
        cache = self._cache
        cache[key] = entry
        cache.move_to_end(key)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    def _cached(self, key: bytes, now: float) -> AuthResult | None:
        """A cached result still valid at `now` (re-signed when its identity is getting old)."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if now >= entry.exp:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        if entry.result.identity_value is not None and now - entry.signed_at > IDENTITY_REFRESH:
            entry.result = self._allow(entry.claims, now)
            entry.signed_at = now
        return entry.result

    async def close(self) -> None:
        """Release connections (subrequest mode)."""


class JwtAuthHook(AuthHook):
    """Mode "jwt": in-process verification, cached per token; exp and revocation checked every time.

    Its `check` (like the "off" mode's) never awaits anything, so the proxy calls
    `check_sync` directly: no task and no coroutine per request.
    """

    mode = "jwt"

    def __init__(self, cfg: Any, mirror: Any, clock: Callable[[], float] = time.time):
        super().__init__(cfg, clock)
        self.settings = tokens.TokenSettings.from_config(cfg)
        self.mirror = mirror
        self._leeway = float(self.settings.leeway)

    async def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        return self.check_sync(method, path, headers)

    def check_sync(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        if path in self._exact or (path.startswith(self._subtrees) and self.is_public(path)):
            return ALLOWED
        value = _authorization(headers)
        if value is None:
            return MISSING
        if value.__class__ is AuthResult:
            return value  # type: ignore[return-value]
        now = self.clock()
        # Keyed by the whole header value: a hit needs no parsing at all.
        entry = self._cache.get(value)  # type: ignore[arg-type]
        if entry is None:
            token = _bearer(value)  # type: ignore[arg-type]
            if token is None:
                return MISSING
            try:
                claims = tokens.verify(self.settings, token.decode("ascii"), now=now)
            except UnicodeDecodeError:
                return _refused("invalid_token", "token is malformed")
            except tokens.TokenError as exc:
                return EXPIRED if exc.code == "token_expired" else _refused(exc.code, exc.message)
            entry = _Verified(claims, float(claims["exp"]) + self._leeway, self._allow(claims, now), now)
            # Only the canonical "Bearer <token>" is remembered, so padding cannot bloat the cache.
            if len(value) == len(token) + 7:  # type: ignore[arg-type]
                self._remember(value, entry)  # type: ignore[arg-type]
        else:
            if now > entry.exp:
                del self._cache[value]  # type: ignore[arg-type]
                return EXPIRED
            self._cache.move_to_end(value)  # type: ignore[arg-type]
            if now - entry.signed_at > IDENTITY_REFRESH:
                entry.result = self._allow(entry.claims, now)
                entry.signed_at = now
        mirror = self.mirror
        if mirror is not None and mirror.is_revoked(entry.claims) is not None:
            return REVOKED
        return entry.result


class SubrequestAuthHook(AuthHook):
    """Mode "subrequest": nginx auth_request semantics against [balancer] auth_subrequest_url."""

    mode = "subrequest"

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.time):
        super().__init__(cfg, clock)
        url = urllib.parse.urlsplit(cfg.balancer.auth_subrequest_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"[balancer] auth_subrequest_url {cfg.balancer.auth_subrequest_url!r} is not an http(s) URL")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = url.scheme == "https"
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        host_header = url.netloc.rpartition("@")[2]
        self._head = f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n".encode("latin-1")
        self.ttl = cfg.balancer.auth_cache_seconds
        self.connect_timeout = min(cfg.balancer.upstream_connect_timeout, SUBREQUEST_TIMEOUT)
        self.timeout = SUBREQUEST_TIMEOUT
        # The proxy's own client side: pooled keep-alive connections (pool.py) and its ResponseFramer.
        host = self._host
        self._upstream = Upstream(f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}", group="auth")
        self._ssl_context = ssl.create_default_context() if self._ssl else None
        self._inflight: dict[bytes, asyncio.Task[AuthResult]] = {}
        self._last_warning = float("-inf")

    async def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        if path in self._exact or (path.startswith(self._subtrees) and self.is_public(path)):
            return ALLOWED
        value = _authorization(headers)
        if value.__class__ is AuthResult:
            return value  # type: ignore[return-value]
        auth: bytes = value or b""  # type: ignore[assignment]
        if b"\r" in auth or b"\n" in auth:  # the framing layer refuses these; never forward them anyway
            return _refused("invalid_token", "the Authorization header is malformed")
        key = hashlib.sha256(auth).digest()
        cached = self._cached(key, self.clock())
        if cached is not None:
            return cached
        # Concurrent misses for one token share one subrequest, run as its own task so that a
        # caller that is cancelled (client gone) never cancels it for the others.
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key, auth))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _fetch(self, key: bytes, auth: bytes) -> AuthResult:
        try:
            now = self.clock()
            result, claims = await self._ask(auth, now)
            if self.ttl > 0 and result.status in (200, 401, 403):
                self._remember(key, _Verified(claims or {}, now + self.ttl, result, now))
            return result
        except Exception:
            log.exception("auth subrequest failed unexpectedly")
            return AUTH_UNAVAILABLE
        finally:
            self._inflight.pop(key, None)

    async def _ask(self, auth: bytes, now: float) -> tuple[AuthResult, dict[str, Any] | None]:
        request = self._head + (b"Authorization: " + auth + b"\r\n" if auth else b"") + b"\r\n"
        try:
            head, body = await asyncio.wait_for(
                pool.fetch(self._upstream, request, self.connect_timeout, self._ssl_context, SUBREQUEST_MAX_BODY), self.timeout
            )
        except (OSError, TimeoutError, EOFError, ProtocolError) as exc:
            self._warn("auth subrequest failed (%s: %s); refusing with 500", type(exc).__name__, exc)
            return AUTH_UNAVAILABLE, None
        status = head.status
        if 200 <= status < 300:
            claims = _identity_from(body)
            if claims is None:
                return ALLOWED, None
            return self._allow(claims, now), claims
        if status in (401, 403):
            code, message = _error_from(body, status)
            return AuthResult(False, status, code, message, challenge=_header(head, _WWW_AUTHENTICATE)), None
        self._warn("auth subrequest answered %d; refusing with 500", status)
        return AUTH_UNAVAILABLE, None

    def _warn(self, message: str, *args: Any) -> None:
        # An outage of the auth endpoint must not write one line per request: one every 10 s.
        mono = time.monotonic()
        if mono - self._last_warning >= WARN_EVERY:
            self._last_warning = mono
            log.warning(message, *args)

    async def close(self) -> None:
        pool.close_idle(self._upstream)


def _header(head: ResponseHead, name: bytes) -> bytes | None:
    """The value of header `name` (lowercase) in an answer head, or None."""
    for spelled, value in head.headers:
        if spelled.lower() == name:
            return value
    return None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _identity_from(body: bytes) -> dict[str, Any] | None:
    """Claims from an auth answer: data.user, else data, else the object itself (id, username, role)."""
    doc = _json(body)
    if not isinstance(doc, dict):
        return None
    data = outer = doc.get("data", doc)
    if isinstance(data, dict) and isinstance(data.get("user"), dict):
        data = data["user"]
    if not isinstance(data, dict) or data.get("id", data.get("sub")) is None:
        return None
    claims = {"sub": str(data.get("id", data.get("sub"))), "usr": data.get("username", data.get("usr")), "role": data.get("role")}
    # Token facts the workers' revocation check uses, when the endpoint tells them (in the user or beside it).
    for source in (outer, data) if isinstance(outer, dict) else (data,):
        for name in ("jti", "fam", "gen", "exp"):
            if name in source:
                claims[name] = source[name]
    return claims


def _error_from(body: bytes, status: int) -> tuple[str, str]:
    doc = _json(body)
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str):
        return err["code"], err["message"]
    return ("unauthorized", "authentication required") if status == 401 else ("forbidden", "not allowed")


class CallableAuthHook(AuthHook):
    """Mode "callable": an operator function decides; claims-like dict allows, None refuses."""

    mode = "callable"

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.time):
        super().__init__(cfg, clock)
        self.func = load_callable(cfg.balancer.auth_callable)

    async def check(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> AuthResult:
        if path in self._exact or (path.startswith(self._subtrees) and self.is_public(path)):
            return ALLOWED
        plain = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
        try:
            claims = self.func(method, path, plain)
            if inspect.isawaitable(claims):
                claims = await claims
        except Exception:
            log.exception("auth callable %s raised", self.func)
            return AUTH_UNAVAILABLE
        if claims is None:
            return _refused("unauthorized", "authentication required")
        if not isinstance(claims, dict):
            log.error("auth callable returned %s, not a dict or None", type(claims).__name__)
            return AUTH_UNAVAILABLE
        return self._allow(claims, self.clock())


def load_callable(spec: str) -> Callable[..., Any]:
    """Import "module:function" (dotted attribute paths allowed after the colon)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"auth_callable {spec!r} must be 'module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"auth_callable {spec!r} is not callable")
    return obj


def build(cfg: Any, mirror: Any = None, clock: Callable[[], float] = time.time) -> AuthHook:
    """The hook for [balancer] auth_mode. `mirror` is a started RevocationMirror (jwt mode)."""
    mode = cfg.balancer.auth_mode
    if mode == "jwt":
        return JwtAuthHook(cfg, mirror, clock)
    if mode == "subrequest":
        return SubrequestAuthHook(cfg, clock)
    if mode == "callable":
        return CallableAuthHook(cfg, clock)
    return AuthHook(cfg, clock)
