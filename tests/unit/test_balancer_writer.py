"""The balancer's writing rules without sockets: answer heads, keep-alive, chunking, request heads, error answers."""

from __future__ import annotations

import orjson
import pytest

from appliance.balancer import writer
from appliance.balancer.framing import RequestFramer, RequestHead, ResponseFramer, ResponseHead


class Heads:
    def __init__(self) -> None:
        self.heads: list[RequestHead | ResponseHead] = []

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_response(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_whole_response(self, head: ResponseHead, body: bytes) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...


def answer(raw: bytes) -> ResponseHead:
    rec = Heads()
    ResponseFramer(rec).feed(raw)
    return rec.heads[0]  # type: ignore[return-value]


SIZED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
UNSIZED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nstream"


@pytest.mark.parametrize(
    ("raw", "version", "keep", "chunked", "kept", "connection"),
    [
        (SIZED, "1.1", True, False, True, None),
        (SIZED, "1.0", True, False, True, b"connection: keep-alive\r\n"),
        (SIZED, "1.1", False, False, False, b"connection: close\r\n"),
        (UNSIZED, "1.1", True, True, True, None),  # no length: re-chunked for an HTTP/1.1 client
        (UNSIZED, "1.0", True, False, False, b"connection: close\r\n"),  # an HTTP/1.0 client learns the end from the close
    ],
)
def test_answer_heads_choose_framing_and_keep_alive(raw, version, keep, chunked, kept, connection) -> None:
    head, is_chunked, keep_alive = writer.answer_head(answer(raw), b"rid1", b"", b"ratelimit: 1\r\n", version, keep)
    assert (is_chunked, keep_alive) == (chunked, kept)
    assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n") and head.endswith(b"\r\n\r\n")
    assert b"x-request-id: rid1\r\n" in head and b"ratelimit: 1\r\n" in head
    assert (b"transfer-encoding: chunked\r\n" in head) == chunked
    if connection is None:
        assert b"connection:" not in head
    else:
        assert connection in head


def test_an_answer_head_is_joined_once_and_the_request_id_is_per_request() -> None:
    rh = answer(SIZED)
    first, _, _ = writer.answer_head(rh, b"a", b"", b"", "1.1", True)
    assert rh.memo is not None
    second, _, _ = writer.answer_head(rh, b"b", b"hsts: 1\r\n", b"", "1.1", True)
    assert first.startswith(rh.memo) and second.startswith(rh.memo)
    assert b"x-request-id: b\r\nhsts: 1\r\n" in second


def test_request_heads_carry_the_ids_identity_and_proxy_lines() -> None:
    rec = Heads()
    RequestFramer(rec).feed(b"POST /api/x?q=1 HTTP/1.1\r\nhost: example.test\r\ntransfer-encoding: chunked\r\n\r\n")
    head: RequestHead = rec.heads[0]  # type: ignore[assignment]
    start = writer.request_start(head)
    assert writer.request_start(head) is start  # built once per head
    fwd = writer.forwarded_lines(b"10.0.0.1", b"127.0.0.1", b"10.0.0.1", b"x-forwarded-proto: http\r\n", b"x-appliance-client: s\r\n")
    assert fwd.startswith(b"x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-real-ip: 10.0.0.1\r\n")
    out = writer.request_head(start, fwd, b"rid", b"00-t-p-01", "signed", head.chunked)
    assert out.startswith(b"POST /api/x?q=1 HTTP/1.1\r\n") and out.endswith(b"\r\n\r\n")
    for line in (b"x-forwarded-host: example.test\r\n", b"x-request-id: rid\r\n", b"traceparent: 00-t-p-01\r\n"):
        assert line in out
    assert b"x-appliance-identity: signed\r\ntransfer-encoding: chunked\r\n\r\n" in out
    assert writer.chunk(b"hello") == b"5\r\nhello\r\n"


def test_error_answers_are_the_envelope_with_a_challenge_on_401_only() -> None:
    data, length = writer.error_answer(401, "missing_token", "no", b"rid", b"", b"", close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert len(body) == length and orjson.loads(body)["error"]["code"] == "missing_token"
    assert b'www-authenticate: Bearer realm="appliance"\r\n\r\n' in data and b"connection: close" not in head
    own = b'www-authenticate: Bearer error="invalid_token"\r\n'
    data, _ = writer.error_answer(401, "invalid_token", "no", b"rid", own, b"", close=True)
    assert data.count(b"www-authenticate") == 1 and b"connection: close\r\n" in data
    data, _ = writer.error_answer(
        429, "rate_limited", "slow", b"", b"retry-after: 1\r\n", b"hsts: 1\r\n", close=False, details={"zone": "z"}
    )
    assert b"www-authenticate" not in data and b"x-request-id" not in data and b"retry-after: 1\r\nhsts: 1\r\n" in data
    assert orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]["details"] == {"zone": "z"}
