"""Keep-alive connections to upstreams: a thin asyncio Protocol and a LIFO idle list per upstream.

An UpstreamConnection carries one exchange at a time. While it does, its
ResponseFramer's handler is that Exchange (exchange.py), so answer bytes go
from the upstream socket through llhttp straight into the exchange's callbacks
with no hop in between. Between exchanges the connection
sits in its Upstream's `idle` list; the most recently used one is reused first
(warm), and ones idle longer than the idle timeout are closed by the server's
sweeper. An idle connection that the upstream closes removes itself.

Back-pressure: when the upstream cannot take request body bytes as fast as the
client sends them, `pause_writing` pauses reading from the client, and the
client's own `pause_writing` pauses reading from the upstream.

Answer bytes produced while one upstream read is parsed (head, body pieces,
chunk framing, the end) are collected on the Exchange and written
with one send at the end of that read, or at the answer's end; a small answer
whose body is still coming may wait one more read (Exchange.defer_or_flush).

`fetch` is the balancer's own client over the same connections and framer: one
whole answer to a request it makes itself (the subrequest auth hook).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from appliance.balancer.framing import DROP, RESPONSE_ROLES, ProtocolError, ResponseFramer
from appliance.balancer.picker import Upstream

WRITE_HIGH_WATER = 256 * 1024
# The proxy sets X-Request-ID on every answer itself: the upstream's is dropped while parsing.
ANSWER_ROLES = {**RESPONSE_ROLES, b"x-request-id": DROP}


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("upstream", "transport", "framer", "exchange", "idle_since", "closed", "feeding", "parked", "unsolicited")

    def __init__(self, upstream: Upstream, max_header_bytes: int):
        self.upstream = upstream
        self.transport: Any = None
        self.framer = ResponseFramer(
            self, max_header_bytes=max_header_bytes, roles=ANSWER_ROLES, volatile=b"x-request-id"
        )  # handler replaced per exchange
        self.exchange: Any = None  # the Exchange being served
        self.idle_since = 0.0
        self.closed = False
        self.feeding = False  # inside data_received: not handed to another exchange before that read is done
        self.parked: tuple[bool, int] | None = None  # (reusable, max_idle) of a release made while feeding
        self.unsolicited = False  # the upstream sent an answer nobody asked for

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.transport.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.feeding = True
        try:
            self.framer.feed(data)
        except ProtocolError as exc:
            if self.exchange is ex:
                ex.upstream_broken(self, exc)
            else:  # bytes after an answer that already ended: never hand this connection out again
                self.abort()
            return
        finally:
            self.feeding = False
            parked, self.parked = self.parked, None
            if parked is not None:  # the answer ended in this read: back to the pool now, unless more came
                release(self, parked[0] and not self.unsolicited, parked[1])
        if ex.out:  # answer bytes of this read that did not end the answer
            ex.defer_or_flush()

    # The framer's handler once the exchange ended within a read: what follows is no answer to anyone.
    def on_response(self, head: Any) -> None:
        self.unsolicited = True

    def on_response_body(self, data: bytes) -> None:
        self.unsolicited = True

    def on_response_end(self) -> None:
        self.unsolicited = True

    def on_whole_response(self, head: Any, body: bytes) -> None:
        self.unsolicited = True

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is not None:
            self.framer.feed_eof()  # ends a close-delimited answer, if that is what this was
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        idle = self.upstream.idle
        if self in idle:
            idle.remove(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.pause_client_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.resume_client_reading()

    def abort(self) -> None:
        self.exchange = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def acquire(upstream: Upstream) -> UpstreamConnection | None:
    """An idle keep-alive connection to `upstream`, or None."""
    idle = upstream.idle
    while idle:
        conn = idle.pop()
        if not conn.closed and not conn.transport.is_closing():
            return conn
    return None


def release(conn: UpstreamConnection, reusable: bool, max_idle: int) -> None:
    """Hand a connection back after an exchange; it is kept only when whole and wanted."""
    conn.exchange = None
    if conn.feeding:
        # Its read is still being parsed: bytes after this answer must not become the answer to
        # the next exchange (which could pick this connection at once). Done after the read.
        conn.parked = (reusable, max_idle)
        conn.framer.handler = conn
        return
    upstream = conn.upstream
    if reusable and not conn.closed and not upstream.removed and len(upstream.idle) < max_idle:
        conn.idle_since = time.monotonic()
        upstream.idle.append(conn)
    else:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()


async def connect(upstream: Upstream, timeout: float, max_header_bytes: int, ssl: Any = None) -> UpstreamConnection:
    """A new connection to `upstream` (TLS with the `ssl` context); raises OSError or asyncio.TimeoutError."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(
            lambda: UpstreamConnection(upstream, max_header_bytes),
            upstream.host,
            upstream.port,
            ssl=ssl,
            server_hostname=upstream.host if ssl is not None else None,
        ),
        timeout,
    )
    return conn


