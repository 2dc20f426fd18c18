"""HTTP/1.1 writing without I/O: the bytes the proxy sends, as framing.py is the bytes it reads.

Every function returns bytes (or bytes and the framing it chose); nothing here
touches a socket, so the rules can be read and tested on their own:

  request_start / request_head   the request head sent upstream (what comes from the
                                 client's head alone is built once per head, `head.memo`)
  forwarded_lines                X-Forwarded-For / X-Real-IP / -Proto / X-Appliance-Client
  answer_head                    the upstream's answer head as sent to the client, and the
                                 framing and keep-alive rules for it: chunked to an HTTP/1.1
                                 client when the upstream gave no length, close-delimited to
                                 an HTTP/1.0 one, `connection: close` when the exchange ends
                                 the connection
  chunk / LAST_CHUNK             chunked transfer coding
  error_answer / error_head      the answers the balancer makes itself: JSON envelope,
                                 security header lines, no-store, the Bearer challenge on 401
"""

from __future__ import annotations

from typing import Any

from appliance.balancer.framing import RequestHead, ResponseHead
from appliance.errors import error_body

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CLOSE_LINE = b"connection: close\r\n"
KEEP_ALIVE_LINE = b"connection: keep-alive\r\n"
CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
# On every answer the balancer makes itself, as the api workers send them (appliance/api/middleware.py).
SECURITY_LINES = b"x-content-type-options: nosniff\r\nx-frame-options: DENY\r\nreferrer-policy: no-referrer\r\n"
ERROR_LINES = SECURITY_LINES + b"cache-control: no-store\r\n"
BEARER_CHALLENGE = b'www-authenticate: Bearer realm="appliance"\r\n'


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


def request_start(head: RequestHead) -> bytes:
    """Request line, forwarded headers and X-Forwarded-Host: what comes from the client's head alone.

    Built once per head (a pipelined head may be delivered again) and kept in `head.memo`.
    """
    start = head.memo
    if start is None:
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
        for n, v in head.headers:
            parts += (n, b": ", v, b"\r\n")
        if head.host:
            parts += (b"x-forwarded-host: ", head.host, b"\r\n")
        start = head.memo = b"".join(parts)
    return start


def forwarded_lines(forwarded_for: bytes, peer: bytes, client: bytes, proto_line: bytes, client_line: bytes) -> bytes:
    """The proxy headers of one request: the peer appended to the X-Forwarded-For chain the client sent."""
    return (
        b"x-forwarded-for: "
        + (forwarded_for + b", " + peer if forwarded_for else peer)
        + b"\r\nx-real-ip: "
        + client
        + b"\r\n"
        + proto_line
        + client_line
    )


def request_head(start: bytes, forwarded: bytes, request_id: bytes, trace: bytes, identity: str | None, chunked: bool) -> bytes:
    """The whole request head sent upstream (a chunked request is re-chunked on the way)."""
    extra = b""
    if identity is not None:
        extra = b"x-appliance-identity: " + identity.encode("ascii") + b"\r\n"
    if chunked:
        extra += CHUNKED_LINE
    return b"%s%sx-request-id: %s\r\ntraceparent: %s\r\n%s\r\n" % (start, forwarded, request_id, trace, extra)


def answer_head(rh: ResponseHead, request_id: bytes, hsts: bytes, extra: bytes, version: str, keep_alive: bool) -> tuple[bytes, bool, bool]:
    """The answer head for the client: (bytes, chunked, keep_alive).

    `keep_alive` is whether the exchange may keep the connection; it ends up False when
    the answer's end can only be told by closing (no length, HTTP/1.0 client).
    """
    start = rh.memo
    if start is None:  # first delivery of this head: status line and headers joined once
        line = STATUS_LINES.get(rh.status) if rh.reason == REASONS.get(rh.status) else None
        # ready to send; the upstream's X-Request-ID was dropped by the framer
        start = rh.memo = (line or b"HTTP/1.1 %d %s\r\n" % (rh.status, rh.reason)) + b"".join(rh.raw)
    lines = [start, b"x-request-id: ", request_id, b"\r\n"]
    if hsts:
        lines.append(hsts)
    if extra:
        lines.append(extra)
    chunked = False
    if rh.no_body or rh.content_length >= 0:
        pass
    elif version == "1.1":
        chunked = True
        lines.append(CHUNKED_LINE)
    else:
        keep_alive = False  # an HTTP/1.0 client learns the end from the close
    if not keep_alive:
        lines.append(CLOSE_LINE)
    elif version == "1.0":
        lines.append(KEEP_ALIVE_LINE)
    lines.append(b"\r\n")
    return b"".join(lines), chunked, keep_alive


def error_head(status: int, length: int, request_id: bytes, extra: bytes) -> bytes:
    """The head of an answer the balancer makes itself (JSON body of `length` bytes)."""
    line = STATUS_LINES.get(status) or b"HTTP/1.1 %d Error\r\n" % status
    rid = b"x-request-id: " + request_id + b"\r\n" if request_id else b""
    return line + b"content-type: application/json\r\ncontent-length: %d\r\n" % length + ERROR_LINES + rid + extra + b"\r\n"


def error_answer(
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    extra: bytes,
    hsts: bytes,
    close: bool,
    details: dict[str, Any] | None = None,
) -> tuple[bytes, int]:
    """A whole error answer (head and JSON envelope) and the body's length.

    `extra` is header lines for this answer (a refusal's challenge, RateLimit-*); a 401
    without its own WWW-Authenticate gets the Bearer challenge.
    """
    body = error_body(code, message, details=details, request_id=request_id.decode("latin-1") or None)
    if close:
        extra += CLOSE_LINE
    if hsts:
        extra += hsts
    if status == 401 and b"www-authenticate" not in extra.lower():
        extra += BEARER_CHALLENGE
    return error_head(status, len(body), request_id, extra) + body, len(body)
