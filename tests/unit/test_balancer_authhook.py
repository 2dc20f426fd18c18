"""The balancer's auth hook: jwt mode (every way a token can be bad, caching, revocation), public
prefixes, callable and off modes. Subrequest mode runs against a real server in
tests/integration/test_balancer_auth_subrequest.py."""

from __future__ import annotations

import asyncio
import datetime as _dt
from typing import Any

import jwt
import pytest

from appliance import identity, tokens
from appliance.balancer import authhook
from appliance.balancer.authhook import AuthResult, CallableAuthHook, JwtAuthHook
from appliance.revocation import RevocationMirror, revoke_family, revoke_generation, revoke_token

T0 = 1_750_000_000.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"example"), (b"authorization", b"Bearer " + token.encode())]


@pytest.fixture
def cfg(make_config):
    return make_config()


@pytest.fixture
def settings(cfg) -> tokens.TokenSettings:
    return tokens.TokenSettings.from_config(cfg)


def access(settings: tokens.TokenSettings, now: float = T0, **kw: Any) -> tuple[str, dict[str, Any]]:
    args = {"user_id": 7, "username": "alice", "role": "user", "generation": 1, "family": "fam1", **kw}
    return tokens.issue_access(settings, now=now, **args)


def hook_for(cfg, mirror=None, clock=None) -> JwtAuthHook:
    hook = authhook.build(cfg, mirror if mirror is not None else RevocationMirror(), clock or Clock())
    assert isinstance(hook, JwtAuthHook)
    return hook


def check(hook, token: str | None = None, path: str = "/api/protected", headers=None) -> AuthResult:
    if headers is None:
        headers = bearer(token) if token is not None else [(b"host", b"example")]
    return run(hook.check("GET", path, headers))


# --- jwt mode: the good path -------------------------------------------------------------


def test_valid_token_is_allowed_with_a_signed_identity(cfg, settings):
    token, claims = access(settings)
    result = check(hook_for(cfg), token)
    assert result.ok and result.status == 200
    assert (result.user_id, result.username, result.role) == ("7", "alice", "user")
    signed = identity.verify(result.identity_value, identity.key_bytes(cfg.secrets.identity_key), now=T0)
    assert signed["sub"] == "7" and signed["usr"] == "alice" and signed["jti"] == claims["jti"] and signed["gen"] == 1
    with pytest.raises(identity.IdentityError):
        identity.verify(result.identity_value, b"another key" * 4, now=T0)


def test_jwt_and_off_checks_never_await(cfg, make_config, settings):
    # the proxy drives these without a task: one send() must finish them
    token, _ = access(settings)
    hooks = [hook_for(cfg), authhook.build(make_config(balancer={"auth_mode": "off"}), None)]
    for hook in hooks:
        for headers in (bearer(token), bearer(token), bearer("junk"), []):
            coro = hook.check("GET", "/api/protected", headers)
            with pytest.raises(StopIteration) as done:
                coro.send(None)
            assert isinstance(done.value.value, AuthResult)


def test_check_sync_gives_the_same_verdicts_and_only_for_modes_that_never_wait(cfg, make_config, settings):
    # The proxy calls check_sync for jwt and off (no coroutine per request); the awaited check agrees.
    token, _ = access(settings)
    for hook in (hook_for(cfg), authhook.build(make_config(balancer={"auth_mode": "off"}), None)):
        for headers in (bearer(token), bearer("junk"), [(b"host", b"example")]):
            for path in ("/api/protected", "/health/ping"):
                now = hook.check_sync("GET", path, headers)
                later = run(hook.check("GET", path, headers))
                assert (now.ok, now.status, now.code) == (later.ok, later.status, later.code)
    assert not hook_for(cfg).check_sync("GET", "/api/protected", bearer("junk")).ok
    callable_hook = authhook.build(
        make_config(balancer={"auth_mode": "callable", "auth_callable": "tests.unit.test_balancer_authhook:sync_auth"}), None
    )
    with pytest.raises(TypeError):  # a mode that may wait must never be taken as synchronous
        callable_hook.check_sync("GET", "/api/protected", [])


def test_pyjwt_runs_once_per_token(cfg, settings, monkeypatch):
    calls = []
    real = tokens.verify

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(authhook.tokens, "verify", counting)
    hook = hook_for(cfg)
    token, _ = access(settings)
    other, _ = access(settings, user_id=8, username="bob")
    for _ in range(10):
        assert check(hook, token).ok
        assert check(hook, other).user_id == "8"
    assert len(calls) == 2


def test_identity_is_resigned_before_workers_would_find_it_stale(cfg, settings):
    clock = Clock()
    hook = hook_for(cfg, clock=clock)
    token, _ = access(settings)
    first = check(hook, token).identity_value
    clock.t += 5
    assert check(hook, token).identity_value == first  # reused while fresh
    clock.t += authhook.IDENTITY_REFRESH
    second = check(hook, token).identity_value
    assert second != first
    assert identity.verify(second, identity.key_bytes(cfg.secrets.identity_key), now=clock.t)["sub"] == "7"


