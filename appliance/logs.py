"""Structured logs for every process: one JSON object a line on stdout, or text for people.

Each line has time, level, role, pid, logger, message and the request id when
one is set (`request_id` context variable). Extra structured fields go in
`extra={"fields": {...}}`. Secrets are never passed to a logger.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import logging
import os
import sys
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_ROLE = "cli"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "role": _ROLE,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        rid = getattr(record, "request_id", None) or request_id.get()
        extra = ""
        fields = getattr(record, "fields", None)
        if fields:
            extra = " " + " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {_ROLE}[{record.process}] {record.getMessage()}{extra}"
        if rid:
            line += f" (request {rid})"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(role: str, fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    """Configure the root logger of this process once; safe to call again (replaces handlers)."""
    global _ROLE
    _ROLE = role
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO stay at WARNING unless we debug.
    if level != "debug":
        for name in ("huey", "peewee", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("APPLIANCE_LOG_FORMAT", fmt)


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("msg", extra=fields(a=1))` attaches structured fields to a line."""
    return {"fields": values}
