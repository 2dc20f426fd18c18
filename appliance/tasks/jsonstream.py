"""Records of a JSON file, one at a time, in bounded memory: a top-level array or JSON lines.

`array_records(fh, ...)` reads a file holding one JSON array and yields its elements as they
are parsed. How it works: the file is decoded (UTF-8, incrementally) into a text buffer in
CHUNK pieces; each element is parsed with json.JSONDecoder.raw_decode at the buffer's position.
An element is accepted only when something other than a number's characters follows it in the
buffer (a number cut by a read boundary would otherwise parse short: "1." as 1); when the parse
fails at the buffer's end or only digits follow, more is read and the element parsed again
from its start. The buffer never holds more than one element
plus one chunk: an element longer than [queue] data_max_record_bytes ends the task
(LimitExceeded), as does one nested deeper than [api] json_max_depth. ijson would do the same
with a C dependency to bundle; the standard library's raw_decode is enough here.

`line_records(fh, ...)` yields one JSON value per non-blank line, each line bounded alike.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

import orjson

from appliance import jsondepth
from appliance.errors import ValidationFailed
from appliance.tasks.datalimits import LimitExceeded, bounded_lines

CHUNK = 65536
_WS = " \t\r\n"
_NUMBER = "0123456789+-.eE"
_decoder = json.JSONDecoder()


def _too_deep(limit: int) -> LimitExceeded:
    return LimitExceeded(f"a record nests deeper than {limit} levels", limit, "api.json_max_depth")


def _check_depth(text: str | bytes, max_depth: int) -> None:
    try:
        jsondepth.check(text, max_depth)
    except ValidationFailed:
        raise _too_deep(max_depth) from None


class _Buffer:
    def __init__(self, fh: Any, max_record: int):
        self.fh = fh
        self.max_record = max_record
        self.text = ""
        self.pos = 0
        self.eof = False
        self.offset = 0  # characters dropped from the front of text so far (for error positions)
        self.decode = codecs.getincrementaldecoder("utf-8")("strict").decode

    def more(self) -> bool:
        """Read one more chunk; False at end of file."""
        if self.eof:
            return False
        if self.pos > CHUNK:  # drop what was consumed
            self.offset += self.pos
            self.text, self.pos = self.text[self.pos :], 0
        raw = self.fh.read(CHUNK)
        try:
            self.text += self.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise ValueError(f"the JSON file is not UTF-8 near character {self.offset + len(self.text)}: {exc.reason}") from None
        self.eof = not raw
        return True

    def skip_ws(self) -> str:
        """The next character that is not white space ('' at end of file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def bad(self, what: str) -> ValueError:
        return ValueError(f"the JSON file is not a valid array: {what} at character {self.offset + self.pos}")


def array_records(fh: Any, max_record: int, max_depth: int) -> Iterator[Any]:
    """The elements of the JSON array in binary file `fh`, one at a time (see module docstring)."""
    buf = _Buffer(fh, max_record)
    if buf.skip_ws() != "[":
        raise buf.bad("expected '['")
    buf.pos += 1
    if buf.skip_ws() == "]":
        buf.pos += 1
        _expect_end(buf)
        return
    while True:
        yield _element(buf, max_record, max_depth)
        sep = buf.skip_ws()
        if sep == ",":
            buf.pos += 1
            continue
        if sep == "]":
            buf.pos += 1
            _expect_end(buf)
            return
        raise buf.bad("expected ',' or ']'" if sep else "the array is not closed")


def _element(buf: _Buffer, max_record: int, max_depth: int) -> Any:
    if not buf.skip_ws():
        raise buf.bad("the array is not closed")
    while True:
        start = buf.pos
        try:
            value, end = _decoder.raw_decode(buf.text, start)
        except RecursionError:
            raise _too_deep(max_depth) from None
        except json.JSONDecodeError as exc:
            # a failure well inside the buffer is bad JSON; at its end the element may just be cut short
            cut = exc.pos >= len(buf.text) - 16 or exc.msg.startswith("Unterminated string")
            if cut and len(buf.text) - start > max_record:
                raise _record_too_long(max_record) from None
            if cut and buf.more():
                continue
            buf.pos = exc.pos
            raise buf.bad(exc.msg) from None
        if end - start > max_record:
            raise _record_too_long(max_record)
        rest = buf.text[end : end + 64]
        if not buf.eof and not rest.strip(_NUMBER) and buf.more():
            continue  # nothing but a number's characters follow: "1." or "12e" may go on in the next chunk
        _check_depth(buf.text[start:end], max_depth)
        buf.pos = end
        return value


def _record_too_long(limit: int) -> LimitExceeded:
    return LimitExceeded(f"a record is longer than {limit} bytes", limit, "queue.data_max_record_bytes")


def _expect_end(buf: _Buffer) -> None:
    if buf.skip_ws():
        raise buf.bad("data after the array")


def line_records(fh: Any, max_record: int, max_depth: int) -> Iterator[Any]:
    """One JSON value per non-blank line of binary file `fh`, each line at most `max_record` bytes."""
    for number, line in enumerate(bounded_lines(fh, max_record), start=1):
        if not line.strip():
            continue
        _check_depth(line, max_depth)
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"line {number} is not valid JSON: {exc}") from None
