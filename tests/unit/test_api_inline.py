"""Which requests appliance/api/inline.py serves on the loop thread (waitress's own parser)."""

from __future__ import annotations

import threading
import types

from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser

from appliance.api.inline import InlineDispatcher


def _channel(raw: bytes):
    parser = HTTPRequestParser(Adjustments())
    parser.received(raw)
    assert parser.completed
    return types.SimpleNamespace(requests=[parser])


def _dispatcher() -> InlineDispatcher:
    d = InlineDispatcher()
    d.bind_loop()
    return d


def test_a_get_of_an_inline_path_on_the_loop_thread_is_inline():
    assert _dispatcher().inline(_channel(b"GET /health/ping HTTP/1.1\r\nHost: x\r\n\r\n"))


def test_other_paths_methods_and_bad_requests_go_to_the_pool():
    d = _dispatcher()
    for raw in (
        b"GET /health/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health/ping/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /health/ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /health/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /health/ping HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ):
        assert not d.inline(_channel(raw)), raw


def test_nothing_is_inline_off_the_loop_thread():
    d = _dispatcher()
    seen = []
    t = threading.Thread(target=lambda: seen.append(d.inline(_channel(b"GET /health/ping HTTP/1.1\r\nHost: x\r\n\r\n"))))
    t.start()
    t.join()
    assert seen == [False]
    assert not InlineDispatcher().inline(_channel(b"GET /health/ping HTTP/1.1\r\nHost: x\r\n\r\n"))  # loop not bound yet


def test_a_pooled_request_reaches_the_pool_and_an_inline_one_waits_for_the_loop():
    d = _dispatcher()
    ping = _channel(b"GET /health/ping HTTP/1.1\r\nHost: x\r\n\r\n")
    status = _channel(b"GET /health/status HTTP/1.1\r\nHost: x\r\n\r\n")
    d.add_task(ping)
    d.add_task(status)
    assert d.pending == [ping] and [t.channel for t in d.queue] == [status]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pool_is_stalled_only_when_requests_wait_and_nothing_finishes():
    clock = Clock()
    d = InlineDispatcher(stall_after=10, clock=clock)
    d.bind_loop()
    assert not d.stalled()
    slow = _channel(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    d.add_task(slow)  # no thread started: it waits in the queue
    clock.now += 9.9
    assert not d.stalled()
    clock.now += 0.2
    assert d.stalled()
    finished = []
    slow.service = lambda: finished.append(True)  # what a pool thread calls, through the wrapper
    d.queue.popleft().service()
    assert finished == [True] and not d.stalled()  # one finished and nothing waits


def test_a_busy_pool_that_keeps_finishing_is_not_stalled():
    clock = Clock()
    d = InlineDispatcher(stall_after=10, clock=clock)
    d.bind_loop()
    for _ in range(5):
        for _ in range(2):
            waiting = _channel(b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n")
            waiting.service = lambda: None
            d.add_task(waiting)
        clock.now += 6
        d.queue.popleft().service()  # a request finishes every 6 s while others wait
        assert not d.stalled()
