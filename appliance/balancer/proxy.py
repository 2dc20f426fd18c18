"""The per-request path: one client connection, from request bytes to the streamed answer.

Connection lifecycle (ClientConnection.state):

  IDLE ──first byte──> HEAD ──head parsed──> ADMIT ──admitted──> FORWARD ──answer end──> IDLE
                        │ header timeout: 408      │ 401/429/503          │ upstream lost before
                        │ bad framing: 4xx         │ (no upstream)        │ the answer: retry on
                        ▼                          ▼                      ▼ another one, else 502
                      closed                     answered              504 on read timeout

* ADMIT runs the token hook (jwt mode is synchronous: its coroutine finishes
  on its first step, so no task is made) and the rate limiter; a limiter
  delay (zones without nodelay) is a loop timer. Other hook modes and the
  Redis limiter run in one task per request.
* FORWARD: the request head is written to a keep-alive upstream connection
  (pool.py) or a new one; body pieces are forwarded as they arrive (re-chunked
  when the client sent chunked), and the answer is written to the client as
  it arrives, so no body is ever held whole. Up to REPLAY_MAX bytes of body
  are kept so an idempotent request can be retried when the upstream refuses
  or drops the connection before answering.
* Timeouts are deadlines (`self.deadline`) checked by the server's sweeper a
  few times a second, so the request path only stores a number.
* Pipelined requests wait in the framer until the answer before them is done;
  one the framer refused is answered (400, then close) only after them.
* Every request sent upstream carries X-Forwarded-For/-Proto/-Host, X-Real-IP and
  X-Appliance-Client: the client address (the peer, or the rightmost untrusted
  X-Forwarded-For hop behind trusted proxies) signed with the identity key, made once
  per address (Proxy.client_line). What the client sent under these names is dropped.

Everything computed once per process lives on `Proxy`; per request the path
below reads top to bottom: parse, admit, pick, write, stream, count, log.
"""

from __future__ import annotations

import asyncio
import binascii
import bisect
import ipaddress
import logging
import os
import re
import time
from typing import Any

from appliance import identity
from appliance.balancer import pool
from appliance.balancer.framing import CAPTURE, DROP, REQUEST_ROLES, ProtocolError, RequestFramer, RequestHead, ResponseHead
from appliance.balancer.picker import Group, Upstream
from appliance.balancer.stats import BUCKETS, AccessLog, Stats, process_log_format
from appliance.errors import error_body

log = logging.getLogger(__name__)

IDLE, HEAD, ADMIT, CONNECT, FORWARD, CLOSED = range(6)
REPLAY_MAX = 64 * 1024  # request body bytes kept for a retry
PENDING_MAX = 256 * 1024  # body bytes buffered while no upstream connection is ready
BACKLOG_MAX = 256 * 1024  # pipelined bytes held before reading from the client pauses
DEFER_MAX = 64 * 1024  # an unfinished answer with at most this much body left may wait one read to go out whole
NEW_CONNECTION_GRACE = 1.0  # seconds a just-accepted connection has to send its request during a stop
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