def test_cached_token_expires_on_time(cfg, settings):
    clock = Clock()
    hook = hook_for(cfg, clock=clock)
    token, claims = access(settings)
    assert check(hook, token).ok
    clock.t = claims["exp"] + settings.leeway  # the last instant within the leeway
    assert check(hook, token).ok
    clock.t += 0.5
    result = check(hook, token)
    assert (result.ok, result.status, result.code) == (False, 401, "token_expired")
    assert check(hook, token).code == "token_expired"  # and not from a stale cache entry either


def test_padded_authorization_works_but_is_not_cached(cfg, settings):
    hook = hook_for(cfg)
    token, _ = access(settings)
    padded = [(b"authorization", b"Bearer " + b" " * 5000 + token.encode())]
    assert check(hook, headers=padded).ok
    assert not hook._cache
    assert check(hook, token).ok and len(hook._cache) == 1


def test_cache_is_bounded(cfg, settings):
    hook = hook_for(cfg)
    hook.cache_size = 5
    for i in range(20):
        assert check(hook, access(settings, user_id=i)[0]).ok
    assert len(hook._cache) == 5


# --- jwt mode: every bad token is a 401 ---------------------------------------------------


def _claims(settings: tokens.TokenSettings, **over: Any) -> dict[str, Any]:
    _, claims = access(settings)
    return {**claims, **over}


@pytest.mark.parametrize(
    "make_token, code",
    [
        (lambda s: jwt.encode(_claims(s), None, algorithm="none"), "invalid_token"),
        (lambda s: jwt.encode(_claims(s), s.secret, algorithm="HS512"), "invalid_token"),
        (lambda s: jwt.encode(_claims(s), "x" * 40, algorithm="HS256"), "invalid_token"),
        (lambda s: jwt.encode(_claims(s, aud="someone-else"), s.secret, algorithm="HS256"), "invalid_token"),
        (lambda s: jwt.encode(_claims(s, iss="evil"), s.secret, algorithm="HS256"), "invalid_token"),
        (lambda s: jwt.encode(_claims(s, exp=int(T0) - 3600), s.secret, algorithm="HS256"), "token_expired"),
        (lambda s: jwt.encode(_claims(s, nbf=int(T0) + 3600), s.secret, algorithm="HS256"), "invalid_token"),
        (lambda s: tokens.issue_refresh(s, user_id=7, generation=1, family="f", now=T0)[0], "invalid_token"),
        (lambda s: access(s)[0][:-3] + "AAA", "invalid_token"),
        (lambda s: "not.a.token", "invalid_token"),
        (lambda s: "x" * 9000, "invalid_token"),
    ],
    ids=["alg-none", "other-alg", "wrong-key", "wrong-aud", "wrong-iss", "expired", "not-yet", "refresh", "tampered", "junk", "huge"],
)
def test_bad_tokens_are_refused(cfg, settings, make_token, code):
    hook = hook_for(cfg)
    result = check(hook, make_token(settings))
    assert (result.ok, result.status, result.code) == (False, 401, code)
    assert result.identity_value is None and result.user_id is None
    assert result.headers()[0][0] == b"WWW-Authenticate" and result.headers()[0][1].startswith(b"Bearer")
    assert b'"status":"error"' in result.body("rid-1") and b"rid-1" in result.body("rid-1")
    assert not hook._cache  # failures are never cached


def test_missing_or_unusable_authorization(cfg, settings):
    hook = hook_for(cfg)
    token, _ = access(settings)
    assert check(hook).code == "missing_token"
    assert check(hook, headers=[(b"authorization", b"Basic YWxpY2U6cHc=")]).code == "missing_token"
    assert check(hook, headers=[(b"authorization", b"Bearer ")]).code == "missing_token"
    assert check(hook, headers=[(b"authorization", b"Bearer \xff\xfe")]).code == "invalid_token"
    twice = bearer(token) + [(b"authorization", b"Bearer " + token.encode())]
    assert (check(hook, headers=twice).status, check(hook, headers=twice).code) == (401, "invalid_token")
    # scheme is case-insensitive, as RFC 7235 says
    assert check(hook, headers=[(b"authorization", b"bearer " + token.encode())]).ok
    assert check(hook).headers() == [(b"WWW-Authenticate", b'Bearer realm="appliance"')]


def test_forged_identity_headers_do_not_identify_anyone(cfg):
    hook = hook_for(cfg)
    forged = [(b"x-appliance-identity", b"v1.e30.AAAA"), (b"x-user-id", b"1"), (b"x-remote-user", b"admin")]
    result = check(hook, headers=forged)
    assert not result.ok and result.code == "missing_token"


# --- jwt mode: revocation through the mirror and a real database ------------------------------


def _future() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None) + _dt.timedelta(hours=1)


