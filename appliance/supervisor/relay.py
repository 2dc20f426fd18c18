"""Relays each child's output, line by line, to the supervisor's stdout, keeping a short tail.

A child writes its log lines (JSON or text) to a pipe; one small thread per
child copies each line to our stdout under one lock, so lines of different
processes never mix, and keeps the last lines so that a child that fails to
start can be reported with what it said. In JSON mode, a line that is not
JSON (a traceback printed by the interpreter, say) is wrapped in a JSON
object naming the role and pid, so journald and log shippers get one object
per line from every process.
"""

from __future__ import annotations

import collections
import datetime as _dt
import sys
import threading
from typing import IO, Any

import orjson

WRITE_LOCK = threading.Lock()
TAIL_LINES = 20
MAX_LINE = 1 << 16


def wrap(line: str, role: str, pid: int, fmt: str) -> str:
    """The line as this process should print it."""
    if fmt != "json" or line.startswith("{"):
        return line
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    entry = {"time": stamp, "level": "info", "role": role, "pid": pid, "logger": "output", "message": line}
    return orjson.dumps(entry).decode()


class Relay:
    """Copies one child's output; `tail` holds its last lines."""

    def __init__(self, stream: IO[bytes], role: str, pid: int, fmt: str, out: Any = None):
        self.stream = stream
        self.role = role
        self.pid = pid
        self.fmt = fmt
        self.out = out
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.thread = threading.Thread(target=self._run, name=f"relay-{role}-{pid}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        out = self.out or sys.stdout
        try:
            # Bounded reads: a child printing megabytes without a newline must not grow our memory.
            for raw in iter(lambda: self.stream.readline(MAX_LINE), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    continue
                self.tail.append(line)
                text = wrap(line, self.role, self.pid, self.fmt)
                with WRITE_LOCK:
                    try:
                        out.write(text + "\n")
                        out.flush()
                    except (OSError, ValueError):  # our stdout is gone; keep draining so the child never blocks
                        pass
        except (OSError, ValueError):
            pass
        finally:
            try:
                self.stream.close()
            except OSError:
                pass

    def last_lines(self, n: int = 10) -> list[str]:
        return list(self.tail)[-n:]

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
