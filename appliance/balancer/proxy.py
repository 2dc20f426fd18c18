"""The per-request path: one client connection, from request bytes to the streamed answer.

Connection lifecycle (ClientConnection.state):

  IDLE ──first byte──> HEAD ──head parsed──> ADMIT ──admitted──> FORWARD ──answer end──> IDLE
                        │ header timeout: 408      │ 401/429/503          │ upstream lost before
                        │ bad framing: 4xx         │ (no upstream)        │ the answer: retry on
                        ▼                          ▼                      ▼ another one, else 502
                      closed                     answered              504 on read timeout

The work is split by job:
  proxy.py      this module: the asyncio Protocol (transport callbacks, back-pressure), the
                request framer's callbacks, deadlines, the answers the balancer makes itself,
                the end of each exchange (counts, access log, keep-alive or close)
  exchange.py   one request's trip upstream and back (Exchange: the upstream answer's handler)
  admission.py  token hook and rate limiter as one verdict
  writer.py     the bytes written (heads, chunking, keep-alive rules, error answers), no I/O
  ids.py        request and trace ids
  clients.py    who the client is behind trusted proxies, and its signed line

* ADMIT asks admission for a verdict; jwt mode is synchronous (no task is made), other
  hook modes and the Redis limiter run in one task per request. A limiter delay (zones
  without nodelay) is a loop timer.
* FORWARD streams both ways; no body is ever held whole (see exchange.py).
* Timeouts are deadlines (`self.deadline`) checked by the server's sweeper a
  few times a second, so the request path only stores a number.
* Pipelined requests wait in the framer until the answer before them is done;
  one the framer refused is answered (400, then close) only after them.
* Every request sent upstream carries X-Forwarded-For/-Proto/-Host, X-Real-IP and
  X-Appliance-Client: the client address (the peer, or the rightmost untrusted
  X-Forwarded-For hop behind trusted proxies) signed with the identity key, made once
  per address (Proxy.client_line). What the client sent under these names is dropped.

Everything computed once per process lives on `Proxy`; per request the path
reads top to bottom: parse, admit, pick, write, stream, count, log.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from typing import Any

from appliance import identity
from appliance.balancer import ids, pool
from appliance.balancer.admission import Admission, Verdict
from appliance.balancer.clients import ClientAddresses
from appliance.balancer.exchange import ADMIT, CLOSED, CONNECT, FORWARD, HEAD, IDLE, Exchange
from appliance.balancer.framing import CAPTURE, DROP, REQUEST_ROLES, ProtocolError, RequestFramer, RequestHead
from appliance.balancer.stats import BUCKETS, AccessLog, Stats, process_log_format
from appliance.balancer.writer import error_answer

log = logging.getLogger(__name__)

BACKLOG_MAX = 256 * 1024  # pipelined bytes held before reading from the client pauses
NEW_CONNECTION_GRACE = 1.0  # seconds a just-accepted connection has to send its request during a stop
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

# Headers the proxy replaces: captured (read, never forwarded) or dropped outright.
IDENTITY_HEADERS = (
    identity.HEADER_LOWER.encode(),
    identity.CLIENT_HEADER_LOWER.encode(),
    b"x-forwarded-user",
    b"x-remote-user",
)
PROXY_ROLES: dict[bytes, int] = {
    **REQUEST_ROLES,
    b"x-request-id": CAPTURE,
    b"traceparent": CAPTURE,
    b"x-forwarded-for": CAPTURE,
    b"x-forwarded-proto": DROP,
    b"x-forwarded-host": DROP,
    b"x-forwarded-port": DROP,
    b"x-real-ip": DROP,
    b"forwarded": DROP,
    **{name: DROP for name in IDENTITY_HEADERS},
}
PROXY_DROP_PREFIXES = (b"proxy-", b"x-user-")

_bisect = bisect.bisect_left
_request_ids = ids.request_ids


class Proxy:
    """What every client connection of this process shares, computed once at start."""

    def __init__(self, cfg: Any, upstreams: Any, limiter: Any = None, hook: Any = None, tls: bool = False):
        b = cfg.balancer
        self.loop: Any = None
        self.upstreams = upstreams  # upstreams.UpstreamTable: groups and routes
        self.limiter = limiter
        self.hook = hook
        self.tls = tls
        self.proto_line = b"x-forwarded-proto: https\r\n" if tls else b"x-forwarded-proto: http\r\n"
        self.hsts_line = b"strict-transport-security: max-age=%d\r\n" % b.hsts_max_age if tls and b.hsts_max_age else b""
        self.max_header_bytes = b.max_header_bytes
        self.max_body_bytes = b.max_body_bytes
        self.header_timeout = b.client_header_timeout
        self.body_timeout = b.client_body_timeout
        self.keepalive_timeout = b.keepalive_timeout
        self.connect_timeout = b.upstream_connect_timeout
        self.read_timeout = b.upstream_read_timeout
        self.max_connections = b.max_connections
        self.max_idle = b.upstream_keepalive
        self.retries = b.retries
        self.upstream_max_active = b.upstream_max_active or 2 * cfg.api.threads
        self.queue_timeout = b.upstream_queue_timeout
        self.retry_methods = IDEMPOTENT | {b"POST", b"PATCH"} if b.retry_non_idempotent else IDEMPOTENT
        clients = ClientAddresses(b.trusted_proxies, identity.key_bytes(cfg.secrets.identity_key))
        self.is_trusted = clients.is_trusted
        self.client_address = clients.client_address
        self.client_line = clients.client_line
        self.stats = Stats()
        self.admission = Admission(hook, limiter, self.stats)
        self.access = AccessLog(b.access_log, process_log_format(cfg.logging.format))
        self.connections: set[ClientConnection] = set()
        self.now = time.monotonic()  # coarse clock for deadlines, advanced by the sweeper
        self.closing = False

    def factory(self) -> ClientConnection:
        return ClientConnection(self)


class ClientConnection(asyncio.Protocol):
    """One client connection (an asyncio Protocol) and the request framer's handler.

    `ex` is the Exchange of the current request: a fresh one after every answer.
    """

    def __init__(self, proxy: Proxy):
        self.p = proxy
        self.framer = RequestFramer(
            self,
            max_header_bytes=proxy.max_header_bytes,
            max_body_bytes=proxy.max_body_bytes,
            roles=PROXY_ROLES,
            drop_prefixes=PROXY_DROP_PREFIXES,
        )
        self.transport: Any = None
        self.peer = ""
        self.forwarded_lines = b""  # X-Forwarded-For / X-Real-IP for an untrusted peer, made once
        self.peer_trusted = False
        self.state = IDLE
        self.deadline = 0.0
        self.opened = 0.0
        self.reading_paused = False
        self.writing_paused = False
        self.out: list[bytes] = []  # answer bytes of the current upstream read (shared by every Exchange)
        self.ex = Exchange(self)

    # -- transport callbacks ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        p = self.p
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "unix"
        # During a stop no new connection is accepted (the listeners are closed first); one that
        # made it in before (also from the listen backlog) is served, then closed.
        if len(p.connections) >= p.max_connections:
            answer, _ = error_answer(503, "service_unavailable", "too many connections", b"", b"", b"", close=True)
            transport.write(answer)
            transport.close()
            self.state = CLOSED
            return
        p.connections.add(self)
        p.stats.connections += 1
        transport.set_write_buffer_limits(pool.WRITE_HIGH_WATER)
        self.peer_trusted = p.is_trusted(self.peer)
        if not self.peer_trusted:
            ip = self.peer.encode("latin-1")
            self.forwarded_lines = (
                b"x-forwarded-for: " + ip + b"\r\nx-real-ip: " + ip + b"\r\n" + p.proto_line + p.client_line(self.peer, self.peer)
            )
        self.deadline = p.now + p.header_timeout
        self.opened = p.now

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE:
            self.state = HEAD
            self.deadline = self.p.now + self.p.header_timeout
        try:
            self.framer.feed(data)
        except ProtocolError as exc:
            self.client_error(exc)
            return
        if self.framer.backlog_bytes > BACKLOG_MAX:
            self.pause_client_reading()

    def eof_received(self) -> bool:
        # A half-closed client gets its answer (some clients shut down writing after the request).
        return self.state in (ADMIT, CONNECT, FORWARD)

    def connection_lost(self, exc: Exception | None) -> None:
        p = self.p
        if self in p.connections:
            p.connections.discard(self)
            p.stats.connections -= 1
        if self.state in (ADMIT, CONNECT, FORWARD):
            self.ex.abandon()
        self.state = CLOSED

    def pause_writing(self) -> None:
        self.writing_paused = True
        conn = self.ex.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        conn = self.ex.conn
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    def pause_client_reading(self) -> None:
        if not self.reading_paused and self.state != CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.reading_paused and self.state != CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- request framer callbacks -------------------------------------------------------
    def on_request(self, head: RequestHead) -> None:
        p = self.p
        ex = self.ex
        ex.head = head
        self.state = ADMIT
        ex.started = time.perf_counter()
        self.deadline = 0.0
        ex.request_id, ex.trace = _request_ids(head.captured)
        ex.path = path = head.path.decode("latin-1")
        ex.group = p.upstreams.route(path)
        if not head.keep_alive or p.closing:
            ex.keep_alive = False
        admission = p.admission
        public = admission.is_public(path)
        if not admission.in_place(public):
            ex.task = p.loop.create_task(self._admit_async(ex, public))
            return
        self.admitted(ex, admission.decide(head.method, path, head.headers, self.client_ip(), public))

    async def _admit_async(self, ex: Exchange, public: bool) -> None:
        head = ex.head
        assert head is not None
        try:
            verdict = await self.p.admission.decide_async(head.method, ex.path, head.headers, self.client_ip(), public)
        except Exception:
            log.exception("admission failed")
            if self.state == ADMIT and self.ex is ex:
                self.respond_error(500, "internal_error", "the request could not be checked")
            return
        finally:
            ex.task = None
        if self.state == ADMIT and self.ex is ex:
            self.admitted(ex, verdict)

    def admitted(self, ex: Exchange, verdict: Verdict) -> None:
        """Act on admission's verdict: refuse, forward after the zone's delay, or forward now."""
        ex.user_id = verdict.user_id
        if verdict.lines:
            ex.extra_response = verdict.lines
        if not verdict.ok:
            return self.respond_error(verdict.status, verdict.code, verdict.message, extra=verdict.extra, details=verdict.details)
        if verdict.delay > 0:
            ex.timer = self.p.loop.call_later(verdict.delay, self._delayed, ex, verdict.identity)
            return
        ex.dispatch(verdict.identity)

    def _delayed(self, ex: Exchange, identity: str | None) -> None:
        ex.timer = None
        if self.state == ADMIT and self.ex is ex:
            ex.dispatch(identity)

    def client_ip(self) -> str:
        head = self.ex.head
        if self.peer_trusted and head is not None:
            xff = head.captured.get(b"x-forwarded-for")
            if xff:
                return self.p.client_address(self.peer, xff)
        return self.peer

    def on_body(self, data: bytes) -> None:
        self.ex.on_body(data)

    def on_request_end(self) -> None:
        state = self.state
        if state == IDLE:
            # Answered already (e.g. a 401 given while the head was parsed): go on to the next request.
            self.release_next()
            return
        if state == CLOSED:
            return
        self.ex.on_body_end()

    # -- deadlines and failures ---------------------------------------------------------
    def on_deadline(self) -> None:
        """The sweeper found this connection past its deadline."""
        state = self.state
        ex = self.ex
        if state == IDLE:
            self.state = CLOSED
            self.transport.close()
        elif state == HEAD:
            ex.keep_alive = False
            self.respond_error(408, "request_timeout", "the request head did not arrive in time", close=True)
        elif state == CONNECT and ex.queued:
            ex.queued = False
            self.respond_error(503, "upstreams_busy", "every upstream server stayed busy; try again later")
        elif state == FORWARD and not ex.body_done:
            ex.abort_upstream()
            if ex.response_started:
                return self.drop()
            self.respond_error(408, "request_timeout", "the request body did not arrive in time", close=True)
        elif state == FORWARD:
            ex.abort_upstream()
            if ex.response_started:
                return self.drop()
            self.respond_error(504, "gateway_timeout", "the upstream did not answer in time")

    def drop(self) -> None:
        """An answer that began cannot be finished: the client connection is reset."""
        ex = self.ex
        self.out.clear()
        ex.vacate()
        self.state = CLOSED
        self.transport.abort()
        self._log(ex, ex.status or 502, None)

    def client_error(self, exc: ProtocolError) -> None:
        ex = self.ex
        if self.state in (ADMIT, CONNECT, FORWARD):
            ex.abandon()
            if ex.response_started:
                return self.drop()
        if ex.head is None:
            ex.request_id = ids.new_request_id()
        self.respond_error(exc.status, exc.code, exc.message, close=True)

    # -- answers the balancer makes itself ----------------------------------------------
    def respond_error(
        self, status: int, code: str, message: str, extra: bytes = b"", details: dict | None = None, close: bool = False
    ) -> None:
        if self.state == CLOSED:
            return
        ex = self.ex
        head = ex.head
        if close or (head is not None and head.has_body and not ex.body_done) or self.p.closing:
            ex.keep_alive = False  # an unread body would be taken for the next request
        answer, length = error_answer(
            status, code, message, ex.request_id, extra + ex.extra_response, self.p.hsts_line, not ex.keep_alive, details
        )
        ex.status = status
        ex.response_started = True
        self.transport.write(answer)
        ex.bytes_out += length
        self.finish()

    # -- the end of an exchange ---------------------------------------------------------
    def finish(self) -> None:
        p = self.p
        ex = self.ex
        upstream = ex.vacate()
        if upstream is not None:
            upstream.requests += 1
        self._log(ex, ex.status, upstream)
        if ex.timer is not None:
            ex.timer.cancel()
        keep = ex.keep_alive and not p.closing and self.state != CLOSED
        self.ex = Exchange(self)
        if not keep:
            self.state = CLOSED
            self.transport.close()
            return
        self.state = IDLE
        self.deadline = p.now + p.keepalive_timeout
        if self.reading_paused:
            self.resume_client_reading()
        if self.framer.busy:
            self.release_next()

    def release_next(self) -> None:
        """Go on to the next pipelined request, or answer the refusal of it (400 and close)."""
        try:
            self.framer.release()
        except ProtocolError as exc:
            self.client_error(exc)

    def _log(self, ex: Exchange, status: int, upstream: Any) -> None:
        stats = self.p.stats
        stats.status[status] = stats.status.get(status, 0) + 1
        stats.bytes_in += ex.bytes_in
        stats.bytes_out += ex.bytes_out
        if ex.started:
            duration = time.perf_counter() - ex.started
            group = ex.group
            if group is not None and upstream is not None:
                lat = stats.latency.get(group.name) or stats.latency_of(group.name)
                lat.counts[_bisect(BUCKETS, duration)] += 1
                lat.total += duration
        else:
            duration = 0.0
        access = self.p.access
        if access.enabled:
            head = ex.head
            access.line(
                ex.request_id,
                self.peer,
                head.method if head is not None else "-",
                ex.path,
                status,
                upstream.address if upstream is not None else None,
                ex.bytes_in,
                ex.bytes_out,
                duration,
                ex.user_id,
            )

    def close_if_idle(self, now: float) -> bool:
        """Graceful stop: close now when between requests.

        A connection accepted moments ago may have its request still in the
        kernel's buffer (not yet passed to data_received); closing it would
        reset the client, so it gets NEW_CONNECTION_GRACE seconds to show it.
        """
        if self.state in (IDLE, HEAD) and self.framer.idle and now - self.opened >= NEW_CONNECTION_GRACE:
            self.state = CLOSED
            self.transport.close()
            return True
        return False