# Headers the proxy replaces: captured (read, never forwarded) or dropped outright.
IDENTITY_HEADERS = (
    identity.HEADER_LOWER.encode(),
    identity.CLIENT_HEADER_LOWER.encode(),
    b"x-forwarded-user",
    b"x-remote-user",
)
CLIENT_LINES_MAX = 4096  # signed X-Appliance-Client lines kept, one per client address
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

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
_REASONS = {
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
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# On every answer the balancer makes itself, as the api workers send them (appliance/api/middleware.py).
SECURITY_LINES = b"x-content-type-options: nosniff\r\nx-frame-options: DENY\r\nreferrer-policy: no-referrer\r\n"
ERROR_LINES = SECURITY_LINES + b"cache-control: no-store\r\n"
_hexlify = binascii.hexlify
_bisect = bisect.bisect_left
_urandom = os.urandom
_ID_POOL_BYTES = 24 * 256  # one getrandom call per 256 requests, not one per request
_id_pool = b""
_id_pos = 0


def _random_hex48() -> bytes:
    """48 random hex digits (trace id + parent id), sliced from a pool refilled from os.urandom."""
    global _id_pool, _id_pos
    pos = _id_pos
    if pos >= len(_id_pool):
        _id_pool = _hexlify(_urandom(_ID_POOL_BYTES))
        pos = 0
    _id_pos = pos + 48
    return _id_pool[pos : pos + 48]


_METHOD_STR = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE")}


def _method_str(method: bytes) -> str:
    return _METHOD_STR.get(method) or method.decode("latin-1")


def valid_traceparent(value: bytes) -> bool:
    m = _TRACEPARENT.fullmatch(value)
    return bool(m) and m.group(1) != b"ff" and m.group(2) != _ZERO_TRACE and m.group(3) != _ZERO_PARENT


class Proxy:
    """What every client connection of this process shares, computed once at start."""

    def __init__(self, cfg: Any, registry: Any, limiter: Any = None, hook: Any = None, tls: bool = False):
        b = cfg.balancer
        self.loop: Any = None
        self.registry = registry  # upstreams.UpstreamTable: groups and routes
        self.limiter = limiter
        self.limiter_async = limiter is not None and asyncio.iscoroutinefunction(limiter.decide)
        self.hook = hook
        # jwt and off hooks never await: they are called in place (check_sync), no task per request.
        self.hook_sync = hook is not None and getattr(hook, "mode", "") in ("jwt", "off")
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
        self.retry_methods = IDEMPOTENT | {b"POST", b"PATCH"} if b.retry_non_idempotent else IDEMPOTENT
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in b.trusted_proxies]
        self.client_key = identity.key_bytes(cfg.secrets.identity_key)
        self._client_lines: dict[str, bytes] = {}
        self.stats = Stats()
        self.access = AccessLog(b.access_log, process_log_format(cfg.logging.format))
        self.connections: set[ClientConnection] = set()
        self.now = time.monotonic()  # coarse clock for deadlines, advanced by the sweeper
        self.closing = False

    def is_trusted(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client_address(self, peer: str, forwarded_for: bytes) -> str:
        """The client behind trusted proxies: the rightmost X-Forwarded-For entry that is not one."""
        for hop in reversed(forwarded_for.split(b",")):
            addr = hop.strip().decode("latin-1")
            if addr and not self.is_trusted(addr):
                return addr
        return peer

    def client_line(self, address: str, peer: str) -> bytes:
        """The signed X-Appliance-Client line for a client address: one HMAC per address, then a lookup.

        An X-Forwarded-For hop that is no IP address (a trusted proxy passed it on) is not
        signed: the line names the peer instead.
        """
        line = self._client_lines.get(address)
        if line is None:
            try:
                canonical = str(ipaddress.ip_address(address))
            except ValueError:
                if address != peer:
                    return self.client_line(peer, peer)
                canonical = address  # a unix socket peer
            line = b"%s: %s\r\n" % (identity.CLIENT_HEADER_LOWER.encode(), identity.sign_client(canonical, self.client_key).encode())
            if len(self._client_lines) >= CLIENT_LINES_MAX:
                self._client_lines.clear()  # many distinct addresses: start over rather than track ages
            self._client_lines[address] = line
        return line

    def factory(self) -> ClientConnection:
        return ClientConnection(self)


class ClientConnection(asyncio.Protocol):
    """One client connection; the framer's handler and, during an exchange, the upstream answer's."""

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
        self.reading_paused = False
        self.writing_paused = False
        self.out: list[bytes] = []  # answer bytes of the current upstream read, not yet written
        self._reset()

    def _reset(self) -> None:
        self.head: RequestHead | None = None
        self.group: Group | None = None
        self.upstream: Upstream | None = None
        self.conn: pool.UpstreamConnection | None = None
        self.task: Any = None
        self.timer: Any = None
        self.tried: list[Upstream] | None = None
        self.request_bytes = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.kept: list[bytes] | None = []  # body pieces kept for a retry; None once too large
        self.kept_size = 0
        self.body_seen = False
        self.body_done = False
        self.response_started = False
        self.response_chunked = False
        self.keep_alive = True
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.request_id = b""
        self.path = "-"
        self.user_id: str | None = None
        self.extra_response = b""  # RateLimit-* lines for the answer
        self.upstream_keep_alive = False
        self.answer_left = -1  # body bytes of a Content-Length answer not yet read
        self.deferred = False  # one upstream read's output was held back (see defer_or_flush)

    # -- transport callbacks ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        p = self.p
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "unix"
        # During a stop no new connection is accepted (the listeners are closed first); one that
        # made it in before (also from the listen backlog) is served, then closed.
        if len(p.connections) >= p.max_connections:
            body = error_body("service_unavailable", "too many connections")
            transport.write(_error_head(503, len(body), b"", b"connection: close\r\n") + body)
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
            self._abandon()
        self.state = CLOSED

    def pause_writing(self) -> None:
        self.writing_paused = True
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        conn = self.conn
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
        self.head = head
        self.state = ADMIT
        self.started = time.perf_counter()
        self.deadline = 0.0
        captured = head.captured
        if not captured:  # the common case: no ids from the client, both made from one pool slice
            new = _random_hex48()
            rid = new[:32]
            trace = b"00-%s-%s-01" % (rid, new[32:])
        else:
            rid = captured.get(b"x-request-id")
            trace = captured.get(b"traceparent")
            if trace is None or not valid_traceparent(trace):
                new = _random_hex48()
                trace = b"00-%s-%s-01" % (new[:32], new[32:])
                if rid is None or not _REQUEST_ID.fullmatch(rid):
                    rid = new[:32]
            elif rid is None or not _REQUEST_ID.fullmatch(rid):
                rid = _random_hex48()[:32]
        self.request_id = rid
        self.trace = trace
        path = head.path.decode("latin-1")
        self.path = path
        self.group = p.registry.route(path)
        if not head.keep_alive or p.closing:
            self.keep_alive = False
        hook = p.hook
        public = hook is None or hook.is_public(path)
        if (not public and not p.hook_sync) or p.limiter_async:
            self.task = p.loop.create_task(self._admit_async(public))
            return
        identity = None
        if not public:
            result = hook.check_sync(_method_str(head.method), path, head.headers)
            if not result.ok:
                return self.refuse_auth(result)
            identity = result.identity_value
            self.user_id = result.user_id
        if p.limiter is not None:
            decision = p.limiter.decide(_method_str(head.method), path, self.client_ip(), self.user_id)
            if decision is not None and not self.apply_limit(decision, identity):
                return
        self.dispatch(identity)

    async def _admit_async(self, public: bool) -> None:
        p = self.p
        head = self.head
        assert head is not None
        identity = None
        try:
            if not public:
                result = await p.hook.check(head.method.decode("latin-1"), self.path, head.headers)
                if self.state != ADMIT:
                    return
                if not result.ok:
                    return self.refuse_auth(result)
                identity = result.identity_value
                self.user_id = result.user_id
            if p.limiter is not None:
                decision = p.limiter.decide(head.method.decode("latin-1"), self.path, self.client_ip(), self.user_id)
                if p.limiter_async:
                    decision = await decision
                if self.state != ADMIT:
                    return
                if decision is not None and not self.apply_limit(decision, identity):
                    return
        except Exception:
            log.exception("admission failed")
            if self.state == ADMIT:
                self.respond_error(500, "internal_error", "the request could not be checked")
            return
        finally:
            self.task = None
        if self.state == ADMIT:
            self.dispatch(identity)

    def client_ip(self) -> str:
        if self.peer_trusted and self.head is not None:
            xff = self.head.captured.get(b"x-forwarded-for")
            if xff:
                return self.p.client_address(self.peer, xff)
        return self.peer

    def apply_limit(self, decision: Any, identity: str | None) -> bool:
        """True to go on (now or after the zone's delay); False when answered 429 or delayed."""
        self.extra_response = b"".join(n + b": " + v + b"\r\n" for n, v in decision.headers())
        if not decision.allowed:
            stats = self.p.stats.rate_limited
            stats[decision.zone] = stats.get(decision.zone, 0) + 1
            self.respond_error(429, "rate_limited", "too many requests; retry later", details={"zone": decision.zone})
            return False
        if decision.delay > 0:
            self.timer = self.p.loop.call_later(decision.delay, self._delayed, identity)
            return False
        return True

    def _delayed(self, identity: str | None) -> None:
        self.timer = None
        if self.state == ADMIT:
            self.dispatch(identity)

    def refuse_auth(self, result: Any) -> None:
        stats = self.p.stats.auth_failures
        stats[result.code] = stats.get(result.code, 0) + 1
        extra = b"".join(n + b": " + v + b"\r\n" for n, v in result.headers())
        self.respond_error(result.status, result.code, result.message, extra=extra)

    def on_body(self, data: bytes) -> None:
        self.body_seen = True
        self.bytes_in += len(data)
        kept = self.kept
        if kept is not None:
            self.kept_size += len(data)
            if self.kept_size > REPLAY_MAX:
                self.kept = None
            else:
                kept.append(data)
        if self.state == FORWARD and self.conn is not None:
            self.conn.transport.write(self._frame(data))
            self.deadline = self.p.now + self.p.body_timeout
        elif self.state in (ADMIT, CONNECT):
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_MAX:
                self.pause_client_reading()
        # any other state: the answer was given early; the rest of the body is discarded

    def on_request_end(self) -> None:
        state = self.state
        if state == IDLE:
            # Answered already (e.g. a 401 given while the head was parsed): go on to the next request.
            self.release_next()
            return
        if state == CLOSED:
            return
        self.body_done = True
        if state == FORWARD and self.conn is not None:
            if self.head is not None and self.head.chunked:
                self.conn.transport.write(b"0\r\n\r\n")
            self.deadline = self.p.now + self.p.read_timeout

    def _frame(self, data: bytes) -> bytes:
        if self.head is not None and self.head.chunked:
            return b"%x\r\n" % len(data) + data + b"\r\n"
        return data

    # -- forwarding -----------------------------------------------------------------------
    def dispatch(self, identity: str | None) -> None:
        """Admitted: build the upstream request once, then pick an upstream and send."""
        head = self.head
        assert head is not None
        p = self.p
        start = head.memo
        if start is None:  # first delivery of this head: what comes from it alone is built once
            parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
            for n, v in head.headers:
                parts += (n, b": ", v, b"\r\n")
            if head.host:
                parts += (b"x-forwarded-host: ", head.host, b"\r\n")
            start = head.memo = b"".join(parts)
        if self.peer_trusted:
            xff = head.captured.get(b"x-forwarded-for")
            ip = self.peer.encode("latin-1")
            client = self.client_ip()
            real = client.encode("latin-1")
            forwarded = (
                b"x-forwarded-for: "
                + (xff + b", " + ip if xff else ip)
                + b"\r\nx-real-ip: "
                + real
                + b"\r\n"
                + p.proto_line
                + p.client_line(client, self.peer)
            )
        else:
            forwarded = self.forwarded_lines
        extra = b""
        if identity is not None:
            extra = b"x-appliance-identity: " + identity.encode("ascii") + b"\r\n"
        if head.chunked:
            extra += b"transfer-encoding: chunked\r\n"
        self.request_bytes = b"%s%sx-request-id: %s\r\ntraceparent: %s\r\n%s\r\n" % (start, forwarded, self.request_id, self.trace, extra)
        if head.expect and not self.body_seen and not self.body_done:
            self.transport.write(_CONTINUE)
        self.pick_and_send()

    def pick_and_send(self) -> None:
        group = self.group
        if group is None:
            return self.respond_error(503, "service_unavailable", "no upstream serves this route")
        upstream = group.pick(self.tried or ())
        if upstream is None:
            if self.tried:
                return self.respond_error(502, "bad_gateway", "the upstream servers could not be reached")
            return self.respond_error(503, "service_unavailable", "no upstream server is available")
        upstream.active += 1
        self.upstream = upstream
        idle = upstream.idle
        while idle:  # pool.acquire, inline: the warmest idle keep-alive connection
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return self.attach(conn)
        self.state = CONNECT
        self.deadline = 0.0
        self.task = self.p.loop.create_task(pool.connect(upstream, self.p.connect_timeout, self.p.max_header_bytes))
        self.task.add_done_callback(self._connected)

    def _connected(self, task: Any) -> None:
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.state != CONNECT:  # the client left meanwhile
            if exc is None:
                pool.release(task.result(), True, self.p.max_idle)
            return
        if exc is not None:
            timeout = isinstance(exc, asyncio.TimeoutError)
            return self.upstream_failed(504 if timeout else 502, "upstream connect timed out" if timeout else f"upstream refused: {exc}")
        self.attach(task.result())

    def attach(self, conn: pool.UpstreamConnection) -> None:
        p = self.p
        head = self.head
        assert head is not None
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            # The upstream closed between the connect and now (e.g. something on a dead worker's
            # port that accepts and closes at once). Nothing was sent: a retry is safe. uvloop
            # raises on a write to a closed transport and stdlib asyncio drops it silently; either
            # way no connection_lost would ever reach this exchange, so fail it here.
            conn.abort()
            return self.upstream_failed(502, "upstream closed the connection before the request was sent")
        self.conn = conn
        self.state = FORWARD
        conn.exchange = self
        framer = conn.framer
        framer.handler = self
        framer.reset(head.method == b"HEAD")
        parts = self.kept if self.tried and self.kept is not None else self.pending
        data = self.request_bytes
        if parts:
            data += b"".join([self._frame(d) for d in parts]) if head.chunked else b"".join(parts)
        self.pending = []
        self.pending_size = 0
        if self.body_done:
            if head.chunked:
                data += b"0\r\n\r\n"
            self.deadline = p.now + p.read_timeout
        else:
            self.deadline = p.now + p.body_timeout
            if self.reading_paused:
                self.resume_client_reading()
        try:
            transport.write(data)
        except RuntimeError:  # uvloop: closed under us after all; nothing reached the upstream
            self.conn = None
            conn.abort()
            return self.upstream_failed(502, "upstream closed the connection before the request was sent")
        if self.writing_paused:
            transport.pause_reading()

    # -- upstream answer callbacks (ResponseFramer handler) ------------------------------
    def on_response(self, rh: ResponseHead) -> None:
        # Held until the end of this upstream read (flush_out): head, body and end go out in one send.
        self.out.append(self._answer_head(rh))
        self.deadline = self.p.now + self.p.read_timeout

    def on_whole_response(self, rh: ResponseHead, body: bytes) -> None:
        """A whole Content-Length answer from one upstream read: one send, then the next request."""
        data = self._answer_head(rh)
        if body:
            self.bytes_out += len(body)
            data += body
        if self.state != CLOSED:
            self.transport.write(data)
        self._answered()

    def _answer_head(self, rh: ResponseHead) -> bytes:
        p = self.p
        head = self.head
        assert head is not None
        self.status = status = rh.status
        start = rh.memo
        if start is None:  # first delivery of this head: status line and headers joined once
            line = _STATUS_LINES.get(status) if rh.reason == _REASONS.get(status) else None
            # ready to send; the upstream's X-Request-ID was dropped by the framer
            start = rh.memo = (line or b"HTTP/1.1 %d %s\r\n" % (status, rh.reason)) + b"".join(rh.raw)
        lines = [start, b"x-request-id: ", self.request_id, b"\r\n"]
        if p.hsts_line:
            lines.append(p.hsts_line)
        if self.extra_response:
            lines.append(self.extra_response)
        self.upstream_keep_alive = rh.keep_alive
        self.answer_left = -1 if rh.no_body else rh.content_length
        if head.has_body and not self.body_done:
            self.keep_alive = False  # answered before the whole request arrived: the rest is not read
        if rh.no_body or rh.content_length >= 0:
            self.response_chunked = False
        elif head.version == "1.1":
            self.response_chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # an HTTP/1.0 client learns the end from the close
        if not self.keep_alive or p.closing:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif head.version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.response_started = True
        return b"".join(lines)

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.answer_left > 0:
            self.answer_left -= len(data)
        if self.response_chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)
        self.deadline = self.p.now + self.p.read_timeout

    def defer_or_flush(self) -> None:
        """After an upstream read that did not end the answer: send its output, or hold it for one read.

        Waitress now and then sends an answer's head before its small body; holding the
        head for the next read (once per answer, only when little is left) gives the
        client one send instead of two. The answer has begun either way: no retry.
        """
        if not self.deferred and 0 < self.answer_left <= DEFER_MAX:
            self.deferred = True
            return
        self.flush_out()

    def flush_out(self) -> None:
        """Write what the answer callbacks of the upstream reads so far produced, in one send."""
        out = self.out
        if self.state != CLOSED:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def on_response_end(self) -> None:
        out = self.out
        if self.response_chunked:
            out.append(b"0\r\n\r\n")
        if out:
            if self.state != CLOSED:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        self._answered()

    def _answered(self) -> None:
        """The whole answer was written: the upstream connection goes back, the exchange ends."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            pool.release(conn, self.body_done and self.upstream_keep_alive, self.p.max_idle)
        self.finish()

    # -- failures -----------------------------------------------------------------------
    def upstream_lost(self, conn: pool.UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed during the exchange."""
        if conn is not self.conn:
            return
        self.conn = None
        if self.response_started:
            self._count_failure()
            return self._drop_client()
        self.upstream_failed(502, "upstream closed the connection before answering")

    def upstream_broken(self, conn: pool.UpstreamConnection, exc: ProtocolError) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        conn.abort()
        self._count_failure()
        if self.response_started:
            return self._drop_client()
        self._count_out()
        self.respond_error(502, "bad_gateway", exc.message)

    def upstream_failed(self, status: int, message: str) -> None:
        """No answer from this upstream: retry elsewhere when allowed, else answer `status`."""
        upstream = self.upstream
        head = self.head
        assert head is not None
        self._count_failure()
        self._count_out()
        tried = self.tried
        if tried is None:
            tried = self.tried = []
        if upstream is not None:
            tried.append(upstream)
        p = self.p
        if (
            len(tried) <= p.retries
            and head.method in p.retry_methods
            and (self.kept is not None or not self.body_seen)
            and time.perf_counter() - self.started < p.read_timeout
            and not p.closing
        ):
            self.upstream = None
            return self.pick_and_send()
        code = "gateway_timeout" if status == 504 else "bad_gateway"
        self.respond_error(status, code, message)

    def _count_failure(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.failures += 1
            upstream.health.passive_failure(time.monotonic())

    def _count_out(self) -> None:
        """This exchange no longer occupies its upstream."""
        upstream = self.upstream
        if upstream is not None:
            upstream.active -= 1
            self.upstream = None

    def on_deadline(self) -> None:
        """The sweeper found this connection past its deadline."""
        state = self.state
        if state == IDLE:
            self.state = CLOSED
            self.transport.close()
        elif state == HEAD:
            self.keep_alive = False
            self.respond_error(408, "request_timeout", "the request head did not arrive in time", close=True)
        elif state == FORWARD and not self.body_done:
            self._abort_upstream()
            if self.response_started:
                return self._drop_client()
            self.respond_error(408, "request_timeout", "the request body did not arrive in time", close=True)
        elif state == FORWARD:
            self._abort_upstream()
            if self.response_started:
                return self._drop_client()
            self.respond_error(504, "gateway_timeout", "the upstream did not answer in time")

    def _abort_upstream(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self._count_failure()
        self._count_out()

    def _abandon(self) -> None:
        """The client left in the middle of an exchange."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self._count_out()

    def _drop_client(self) -> None:
        self.out.clear()
        self._count_out()
        self.state = CLOSED
        self.transport.abort()
        self._log(self.status or 502)

    def client_error(self, exc: ProtocolError) -> None:
        if self.state in (ADMIT, CONNECT, FORWARD) and self.response_started:
            self._abandon()
            return self._drop_client()
        if self.state in (ADMIT, CONNECT, FORWARD):
            self._abandon()
        if self.head is None:
            self.request_id = _random_hex48()[:32]
        self.respond_error(exc.status, exc.code, exc.message, close=True)

    # -- answers the balancer makes itself ----------------------------------------------
    def respond_error(
        self, status: int, code: str, message: str, extra: bytes = b"", details: dict | None = None, close: bool = False
    ) -> None:
        if self.state == CLOSED:
            return
        head = self.head
        if close or (head is not None and head.has_body and not self.body_done):
            self.keep_alive = False  # an unread body would be taken for the next request
        body = error_body(code, message, details=details, request_id=self.request_id.decode("latin-1") or None)
        extra += self.extra_response
        if not self.keep_alive or self.p.closing:
            self.keep_alive = False
            extra += b"connection: close\r\n"
        if self.p.hsts_line:
            extra += self.p.hsts_line
        if status == 401 and b"www-authenticate" not in extra.lower():
            extra += b'www-authenticate: Bearer realm="appliance"\r\n'
        self.status = status
        self.response_started = True
        self.transport.write(_error_head(status, len(body), self.request_id, extra) + body)
        self.bytes_out += len(body)
        self.finish()

    # -- the end of an exchange ---------------------------------------------------------
    def finish(self) -> None:
        p = self.p
        upstream = self.upstream
        if upstream is not None:
            upstream.active -= 1
            upstream.requests += 1
        self._log(self.status)
        if self.timer is not None:
            self.timer.cancel()
        keep = self.keep_alive and not p.closing and self.state != CLOSED
        self._reset()
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

    def _log(self, status: int) -> None:
        p = self.p
        stats = p.stats
        stats.status[status] = stats.status.get(status, 0) + 1
        stats.bytes_in += self.bytes_in
        stats.bytes_out += self.bytes_out
        if self.started:
            duration = time.perf_counter() - self.started
            group = self.group
            if group is not None and self.upstream is not None:
                lat = stats.latency.get(group.name) or stats.latency_of(group.name)
                lat.counts[_bisect(BUCKETS, duration)] += 1
                lat.total += duration
        else:
            duration = 0.0
        if p.access.enabled:
            head = self.head
            upstream = self.upstream
            p.access.line(
                self.request_id,
                self.peer,
                head.method if head is not None else "-",
                self.path,
                status,
                upstream.address if upstream is not None else None,
                self.bytes_in,
                self.bytes_out,
                duration,
                self.user_id,
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


def _error_head(status: int, length: int, request_id: bytes, extra: bytes) -> bytes:
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Error\r\n" % status
    rid = b"x-request-id: " + request_id + b"\r\n" if request_id else b""
    return line + b"content-type: application/json\r\ncontent-length: %d\r\n" % length + ERROR_LINES + rid + extra + b"\r\n"