def test_revocation_is_checked_on_every_request(db, cfg, settings):
    mirror = RevocationMirror()
    mirror.refresh()
    hook = hook_for(cfg, mirror)
    token, claims = access(settings)
    family_token, _ = access(settings, family="fam2")
    gen_token, _ = access(settings, user_id=9, generation=3)
    other, _ = access(settings, user_id=10)
    for t in (token, family_token, gen_token, other):
        assert check(hook, t).ok  # now cached
    revoke_token(claims["jti"], 7, _future())
    revoke_family("fam2", 7, _future())
    revoke_generation(9, 4, _future(), "password changed")
    assert check(hook, token).ok  # the mirror has not polled yet
    assert mirror.refresh() == 3
    for t in (token, family_token, gen_token):
        result = check(hook, t)
        assert (result.ok, result.status, result.code) == (False, 401, "token_revoked")
    assert check(hook, other).ok
    # a token issued after the generation bump passes
    assert check(hook, access(settings, user_id=9, generation=4)[0]).ok


# --- public prefixes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, public",
    [
        ("/auth/login", True),
        ("/auth/login/", True),
        ("/auth/login/mfa", True),
        ("/auth/loginx", False),
        ("/auth/logout", False),
        ("/health/ping", True),
        ("/health/", True),
        ("/health", False),
        ("/healthz", False),
        ("/api/status", True),
        ("/api/statuses", False),
        ("/api/protected", False),
        ("/status", True),
        ("/status/app.js", True),
        ("/statusx", False),
        ("/openapi.json", True),
        ("/openapi.jsonx", False),
        ("/health/../api/users", False),
        ("/health/./x", False),
        ("/health/..", False),
        ("/auth/login/%2e%2e/%2e%2e/api/users", False),
        ("/health//api", False),
        ("/health/\\..\\api", False),
        ("/", False),
        ("", False),
    ],
)
def test_public_prefixes(cfg, settings, path, public):
    hook = hook_for(cfg)
    assert hook.is_public(path) is public
    result = check(hook, path=path)  # no token at all
    assert result.ok is public
    if public:
        assert result.identity_value is None


def test_custom_public_prefixes(make_config):
    cfg = make_config(balancer={"public_prefixes": ["/docs/", "/ping"]})
    hook = hook_for(cfg)
    assert hook.is_public("/docs/a/b") and hook.is_public("/ping") and hook.is_public("/ping/x")
    assert not hook.is_public("/docs") and not hook.is_public("/pingx") and not hook.is_public("/auth/login")


# --- other modes -------------------------------------------------------------------------------


def sync_auth(method: str, path: str, headers: dict[str, str]) -> dict[str, Any] | None:
    if headers.get("x-api-key") == "k1":
        return {"sub": "42", "usr": "robot", "role": "admin"}
    if headers.get("x-api-key") == "boom":
        raise RuntimeError("the operator's function failed")
    if headers.get("x-api-key") == "odd":
        return "yes"  # type: ignore[return-value]
    return None


async def async_auth(method: str, path: str, headers: dict[str, str]) -> dict[str, Any] | None:
    await asyncio.sleep(0)
    return {"sub": "43", "usr": method + " " + path, "role": "user"} if "authorization" in headers else None


def test_callable_mode_sync(make_config):
    cfg = make_config(balancer={"auth_mode": "callable", "auth_callable": "tests.unit.test_balancer_authhook:sync_auth"})
    hook = authhook.build(cfg, None, Clock())
    assert isinstance(hook, CallableAuthHook)
    ok = check(hook, headers=[(b"x-api-key", b"k1")])
    assert ok.ok and (ok.user_id, ok.username, ok.role) == ("42", "robot", "admin")
    assert identity.verify(ok.identity_value, identity.key_bytes(cfg.secrets.identity_key), now=T0)["usr"] == "robot"
    refused = check(hook, headers=[(b"x-api-key", b"nope")])
    assert (refused.ok, refused.status) == (False, 401)
    assert check(hook, headers=[(b"x-api-key", b"boom")]).status == 500
    assert check(hook, headers=[(b"x-api-key", b"odd")]).status == 500
    assert check(hook, path="/health/ping", headers=[]).ok


def test_callable_mode_async(make_config):
    cfg = make_config(balancer={"auth_mode": "callable", "auth_callable": "tests.unit.test_balancer_authhook:async_auth"})
    hook = authhook.build(cfg, None, Clock())
    result = run(hook.check("DELETE", "/tasks/1", [(b"authorization", b"anything")]))
    assert result.ok and result.username == "DELETE /tasks/1"
    assert not check(hook, headers=[]).ok


def test_callable_that_cannot_be_loaded_fails_at_build(make_config):
    for spec in ("tests.unit.test_balancer_authhook:nothing_here", "no_such_module_xyz:f", "tests.unit.test_balancer_authhook:T0"):
        cfg = make_config(balancer={"auth_mode": "callable", "auth_callable": spec})
        with pytest.raises((ImportError, AttributeError, ValueError)):
            authhook.build(cfg, None)


def test_off_mode_allows_everything_without_identity(make_config):
    hook = authhook.build(make_config(balancer={"auth_mode": "off"}), None)
    result = check(hook, headers=[(b"x-appliance-identity", b"forged")])
    assert result.ok and result.identity_value is None and result.user_id is None
