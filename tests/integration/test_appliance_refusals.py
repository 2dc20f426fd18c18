"""A refused request gets its 400 from a whole appliance, whose children are forked from the template.

The balancer answers a target it refuses (encoded '\\' or '/', dot segments) with a 400 in the
error envelope. That held when the balancer ran on its own but not when it was forked from the
template: the forked child ran inside the template's `except BecomeChild` block, so httptools
reported the framer's ProtocolError only as that exception's context and the connection was
closed without an answer (found by schemathesis as "connection closed without response").
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.integration.supervised import Appliance

REFUSED = ["/tasks/status/%5C", "/tasks/status/%C3%A9%5C%C3%9E%40%2Ck", "/a%2fb", "/api/%2e%2e/users", "/api/./protected"]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    app = Appliance(tmp_path_factory.mktemp("refusals"), api_workers=1, task_workers=1)
    app.start()
    try:
        yield app
    finally:
        assert app.stop() == 0, app.log.read_text()[-3000:]


def _answer(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(_length(data)):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.parametrize("target", REFUSED)
def test_a_refused_target_is_answered_400_in_the_envelope(appliance, target):
    data = _answer(appliance.port, target)
    assert data.startswith(b"HTTP/1.1 400 "), (target, data[:200], appliance.log.read_text()[-2000:])
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == "error" and body["error"]["code"], body


def test_the_balancer_logged_no_transport_error(appliance):
    for target in REFUSED:
        _answer(appliance.port, target)
    assert "Fatal error on transport" not in appliance.log.read_text()
