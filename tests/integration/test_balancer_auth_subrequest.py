"""Subrequest auth mode against a real HTTP server on loopback that counts its hits."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from appliance import identity
from appliance.balancer import authhook
from appliance.balancer.authhook import SubrequestAuthHook
from tests.procs import free_port


class AuthHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real auth endpoint

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        auth = self.headers.get("Authorization", "")
        with server.lock:  # type: ignore[attr-defined]
            server.hits[auth] += 1  # type: ignore[attr-defined]
            server.paths.append(self.path)  # type: ignore[attr-defined]
        token = auth.removeprefix("Bearer ")
        if token == "slow":
            time.sleep(1.0)
        if token == "shared":
            time.sleep(0.2)  # long enough for concurrent callers to pile up
        if token in ("good", "shared", "slow"):
            self._send(200, {"status": "success", "data": {"user": {"id": 7, "username": "alice", "role": "admin"}, "gen": 2}})
        elif token == "bare":
            self._send(204, None)
        elif token == "flat":
            self._send(200, {"id": 9, "username": "carol", "role": "user"})
        elif token == "denied":
            self._send(403, {"status": "error", "error": {"code": "forbidden", "message": "not for you"}})
        elif token == "boom":
            self._send(500, {"status": "error", "error": {"code": "internal", "message": "oops"}})
        elif token == "teapot":
            self._send(418, None)
        elif token == "chunked":
            body = json.dumps({"data": {"user": {"id": 11, "username": "dan"}}}).encode()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        else:
            self._send(
                401,
                {"status": "error", "error": {"code": "invalid_token", "message": "token is invalid"}},
                {"WWW-Authenticate": 'Bearer realm="upstream-auth"'},
            )

    def _send(self, status: int, doc, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode() if doc is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def auth_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    server.daemon_threads = True
    server.hits = Counter()  # type: ignore[attr-defined]
    server.paths = []  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Clock:
    def __init__(self, t: float = 1_750_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_hook(make_config, url: str, clock: Clock, cache: float = 5.0) -> SubrequestAuthHook:
    cfg = make_config(balancer={"auth_mode": "subrequest", "auth_subrequest_url": url, "auth_cache_seconds": cache})
    hook = authhook.build(cfg, None, clock)
    assert isinstance(hook, SubrequestAuthHook)
    hook.identity_key = identity.key_bytes(cfg.secrets.identity_key)  # for the assertions below
    return hook


def hdrs(token: str | None) -> list[tuple[bytes, bytes]]:
    out = [(b"host", b"public.example")]
    if token is not None:
        out.append((b"authorization", f"Bearer {token}".encode()))
    return out


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/auth/validate?from=balancer"


def test_answers_are_passed_on(make_config, auth_server):
    clock = Clock()
    hook = make_hook(make_config, url_of(auth_server), clock)

    async def main():
        try:
            ok = await hook.check("GET", "/api/protected", hdrs("good"))
            assert ok.ok and (ok.user_id, ok.username, ok.role) == ("7", "alice", "admin")
            claims = identity.verify(ok.identity_value, hook.identity_key, now=clock.t)
            assert claims["sub"] == "7" and claims["gen"] == 2
            flat = await hook.check("GET", "/api/protected", hdrs("flat"))
            assert flat.ok and flat.username == "carol"
            chunked = await hook.check("GET", "/api/protected", hdrs("chunked"))
            assert chunked.ok and chunked.user_id == "11"
            bare = await hook.check("GET", "/api/protected", hdrs("bare"))
            assert bare.ok and bare.identity_value is None
            denied = await hook.check("GET", "/api/protected", hdrs("denied"))
            assert (denied.ok, denied.status, denied.code, denied.message) == (False, 403, "forbidden", "not for you")
            assert denied.headers() == []
            bad = await hook.check("GET", "/api/protected", hdrs("wrong"))
            assert (bad.status, bad.code) == (401, "invalid_token")
            assert bad.headers() == [(b"WWW-Authenticate", b'Bearer realm="upstream-auth"')]
            missing = await hook.check("GET", "/api/protected", hdrs(None))
            assert missing.status == 401
            smuggled = await hook.check("GET", "/api/protected", [(b"authorization", b"Bearer good\r\nX-Evil: 1")])
            assert (smuggled.ok, smuggled.status) == (False, 401)
            for token in ("boom", "teapot"):
                failed = await hook.check("GET", "/api/protected", hdrs(token))
                assert (failed.ok, failed.status) == (False, 500)
            public = await hook.check("GET", "/health/ping", hdrs("wrong"))
            assert public.ok
        finally:
            await hook.close()

    asyncio.run(main())
    assert auth_server.hits["Bearer wrong"] == 1  # the public route never asked
    assert auth_server.hits[""] == 1  # no Authorization header is sent on as none
    assert set(auth_server.paths) == {"/auth/validate?from=balancer"}


def test_answers_are_cached_by_token_for_the_configured_time(make_config, auth_server):
    clock = Clock()
    hook = make_hook(make_config, url_of(auth_server), clock, cache=5.0)

    async def main():
        try:
            for _ in range(5):
                assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
                assert (await hook.check("GET", "/api/b", hdrs("wrong"))).status == 401
                assert (await hook.check("GET", "/api/c", hdrs("denied"))).status == 403
                assert (await hook.check("GET", "/api/d", hdrs("boom"))).status == 500
            assert auth_server.hits["Bearer good"] == 1
            assert auth_server.hits["Bearer wrong"] == 1
            assert auth_server.hits["Bearer denied"] == 1
            assert auth_server.hits["Bearer boom"] == 5  # failures are asked again
            clock.t += 4.9
            assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
            assert auth_server.hits["Bearer good"] == 1
            clock.t += 0.2
            assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
            assert auth_server.hits["Bearer good"] == 2
        finally:
            await hook.close()

    asyncio.run(main())


def test_cache_can_be_turned_off(make_config, auth_server):
    hook = make_hook(make_config, url_of(auth_server), Clock(), cache=0)

    async def main():
        try:
            for _ in range(3):
                assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
        finally:
            await hook.close()

    asyncio.run(main())
    assert auth_server.hits["Bearer good"] == 3


def test_concurrent_misses_share_one_subrequest(make_config, auth_server):
    hook = make_hook(make_config, url_of(auth_server), Clock())

    async def main():
        try:
            results = await asyncio.gather(*(hook.check("GET", "/api/a", hdrs("shared")) for _ in range(20)))
            assert all(r.ok and r.user_id == "7" for r in results)
        finally:
            await hook.close()

    asyncio.run(main())
    assert auth_server.hits["Bearer shared"] == 1


def test_unreachable_or_hung_endpoint_is_a_500(make_config, auth_server, caplog):
    dead = make_hook(make_config, f"http://127.0.0.1:{free_port()}/auth/validate", Clock())
    slow = make_hook(make_config, url_of(auth_server), Clock())
    slow.timeout = 0.3

    async def main():
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="appliance.balancer.authhook"):
                result = await dead.check("GET", "/api/a", hdrs("good"))
            assert (result.ok, result.status, result.code) == (False, 500, "auth_unavailable")
            assert [r.levelname for r in caplog.records if "auth subrequest failed" in r.getMessage()] == ["WARNING"]
            result = await slow.check("GET", "/api/a", hdrs("slow"))
            assert (result.ok, result.status) == (False, 500)
            assert time.monotonic() - started < 2.0
            # a timed-out answer is not cached: the next request asks again
            assert (await slow.check("GET", "/api/a", hdrs("good"))).ok
            # an outage warns once per 10 s, not once per request
            caplog.clear()
            for _ in range(5):
                assert (await dead.check("GET", "/api/a", hdrs("good"))).status == 500
            assert len([r for r in caplog.records if "auth subrequest failed" in r.getMessage()]) == 0
        finally:
            await dead.close()
            await slow.close()

    asyncio.run(main())


def test_keep_alive_connection_is_reused_and_survives_a_server_close(make_config, auth_server):
    hook = make_hook(make_config, url_of(auth_server), Clock(), cache=0)

    async def main():
        try:
            assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
            idle = hook._upstream.idle  # the proxy's own pool (pool.py) holds the auth endpoint's connections
            assert len(idle) == 1
            conn = idle[0]
            assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
            assert idle == [conn]  # the same connection again
            conn.transport.abort()  # as if the server had closed an idle connection
            assert (await hook.check("GET", "/api/a", hdrs("good"))).ok
        finally:
            await hook.close()

    asyncio.run(main())
    assert auth_server.hits["Bearer good"] == 3


def test_bad_url_is_refused_at_build(make_config):
    cfg = make_config(balancer={"auth_mode": "subrequest", "auth_subrequest_url": "ftp://x/y"})
    with pytest.raises(ValueError):
        authhook.build(cfg, None)
