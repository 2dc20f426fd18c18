"""TLS termination by the balancer process, with certificates made by trustme; plus the redirect listener and `init --tls`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.integration.test_balancer_proxy import Stack
from tests.procs import free_port, start_child, wait_port

pytestmark = pytest.mark.timeout(60)


def fetch(port: int, ctx: ssl.SSLContext, path: str = "/whoami") -> tuple[bytes, bytes]:
    """(answer bytes, the server's certificate DER) over a fresh TLS connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data, tls.getpeercert(binary_form=True) or b""


def write_cert(ca: trustme.CA, data: Path) -> None:
    """cert.pem (with its chain) and key.pem for localhost and 127.0.0.1 in `data`."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    data.mkdir(exist_ok=True)
    cert.cert_chain_pems[0].write_to_path(data / "cert.pem")
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(data / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(data / "key.pem")


@pytest.fixture
def tls_stack(tmp_path: Path):
    ca = trustme.CA()
    data = tmp_path / "data"
    write_cert(ca, data)
    redirect = free_port()
    s = Stack(tmp_path, workers=1, tls_cert="cert.pem", tls_key="key.pem", redirect_listen=f"127.0.0.1:{redirect}")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    try:
        s.start()
        s.redirect = redirect  # type: ignore[attr-defined]
        yield s, ca, ctx, data
    finally:
        s.close()


def test_tls_answer_with_verification_hsts_and_proto(tls_stack) -> None:
    s, _, ctx, _ = tls_stack
    answer, _ = fetch(s.port, ctx)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"strict-transport-security: max-age=" in head.lower()
    seen = dict(json.loads(body)["headers"])
    assert seen["x-forwarded-proto"] == "https"


def test_plain_http_and_broken_handshakes_do_not_disturb_others(tls_stack) -> None:
    s, _, ctx, _ = tls_stack
    bad: list[socket.socket] = []
    errors: list[str] = []

    def good_clients() -> None:
        for _ in range(10):
            try:
                assert fetch(s.port, ctx)[0].startswith(b"HTTP/1.1 200")
            except Exception as exc:  # collected and asserted below
                errors.append(repr(exc))

    t = threading.Thread(target=good_clients)
    t.start()
    plain = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    plain.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with contextlib.suppress(OSError):
        assert not plain.recv(100).startswith(b"HTTP/1.1 200")
    plain.close()
    for junk in (b"\x16\x03\x01\x00\x05hello", b"\x16\x03\x01", b"\x00" * 50):
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(junk)  # a broken or stalled handshake
        bad.append(sock)
    t.join(30)
    for sock in bad:
        sock.close()
    assert errors == []
    assert fetch(s.port, ctx)[0].startswith(b"HTTP/1.1 200")


def test_replaced_certificate_is_served_after_sighup(tls_stack) -> None:
    s, ca, ctx, data = tls_stack
    _, before = fetch(s.port, ctx)
    fresh = ca.issue_cert("localhost", "127.0.0.1")
    fresh.cert_chain_pems[0].write_to_path(data / "cert.pem")
    fresh.private_key_pem.write_to_path(data / "key.pem")
    os.kill(s.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    after = before
    while after == before and time.monotonic() < deadline:
        time.sleep(0.1)
        _, after = fetch(s.port, ctx)
    assert after != before
    assert after == ssl.PEM_cert_to_DER_cert(fresh.cert_chain_pems[0].bytes().decode())


def test_balancer_that_cannot_bind_its_redirect_port_never_accepts_a_client(tmp_path: Path) -> None:
    """A boot that fails on the second socket must not have listened on the first one meanwhile:
    a client that connected then would be reset once the process exits (its handshake, its
    request), and a start helper polling the port would take the balancer for started."""
    from appliance.contract import EXIT_BOOT_FAILURE

    write_cert(trustme.CA(), tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        redirect = taken.getsockname()[1]
        s = Stack(tmp_path, workers=1, tls_cert="cert.pem", tls_key="key.pem", redirect_listen=f"127.0.0.1:{redirect}")
        try:
            s.proc = start_child("balancer", s.config, log=s.log)
            accepted = 0
            deadline = time.monotonic() + 30
            while s.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", s.port), timeout=1):
                    accepted += 1
                time.sleep(0.001)
            assert s.proc.wait(5) == EXIT_BOOT_FAILURE
        finally:
            s.close()
    assert accepted == 0
    assert f"cannot listen on 127.0.0.1:{redirect}" in s.log.read_text()


def test_redirect_listener_answers_308(tls_stack) -> None:
    s = tls_stack[0]
    wait_port(s.redirect)
    with socket.create_connection(("127.0.0.1", s.redirect), timeout=5) as sock:
        sock.sendall(b"GET /api/x?y=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 308")
    assert b"location: https://example.com:%d/api/x?y=1\r\n" % s.port in answer
    for line in (b"x-content-type-options: nosniff", b"x-frame-options: DENY", b"referrer-policy: no-referrer"):
        assert line + b"\r\n" in answer
    # A Host that is no authority never becomes a Location; the refusal carries the headers too.
    for bad in (b"evil.com/x", b"a@evil.com", b"a, b"):
        with socket.create_connection(("127.0.0.1", s.redirect), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: " + bad + b"\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and b"location" not in answer.lower(), answer
        assert b"cache-control: no-store\r\n" in answer and b"x-content-type-options: nosniff\r\n" in answer


def test_init_self_signed_writes_private_key_and_config(tmp_path: Path) -> None:
    from appliance.balancer import certs
    from appliance.config import load_config
    from tests.conftest import write_config

    path = write_config(tmp_path / "d", server={"node_name": "n1"})
    cert, key = certs.init_self_signed(path.parent, hostname="appliance.test")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cfg = load_config(path, env={})
    assert cfg.path(cfg.balancer.tls_cert) == cert and cfg.path(cfg.balancer.tls_key) == key
    certs.server_context(cert, key)  # loads as a pair
