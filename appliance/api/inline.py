"""Requests that never wait on I/O run on waitress's loop thread instead of its thread pool.

Waitress hands every request from its I/O (loop) thread to a pool thread and the answer
back: a queue, a condition variable, a wake-up of the loop through its trigger pipe, and
two GIL switches per request. For a route that only builds a small answer from memory
(/health/ping, which the balancer's active check and clients' liveness probes call all
the time) that hand-off is most of the request's cost. Such a request is served on the
loop thread, right after the read that completed it, and its answer is flushed before
the loop polls again. Anything else (a database read, bcrypt, an upload) still goes to
the pool, so a slow request never holds up the loop.

Only GETs of exact paths in `paths` qualify, and only when the request parsed cleanly
(waitress's error answers keep their own path). Pipelined requests on one connection
keep their order: waitress queues a channel's next request only once the one before is
done, and that next one is again either inline or pooled on its own merits.

An inline ping no longer waits in the pool's queue, so on its own it would answer even with
every pool thread stuck. `stalled()` keeps it a liveness check of the whole worker: true when
requests wait for the pool and no pooled request has finished for `stall_after` seconds
([api] stall_seconds); the ping then answers 503 and the balancer takes the worker out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress.channel import HTTPChannel
from waitress.task import ThreadedTaskDispatcher

INLINE_PATHS = ("/health/ping",)


class _Pooled:
    """A channel handed to a pool thread; notes when its request is done (the pool's progress)."""

    __slots__ = ("channel", "dispatcher")

    def __init__(self, channel: Any, dispatcher: InlineDispatcher):
        self.channel, self.dispatcher = channel, dispatcher

    def service(self) -> None:
        try:
            self.channel.service()
        finally:
            self.dispatcher.last_done = self.dispatcher.clock()

    def cancel(self) -> None:
        self.channel.cancel()


class InlineDispatcher(ThreadedTaskDispatcher):
    """waitress's dispatcher, but channels whose next request is on an inline path wait for run_pending()."""

    def __init__(self, paths: Iterable[str] = INLINE_PATHS, stall_after: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.paths = frozenset(paths)
        self.loop_ident: int | None = None  # the thread that runs the server's loop; set by bind_loop()
        self.pending: list[Any] = []
        self.stall_after, self.clock = stall_after, clock
        self.last_done = clock()

    def bind_loop(self) -> None:
        self.loop_ident = threading.get_ident()

    def inline(self, channel: Any) -> bool:
        request = channel.requests[0]
        return (
            threading.get_ident() == self.loop_ident and request.error is None and request.command == "GET" and request.path in self.paths
        )

    def add_task(self, task: Any) -> None:
        if self.inline(task):
            self.pending.append(task)
        else:
            if not self.queue:
                self.last_done = self.clock()  # nothing was waiting: the wait for progress starts now
            super().add_task(_Pooled(task, self))

    def stalled(self) -> bool:
        """True when requests wait for the pool and none of its threads has finished one for stall_after seconds."""
        return bool(self.queue) and self.clock() - self.last_done >= self.stall_after

    def run_pending(self) -> None:
        """Serve every channel queued inline, on this (the loop) thread, and flush its answer."""
        while self.pending:
            channel = self.pending.pop(0)
            channel.service()  # may queue the channel's next request again (inline or pooled)
            if channel.connected and channel.writable():
                channel.handle_write()


class InlineChannel(HTTPChannel):
    """An HTTPChannel that runs its inline requests as soon as the read that completed them returns."""

    def handle_read(self) -> None:
        super().handle_read()
        dispatcher = self.server.task_dispatcher
        if dispatcher.pending:
            dispatcher.run_pending()


def install(server: Any, dispatcher: InlineDispatcher) -> None:
    """Make `server` (made by waitress.create_server with _dispatcher=dispatcher) accept InlineChannels."""
    server.channel_class = InlineChannel
    pull = server.pull_trigger

    def pull_trigger() -> None:  # the loop thread is awake already: waking it through the pipe is a wasted round
        if threading.get_ident() != dispatcher.loop_ident:
            pull()

    server.pull_trigger = pull_trigger
