"""Structured logs: one JSON object a line with role, pid and request id; text for people."""

from __future__ import annotations

import io
import logging
import os

import orjson

from appliance import logs


def _capture(fmt: str) -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    logs.setup_logging("api", fmt, "info", stream=stream)
    return stream, logging.getLogger("appliance.test")


def test_json_line_has_the_fields_and_request_id() -> None:
    stream, log = _capture("json")
    token = logs.request_id.set("req-123")
    try:
        log.info("hello %s", "world", extra=logs.fields(user_id=7))
    finally:
        logs.request_id.reset(token)
    log.debug("dropped below level")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry["message"] == "hello world"
    assert entry["role"] == "api" and entry["pid"] == os.getpid() and entry["level"] == "info"
    assert entry["request_id"] == "req-123" and entry["user_id"] == 7
    assert entry["time"].endswith("Z")


def test_exceptions_stay_on_one_json_line() -> None:
    stream, log = _capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "ValueError: boom" in orjson.loads(lines[0])["traceback"]


def test_text_format_is_for_people() -> None:
    stream, log = _capture("text")
    log.warning("disk low", extra=logs.fields(free="1G"))
    line = stream.getvalue()
    assert "WARNING" in line and "api[" in line and "disk low free=1G" in line
