"""/health/ping served on waitress's loop thread (appliance/api/inline.py), through a real worker."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.api_support import start_worker, worker_config
from tests.integration.test_api_worker import SLOW_APP

pytestmark = pytest.mark.slow


def _responses(sock: socket.socket, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Read one HTTP/1.1 response per request method, in order, from one connection (Content-Length framing)."""
    stream = sock.makefile("rb")
    out = []
    for method in methods:
        status = int(stream.readline().split()[1])
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b"" if method == "HEAD" else stream.read(int(headers.get("content-length", 0)))
        out.append((status, headers, body))
    return out


def test_ping_is_answered_while_every_pool_thread_is_busy(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "slow.py").write_text(SLOW_APP)
    w = start_worker(worker_config(tmp_path / "data", api={"apps_dir": str(apps), "threads": 1}))
    try:
        done = threading.Event()
        result = {}

        def slow():
            result["r"] = requests.get(w.url + "/slow", timeout=10)
            done.set()

        t = threading.Thread(target=slow)
        t.start()
        # the one pool thread is asleep in /slow for a second; a pooled request would queue behind it
        started = threading.Event()
        threading.Timer(0.3, started.set).start()
        started.wait()
        ping = w.get("/health/ping", timeout=5)
        assert not done.is_set(), "ping came back only after /slow: it waited for the pool"
        assert ping.status_code == 200 and ping.json()["data"]["node_id"].endswith(":api:0")
        assert ping.headers["x-request-id"] and ping.headers["x-content-type-options"] == "nosniff"
        t.join(10)
        assert result["r"].status_code == 200 and result["r"].json()["data"] == {"slept": True}
    finally:
        assert w.stop() == 0, w.output()[-2000:]


def test_pipelined_inline_and_pooled_requests_keep_their_order(tmp_path):
    w = start_worker(worker_config(tmp_path / "data"))
    try:
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as sock:
            head = "Host: 127.0.0.1\r\nX-Request-ID: {}\r\n\r\n"
            sock.sendall(
                (
                    "GET /health/ping HTTP/1.1\r\n"
                    + head.format("one")
                    + "GET /api/status HTTP/1.1\r\n"
                    + head.format("two")
                    + "GET /health/ping HTTP/1.1\r\n"
                    + head.format("three")
                    + "HEAD /health/ping HTTP/1.1\r\n"
                    + head.format("four")
                ).encode()
            )
            got = _responses(sock, ["GET", "GET", "GET", "HEAD"])
        assert [status for status, _, _ in got] == [200, 200, 200, 405]  # the route has no HEAD
        assert [h["x-request-id"] for _, h, _ in got] == ["one", "two", "three", "four"]
        assert b'"pid"' in got[0][2] and b'"pid"' in got[2][2] and b'"service":"appliance"' in got[1][2]
    finally:
        assert w.stop() == 0, w.output()[-2000:]


def test_bad_requests_on_the_ping_path_get_their_error_answers(tmp_path):
    w = start_worker(worker_config(tmp_path / "data"))
    try:
        assert requests.post(w.url + "/health/ping", timeout=10).status_code == 405  # not inline: POST
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as sock:
            sock.sendall(b"GET /health/ping HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert w.get("/health/ping").status_code == 200  # and the worker serves on
    finally:
        assert w.stop() == 0, w.output()[-2000:]


def test_ping_answers_503_while_the_pool_is_stuck_and_200_once_it_moves(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "slow.py").write_text(SLOW_APP.replace("time.sleep(1.0)", "time.sleep(float(req.get_param('s') or 1))"))
    w = start_worker(worker_config(tmp_path / "data", api={"apps_dir": str(apps), "threads": 1, "stall_seconds": 1}))
    try:
        results = []
        calls = [threading.Thread(target=lambda: results.append(requests.get(w.url + "/slow?s=3", timeout=20))) for _ in range(2)]
        for t in calls:
            t.start()
        # one /slow holds the only thread for 3 s, the other waits behind it: after a second with nothing finished, stalled
        deadline = time.monotonic() + 2.5
        stalled = None
        while time.monotonic() < deadline:
            r = w.get("/health/ping", timeout=5)
            if r.status_code == 503:
                stalled = r
                break
            time.sleep(0.1)
        assert stalled is not None, "ping never reported the stuck pool"
        assert stalled.json()["error"]["code"] == "worker_stalled" and stalled.headers["x-request-id"]
        for t in calls:
            t.join(20)
        assert [r.status_code for r in results] == [200, 200]
        assert w.get("/health/ping").status_code == 200  # nothing waits any more
    finally:
        assert w.stop() == 0, w.output()[-2000:]
