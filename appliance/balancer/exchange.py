"""One request's trip upstream and back: the Exchange, openly the upstream answer's handler.

A ClientConnection (proxy.py) makes one Exchange per request. The Exchange holds
everything that lives as long as that request (head, ids, the picked upstream and
its connection, body pieces kept for a retry, the answer's framing, byte counts) and
does the upstream half of the path:

  dispatch      the request head for upstream is built (writer.py), an upstream picked
                (least connections in the route's group) and an idle keep-alive connection
                taken (pool.acquire) or a new one opened; head and any body that came
                already go out in one write
  body          later body pieces are forwarded as they arrive (re-chunked when the client
                sent chunked); up to REPLAY_MAX bytes are kept so that an idempotent request
                can be retried on another upstream when this one refuses or drops it before
                answering
  answer        while attached, the Exchange is the handler of the upstream connection's
                ResponseFramer (pool.py): on_response / on_response_body / on_response_end /
                on_whole_response turn the answer into client bytes (writer.answer_head,
                chunking), collected in `out` and sent once per upstream read

An upstream is occupied by the exchange from the pick to `vacate` (its `active`
count, which least-connection picking reads): one increment, one decrement.
At most [balancer] upstream_max_active requests (per weight) are in flight on one
upstream: when even the least loaded has that many, the request waits in its group's
line (`wait_for_slot`, first come first served, in the CONNECT state, its body
buffered) until a vacate frees a slot, or answers 503 after upstream_queue_timeout.
A worker then holds about as many requests as it has threads, and the rest wait
here, in order, instead of in a worker's loop thread (waitress reads every
connection it holds; with some 80 of them on a busy worker a request waited a
second or more behind the others while the median waited 100 ms).
The connection states (IDLE ... CLOSED) are the client connection's; the
Exchange moves it through CONNECT and FORWARD.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from appliance.balancer import pool, writer
from appliance.balancer.framing import ProtocolError, RequestHead, ResponseHead
from appliance.balancer.picker import Group, Upstream

IDLE, HEAD, ADMIT, CONNECT, FORWARD, CLOSED = range(6)
REPLAY_MAX = 64 * 1024  # request body bytes kept for a retry
PENDING_MAX = 256 * 1024  # body bytes buffered while no upstream connection is ready
DEFER_MAX = 64 * 1024  # an unfinished answer with at most this much body left may wait one read to go out whole

_chunk = writer.chunk
_answer_head = writer.answer_head
_LAST_CHUNK = writer.LAST_CHUNK


class Exchange:
    """One request and its answer; the upstream ResponseFramer's handler while attached."""

    __slots__ = (
        "answer_left",
        "body_done",
        "body_seen",
        "bytes_in",
        "bytes_out",
        "client",
        "conn",
        "deferred",
        "extra_response",
        "group",
        "head",
        "keep_alive",
        "kept",
        "kept_size",
        "out",
        "p",
        "path",
        "pending",
        "pending_size",
        "request_bytes",
        "request_id",
        "response_chunked",
        "response_started",
        "started",
        "status",
        "task",
        "timer",
        "trace",
        "tried",
        "upstream",
        "upstream_keep_alive",
        "user_id",
        "queued",
    )

    def __init__(self, client: Any):
        self.client = client  # the ClientConnection this request came on
        self.p = client.p
        self.out: list[bytes] = client.out  # answer bytes of the current upstream read, not yet written
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
        self.trace = b""
        self.path = "-"
        self.user_id: str | None = None
        self.extra_response = b""  # RateLimit-* lines for the answer
        self.upstream_keep_alive = False
        self.answer_left = -1  # body bytes of a Content-Length answer not yet read
        self.deferred = False  # one upstream read's output was held back (see defer_or_flush)
        self.queued = False  # waiting in its group's line for an upstream slot (wait_for_slot)

    # -- the request body ---------------------------------------------------------------
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
        client = self.client
        state = client.state
        if state == FORWARD and self.conn is not None:
            self.conn.transport.write(self._frame(data))
            client.deadline = self.p.now + self.p.body_timeout
        elif state == ADMIT or state == CONNECT:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_MAX:
                client.pause_client_reading()
        # any other state: the answer was given early; the rest of the body is discarded

    def on_body_end(self) -> None:
        self.body_done = True
        if self.client.state == FORWARD and self.conn is not None:
            if self.head is not None and self.head.chunked:
                self.conn.transport.write(_LAST_CHUNK)
            self.client.deadline = self.p.now + self.p.read_timeout

    def _frame(self, data: bytes) -> bytes:
        if self.head is not None and self.head.chunked:
            return _chunk(data)
        return data

    # -- forwarding -----------------------------------------------------------------------
    def dispatch(self, identity: str | None) -> None:
        """Admitted: build the upstream request once, then pick an upstream and send."""
        head = self.head
        assert head is not None
        client = self.client
        if client.peer_trusted:
            p = self.p
            ip = client.peer
            real = client.client_ip()
            forwarded = writer.forwarded_lines(
                head.captured.get(b"x-forwarded-for") or b"",
                ip.encode("latin-1"),
                real.encode("latin-1"),
                p.proto_line,
                p.client_line(real, ip),
            )
        else:
            forwarded = client.forwarded_lines
        self.request_bytes = writer.request_head(writer.request_start(head), forwarded, self.request_id, self.trace, identity, head.chunked)
        if head.expect and not self.body_seen and not self.body_done:
            client.transport.write(writer.CONTINUE)
        self.pick_and_send()

    def pick_and_send(self) -> None:
        group = self.group
        if group is None:
            return self.client.respond_error(503, "service_unavailable", "no upstream serves this route")
        most = self.p.upstream_max_active
        if group.waiting and not group.waking:  # others came first: a free slot is theirs
            wake_group(group, most)
            if group.waiting:
                return self.wait_for_slot(group)
        upstream = group.pick(self.tried or ())
        if upstream is None:
            if self.tried:
                return self.client.respond_error(502, "bad_gateway", "the upstream servers could not be reached")
            return self.client.respond_error(503, "service_unavailable", "no upstream server is available")
        if upstream.active * upstream.inv_weight >= most:  # the least loaded is full: so is every other
            upstream.served -= 1  # not handed out after all (the picker's tie-break counts)
            return self.wait_for_slot(group)
        upstream.active += 1  # occupied until vacate()
        self.upstream = upstream
        conn = pool.acquire(upstream)
        if conn is not None:
            return self.attach(conn)
        p = self.p
        self.client.state = CONNECT
        self.client.deadline = 0.0
        self.task = p.loop.create_task(pool.connect(upstream, p.connect_timeout, p.max_header_bytes))
        self.task.add_done_callback(self._connected)

    def wait_for_slot(self, group: Group) -> None:
        """Every upstream of the group is full: wait at the end of its line; wake_group sends it on."""
        self.queued = True
        group.waiting.append(self)
        client = self.client
        client.state = CONNECT
        client.deadline = time.monotonic() + self.p.queue_timeout  # not the sweeper's coarse clock: it may lag 0.25 s

    def _connected(self, task: Any) -> None:
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.client.state != CONNECT or self.client.ex is not self:  # the client left meanwhile
            if exc is None:
                pool.release(task.result(), True, self.p.max_idle)
            return
        if exc is not None:
            timeout = isinstance(exc, asyncio.TimeoutError)
            return self.upstream_failed(504 if timeout else 502, "upstream connect timed out" if timeout else f"upstream refused: {exc}")
        self.attach(task.result())

    def attach(self, conn: pool.UpstreamConnection) -> None:
        p = self.p
        client = self.client
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
        client.state = FORWARD
        conn.exchange = self
        framer = conn.framer
        framer.handler = self
        framer.reset(head.method == b"HEAD")
        parts = self.kept if self.tried and self.kept is not None else self.pending
        data = self.request_bytes
        if parts:
            data += b"".join([_chunk(d) for d in parts]) if head.chunked else b"".join(parts)
        self.pending = []
        self.pending_size = 0
        if self.body_done:
            if head.chunked:
                data += _LAST_CHUNK
            client.deadline = p.now + p.read_timeout
        else:
            client.deadline = p.now + p.body_timeout
            if client.reading_paused:
                client.resume_client_reading()
        try:
            transport.write(data)
        except RuntimeError:  # uvloop: closed under us after all; nothing reached the upstream
            self.conn = None
            conn.abort()
            return self.upstream_failed(502, "upstream closed the connection before the request was sent")
        if client.writing_paused:
            transport.pause_reading()

    # -- the upstream's answer (ResponseFramer handler) -----------------------------------
    def on_response(self, rh: ResponseHead) -> None:
        # Held until the end of this upstream read (flush_out): head, body and end go out in one send.
        self.out.append(self._head_for_client(rh))
        self.client.deadline = self.p.now + self.p.read_timeout

    def on_whole_response(self, rh: ResponseHead, body: bytes) -> None:
        """A whole Content-Length answer from one upstream read: one send, then the next request."""
        data = self._head_for_client(rh)
        if body:
            self.bytes_out += len(body)
            data += body
        client = self.client
        if client.state != CLOSED:
            client.transport.write(data)
        self._answered()

    def _head_for_client(self, rh: ResponseHead) -> bytes:
        p = self.p
        head = self.head
        assert head is not None
        self.status = rh.status
        self.upstream_keep_alive = rh.keep_alive
        self.answer_left = -1 if rh.no_body else rh.content_length
        if head.has_body and not self.body_done:
            self.keep_alive = False  # answered before the whole request arrived: the rest is not read
        data, self.response_chunked, self.keep_alive = _answer_head(
            rh, self.request_id, p.hsts_line, self.extra_response, head.version, self.keep_alive and not p.closing
        )
        self.response_started = True
        return data

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.answer_left > 0:
            self.answer_left -= len(data)
        if self.response_chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)
        self.client.deadline = self.p.now + self.p.read_timeout

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
        if self.client.state != CLOSED:
            self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def on_response_end(self) -> None:
        out = self.out
        if self.response_chunked:
            out.append(_LAST_CHUNK)
        if out:
            if self.client.state != CLOSED:
                self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        self._answered()

    def _answered(self) -> None:
        """The whole answer was written: the upstream connection goes back, the exchange ends."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            pool.release(conn, self.body_done and self.upstream_keep_alive, self.p.max_idle)
        self.client.finish()

    # Back-pressure from the upstream connection (pool.py): its writes wait on the client's reads.
    def pause_client_reading(self) -> None:
        self.client.pause_client_reading()

    def resume_client_reading(self) -> None:
        self.client.resume_client_reading()

    # -- failures -----------------------------------------------------------------------
    def upstream_lost(self, conn: pool.UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed during the exchange."""
        if conn is not self.conn:
            return
        self.conn = None
        if self.response_started and not self.take_back_unsent():
            self.count_failure()
            return self.client.drop()
        self.upstream_failed(502, "upstream closed the connection before answering")

    def take_back_unsent(self) -> bool:
        """Forget an answer that began but of which the client has had nothing yet; True when forgotten.

        An upstream killed between the head and the body of a small answer leaves that head held
        back by defer_or_flush (outside an upstream read, `out` is non-empty only then). The
        request may then go to another upstream as though this one had never answered, when its
        method allows a retry: the client sees one whole answer instead of a reset connection.
        """
        head = self.head
        if not self.out or not self.body_done or head is None or head.method not in self.p.retry_methods:
            return False
        self.out.clear()
        self.response_started = self.deferred = self.response_chunked = False
        self.status = 0
        self.answer_left = -1
        self.bytes_out = 0
        return True

    def upstream_broken(self, conn: pool.UpstreamConnection, exc: ProtocolError) -> None:
        """The upstream's answer broke the framing rules."""
        if conn is not self.conn:
            return
        self.conn = None
        conn.abort()
        self.count_failure()
        if self.response_started:
            return self.client.drop()
        self.vacate()
        self.client.respond_error(502, "bad_gateway", exc.message)

    def upstream_failed(self, status: int, message: str) -> None:
        """No answer from this upstream: retry elsewhere when allowed, else answer `status`."""
        upstream = self.upstream
        head = self.head
        assert head is not None
        self.count_failure()
        self.vacate()
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
            return self.pick_and_send()
        code = "gateway_timeout" if status == 504 else "bad_gateway"
        self.client.respond_error(status, code, message)

    def count_failure(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.failures += 1
            upstream.health.passive_failure(time.monotonic())

    def vacate(self) -> Upstream | None:
        """This exchange no longer occupies its upstream (the one decrement of `active`); returns it."""
        upstream = self.upstream
        if upstream is not None:
            upstream.active -= 1
            self.upstream = None
            group = self.group
            if group is not None and group.waiting:
                wake_group(group, self.p.upstream_max_active)
        return upstream

    def abort_upstream(self) -> None:
        """Give up on the upstream (a deadline passed): its connection is closed, a failure counted."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self.count_failure()
        self.vacate()

    def abandon(self) -> None:
        """The client left (or broke the framing) in the middle of the exchange."""
        self.queued = False  # its place in the line is skipped by wake_group
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
        self.vacate()


def wake_group(group: Group, most_active: int) -> None:
    """Send the group's waiting requests on, oldest first, while an upstream has a free slot.

    Called by every vacate of the group (and by the sweeper, for slots that came with a new or
    recovered upstream). Not re-entered: a request woken here that fails at once vacates again,
    and this loop goes on instead of a nested one. Each waiter is looked at once per call: a
    retry whose only free upstream is one it already tried goes back to the end of the line and
    must not be woken again at once, for ever.
    """
    if group.waking:
        return
    group.waking = True
    waiting = group.waiting
    try:
        for _ in range(len(waiting)):
            ex = waiting[0]
            if not ex.queued or ex.client.ex is not ex:  # its client left, or it was answered (timed out)
                waiting.popleft()
                continue
            if not group.has_room(most_active):
                return
            waiting.popleft()
            ex.queued = False
            ex.pick_and_send()
    finally:
        group.waking = False
