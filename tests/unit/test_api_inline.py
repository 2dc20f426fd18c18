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
    assert d.pending == [ping] and list(d.queue) == [status]