def close_idle(upstream: Upstream, older_than: float | None = None) -> int:
    """Close idle connections (all, or those idle since before `older_than`); return how many."""
    keep, closed = [], 0
    for conn in upstream.idle:
        if older_than is None or conn.idle_since < older_than:
            conn.closed = True
            conn.transport.close()
            closed += 1
        else:
            keep.append(conn)
    upstream.idle[:] = keep
    return closed


# -- the balancer as a client of its own: one whole answer (the subrequest auth hook) ----------
FETCH_MAX_HEAD = 65536
FETCH_IDLE = 8  # keep-alive connections kept per fetched upstream


async def fetch(upstream: Upstream, request: bytes, connect_timeout: float, ssl: Any = None, max_body: int = 65536) -> tuple[Any, bytes]:
    """Send `request` (a whole request head, no body) and return (ResponseHead, body) of the answer.

    Over the same keep-alive connections and ResponseFramer the proxy uses; an idle connection the
    peer closed meanwhile is skipped (its failure before any answer), then a new one is opened.
    Raises OSError, EOFError, asyncio.TimeoutError or ProtocolError; a caller's timeout that
    cancels it closes the connection in use.
    """
    while (conn := acquire(upstream)) is not None:
        try:
            return await _roundtrip(conn, request, max_body)
        except (OSError, EOFError, ProtocolError):
            conn.abort()
    conn = await connect(upstream, connect_timeout, FETCH_MAX_HEAD, ssl)
    return await _roundtrip(conn, request, max_body)


async def _roundtrip(conn: UpstreamConnection, request: bytes, max_body: int) -> tuple[Any, bytes]:
    answer = _Collector(asyncio.get_running_loop().create_future(), conn, max_body)
    conn.exchange = answer
    conn.framer.handler = answer
    conn.framer.reset(False)
    try:
        conn.transport.write(request)
    except RuntimeError as exc:  # uvloop: the transport closed under us
        raise EOFError("the connection closed before the request was sent") from exc
    try:
        return await answer.future
    except BaseException:  # a failure, or a timeout cancelled us: this connection is done
        answer.conn = None
        conn.exchange = None
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()  # a FIN, as a client that gives up sends (the peer may still be writing)
        raise


class _Collector:
    """One fetched answer, collected whole: the ResponseFramer's handler and the connection's exchange."""

    __slots__ = ("body", "conn", "future", "head", "max_body", "out", "size")

    def __init__(self, future: asyncio.Future[tuple[Any, bytes]], conn: UpstreamConnection, max_body: int):
        self.future = future
        self.conn: UpstreamConnection | None = conn
        self.max_body = max_body
        self.head: Any = None
        self.body: list[bytes] = []
        self.size = 0
        self.out: list[bytes] = []  # nothing is relayed to a client: never anything to flush

    def on_response(self, head: Any) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_body:
            return self._fail(EOFError("the answer is too large"))
        self.body.append(data)

    def on_whole_response(self, head: Any, body: bytes) -> None:
        self.head = head
        if body:
            self.on_response_body(body)
        self.on_response_end()

    def on_response_end(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None or self.future.done():
            return
        release(conn, self.head.keep_alive, FETCH_IDLE)
        self.future.set_result((self.head, b"".join(self.body)))

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        self.conn = None
        self._fail(EOFError("the connection closed before the answer"))

    def upstream_broken(self, conn: UpstreamConnection, exc: ProtocolError) -> None:
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if not self.future.done():
            self.future.set_exception(exc)

    def defer_or_flush(self) -> None:
        pass

    def pause_client_reading(self) -> None:  # no client to hold back
        pass

    def resume_client_reading(self) -> None:
        pass
