"""Framing holes closed end to end: a real balancer in front of a real upstream, raw bytes on loopback.

Each test looks at both sides: what the client got back, and what the upstream
parsed (balancer_upstream.py's /seen lists every request it read).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_config
from tests.integration.test_balancer_proxy import Stack, get, stack

pytestmark = pytest.mark.timeout(120)


def exchange(port: int, raw: bytes, source: str = "127.0.0.1") -> bytes:
    """Send `raw` in one write and read until the balancer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(raw)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


def seen(s: Stack) -> list[dict[str, Any]]:
    """The requests the (only) upstream parsed."""
    direct = http.client.HTTPConnection("127.0.0.1", s.base, timeout=10)
    try:
        return json.loads(get(direct, "/seen")[1])["seen"]
    finally:
        direct.close()


def statuses(answer: bytes) -> list[int]:
    """The status of each answer in `answer` (bodies here are JSON, never holding a status line)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("named", [b"keep-alive, Content-Length", b"Transfer-Encoding", b"close, host"])
def test_connection_naming_a_framing_header_is_refused_and_nothing_reaches_the_upstream(tmp_path: Path, named: bytes) -> None:
    with stack(tmp_path, workers=1) as s:
        raw = b"POST /upload HTTP/1.1\r\nHost: a\r\nConnection: %s\r\nContent-Length: %d\r\n\r\n%s" % (named, len(SMUGGLED), SMUGGLED)
        answer = exchange(s.port, raw)
        assert statuses(answer) == [400], answer
        assert seen(s) == []  # neither the POST nor the request hidden in its body


BAD_AFTER_GOOD = {
    "second_without_host": (b"GET /whoami?n=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /whoami?n=2 HTTP/1.1\r\n\r\n", [200, 400]),
    "bytes_after_close": (b"GET /whoami?n=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n\x16\x03\x01garbage\r\n\r\n", [200]),
    "protocol_after_upgrade": (
        b"GET /whoami?n=1 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x85\x00\x00\x00\x00hello",
        [200, 400],
    ),
    "garbage_after_empty_post": (b"POST /upload?n=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGARBAGE\r\n\r\n", [200, 400]),
}


@pytest.mark.parametrize("case", sorted(BAD_AFTER_GOOD))
def test_a_bad_pipelined_request_leaves_the_answer_of_the_good_one_before_it(tmp_path: Path, case: str) -> None:
    raw, expected = BAD_AFTER_GOOD[case]
    with stack(tmp_path, workers=1) as s:
        answer = exchange(s.port, raw)
        assert statuses(answer) == expected, answer
        assert b"?n=1" in answer  # the first answer is the upstream's
        ran = seen(s)
        assert [r["path"] for r in ran] == [raw.split(b" ")[1].decode()]  # the first request ran once, nothing else


def test_an_upgrade_request_body_is_read_as_its_body_not_as_a_request(tmp_path: Path) -> None:
    with stack(tmp_path, workers=1) as s:
        raw = b"POST /upload HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\nContent-Length: %d\r\n\r\n%s" % (
            len(SMUGGLED),
            SMUGGLED,
        )
        answer = exchange(s.port, raw)
        assert statuses(answer) == [200] and json.loads(answer.partition(b"\r\n\r\n")[2])["size"] == len(SMUGGLED)
        assert [r["path"] for r in seen(s)] == ["/upload"]


@pytest.mark.parametrize("host", [b"a, b", b"host/path", b"user@host", b"a b", b"[::g]", b"a\r\nHost: b"])
def test_an_invalid_host_is_refused_and_never_forwarded(tmp_path: Path, host: bytes) -> None:
    with stack(tmp_path, workers=1) as s:
        answer = exchange(s.port, b"GET /whoami HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert statuses(answer) == [400], answer
        assert seen(s) == []


def test_a_valid_host_becomes_x_forwarded_host(tmp_path: Path) -> None:
    with stack(tmp_path, workers=1) as s:
        for host in ("[::1]:8443", "api.example.com", "10.0.0.1:80"):
            conn = s.client()
            conn.putrequest("GET", "/whoami", skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
            resp = conn.getresponse()
            headers = dict(json.loads(resp.read())["headers"])
            assert resp.status == 200 and headers["x-forwarded-host"] == host
            conn.close()


SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _head_fields(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def test_every_answer_the_balancer_makes_carries_the_security_headers(tmp_path: Path) -> None:
    s = Stack(tmp_path, workers=1, auth_mode="jwt", max_body_bytes=10, max_header_bytes=2048)
    sections = {
        "balancer": {
            "listen": f"127.0.0.1:{s.port}",
            "auth_mode": "jwt",
            "health_interval": 0.5,
            "max_body_bytes": 10,
            "max_header_bytes": 2048,
        },
        "api": {"workers": 1, "base_port": s.base},
        "monitor": {"enabled": False},
        "rate_limits": {"enabled": True, "zones": [{"name": "login", "prefixes": ["/auth/login"], "rate": "1/m", "burst": 0}]},
        "logging": {"format": "json"},
    }
    s.config = write_config(tmp_path / "data", **sections)
    try:
        _migrate(s)
        s.start()
        answers = {
            400: exchange(s.port, b"GET / HTTP/1.1\r\n\r\n"),
            401: exchange(s.port, b"GET /api/protected HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
            413: exchange(s.port, b"POST /auth/login HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"),
            431: exchange(s.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 4000 + b"\r\n\r\n"),
            429: exchange(
                s.port, b"GET /auth/login HTTP/1.1\r\nHost: a\r\n\r\nGET /auth/login HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            ),
        }
        for p in s.upstreams:
            p.kill()
            p.wait()
        answers[503] = exchange(s.port, b"GET /auth/login HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", source="127.0.0.2")
        for status, answer in answers.items():
            last = answer[answer.rfind(b"HTTP/1.1 ") :]
            assert statuses(answer)[-1] in ((status, 502) if status == 503 else (status,)), answer
            fields = _head_fields(last)
            for name, value in SECURITY.items():
                assert fields.get(name) == value, (status, name, last)
    finally:
        s.close()


def _migrate(s: Stack) -> Any:
    from appliance import db
    from appliance.config import load_config

    cfg = load_config(s.config, env={})
    db.migrate(db.open_database(cfg))
    return cfg


def _token(cfg: Any, user_id: int = 7) -> str:
    from appliance import tokens

    token, _ = tokens.issue_access(
        tokens.TokenSettings.from_config(cfg), user_id=user_id, username="ann", role="user", generation=0, family="f1"
    )
    return token


def _limited_stack(tmp_path: Path, zones: list[dict[str, Any]], **balancer: Any) -> Stack:
    s = Stack(tmp_path, workers=1)
    sections = {
        "balancer": {"listen": f"127.0.0.1:{s.port}", "auth_mode": "jwt", "health_interval": 0.5, **balancer},
        "api": {"workers": 1, "base_port": s.base},
        "monitor": {"enabled": False},
        "rate_limits": {"enabled": True, "zones": zones},
        "logging": {"format": "json"},
    }
    s.config = write_config(tmp_path / "data", **sections)
    return s


def test_percent_encoding_does_not_dodge_routes_zones_or_the_token_check(tmp_path: Path) -> None:
    zones = [
        {"name": "login", "prefixes": ["/auth/login"], "methods": ["POST"], "rate": "1/m", "burst": 1},
        {"name": "api", "prefixes": ["/api/"], "key": "user", "rate": "1/m", "burst": 0},
    ]
    s = _limited_stack(tmp_path, zones)
    try:
        cfg = _migrate(s)
        s.start()
        conn = s.client()
        got = []
        for path in ("/auth/login", "/auth/logi%6e", "/auth/logi%6E"):
            conn.request("POST", path, body=b"{}")
            resp = conn.getresponse()
            resp.read()
            got.append(resp.status)
        assert got == [200, 200, 429]  # the escaped spellings count against the login zone
        assert get(conn, "/%61pi/protected")[0] == 401  # the API route, which needs a token
        auth = {"Authorization": f"Bearer {_token(cfg)}"}
        status, body, _ = get(conn, "/%61pi/protected?q=%61", auth)
        assert status == 200 and json.loads(body)["path"] == "/api/protected?q=%61"  # one canonical path; query as it came
        assert get(conn, "/api/protected", auth)[0] == 429  # the same zone as the escaped spelling
        for path in (b"/api/%2e%2e/x", b"/a%2fb", b"/api/..", b"/a%5cb", b"/a%00", b"/a\\b", b"/a%zz"):
            answer = exchange(
                s.port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nAuthorization: " + auth["Authorization"].encode() + b"\r\n\r\n"
            )
            assert statuses(answer) == [400], (path, answer)
        assert [r["path"] for r in seen(s)] == ["/auth/login", "/auth/login", "/api/protected?q=%61"]
    finally:
        s.close()


def test_the_client_address_reaches_the_upstream_signed_and_forged_ones_are_replaced(tmp_path: Path) -> None:
    from appliance import identity
    from appliance.config import load_config

    with stack(tmp_path, workers=1, trusted_proxies=["127.0.0.3"]) as s:
        key = identity.key_bytes(load_config(s.config, env={}).secrets.identity_key)
        forged = b"X-Appliance-Client: " + identity.sign_client("9.9.9.9", b"not the key").encode() + b"\r\n"
        cases = [
            ("127.0.0.2", b"", "127.0.0.2"),
            ("127.0.0.2", forged + b"X-Forwarded-For: 8.8.8.8\r\n", "127.0.0.2"),  # untrusted peer: its XFF is not believed
            ("127.0.0.3", forged + b"X-Forwarded-For: 8.8.8.8, 10.1.2.3\r\n", "10.1.2.3"),  # behind a trusted proxy
        ]
        for source, extra, expected in cases:
            for path in (b"/whoami", b"/auth/login"):  # public routes too: the login lockout needs it
                raw = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"Connection: close\r\n\r\n"
                answer = exchange(s.port, raw, source=source)
                assert statuses(answer) == [200], answer
                values = [v for n, v in json.loads(answer.partition(b"\r\n\r\n")[2])["headers"] if n == "x-appliance-client"]
                assert len(values) == 1 and identity.verify_client(values[0], key) == expected, (source, values)
