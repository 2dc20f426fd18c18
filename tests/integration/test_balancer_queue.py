"""The balancer's line for upstream slots ([balancer] upstream_max_active, upstream_queue_timeout), a real
balancer process in front of a real upstream process: requests beyond the slots wait their turn, first come
first served; one that waits too long gets a 503; one whose client left takes no slot."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_balancer_proxy import get, stack

pytestmark = pytest.mark.timeout(120)


def _get_later(s: Any, path: str, delay: float, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        status, body, _ = get(s.client(timeout=30), path)
        out[path] = (status, body, time.monotonic())

    t = threading.Thread(target=run)
    t.start()
    return t


def test_requests_beyond_the_slots_wait_their_turn_first_come_first_served(tmp_path: Path) -> None:
    with stack(tmp_path, workers=1, upstream_max_active=1) as s:
        done: dict[str, Any] = {}
        t0 = time.monotonic()
        paths = [f"/slow?s=0.4&n={i}" for i in range(4)]
        threads = [_get_later(s, p, 0.05 * i, done) for i, p in enumerate(paths)]
        for t in threads:
            t.join(30)
        assert all(done[p][0] == 200 for p in paths), done
        finished = [done[p][2] - t0 for p in paths]
        assert finished == sorted(finished)  # in the order they came
        gaps = [b - a for a, b in zip(finished, finished[1:], strict=False)]
        assert min(gaps) > 0.3, finished  # one at a time on the upstream: each waited for the one before
        seen = [e["path"] for e in json.loads(get(s.client(), "/seen")[1])["seen"] if e["path"].startswith("/slow")]
        assert seen == paths


def test_a_request_that_waits_too_long_gets_a_503_and_the_line_goes_on(tmp_path: Path) -> None:
    with stack(tmp_path, workers=1, upstream_max_active=1, upstream_queue_timeout=0.5) as s:
        done: dict[str, Any] = {}
        first = _get_later(s, "/slow?s=1.5", 0, done)
        time.sleep(0.2)
        t0 = time.monotonic()
        status, body, _ = get(s.client(), "/whoami")
        waited = time.monotonic() - t0
        assert status == 503 and 0.4 < waited < 1.2, (status, waited)
        assert json.loads(body)["error"]["code"] == "upstreams_busy"
        first.join(10)
        assert done["/slow?s=1.5"][0] == 200
        assert get(s.client(), "/whoami")[0] == 200  # the slot is free again


def test_a_client_that_leaves_the_line_takes_no_slot(tmp_path: Path) -> None:
    with stack(tmp_path, workers=1, upstream_max_active=1) as s:
        done: dict[str, Any] = {}
        first = _get_later(s, "/slow?s=0.8", 0, done)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", s.port)) as leaver:  # waits in the line, then resets
            # A reset, not a FIN: a client that only shut down its writing still gets its answer.
            leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leaver.sendall(b"GET /slow?s=5&n=left HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
        after = _get_later(s, "/slow?s=0.1&n=after", 0, done)
        first.join(10)
        after.join(10)
        assert done["/slow?s=0.1&n=after"][0] == 200
        assert done["/slow?s=0.1&n=after"][2] - done["/slow?s=0.8"][2] < 1.0  # not behind a 5 s request nobody waits for
        seen = [e["path"] for e in json.loads(get(s.client(), "/seen")[1])["seen"]]
        assert "/slow?s=5&n=left" not in seen
