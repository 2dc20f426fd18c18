"""How deeply a JSON text nests, measured before anything parses it.

orjson refuses nesting beyond 255 levels with an error of its own and msgspec recurses until
Python's recursion limit; a body nested just below those limits still costs every later
encoder (the task row, a callback, a dataset record) its own recursion. So every JSON input
of a client is measured first and refused over a bound ([api] json_max_depth) with 400
`json_too_deep`.

The scan is cheap: a text with fewer opening brackets than the bound cannot be too deep
(two C-level counts); otherwise string literals are cut out with one regular expression
(brackets inside strings do not nest), everything but brackets is deleted, and the running
depth is summed by C iterators. Invalid JSON is measured as well as it can be and left to the
parser to refuse.
"""

from __future__ import annotations

import re
from itertools import accumulate

from appliance.errors import ValidationFailed

# A JSON string: a quote, then runs of ordinary characters and backslash escapes, then a quote
# (the unrolled form: linear, no nested quantifiers).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# '[' and '{' become +1, ']' and '}' become -1 (0xff read as a signed byte)
_DELTA = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")


def depth(data: bytes | str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (0 for a scalar)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= 1:
        return raw.count(b"[") + raw.count(b"{")
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS).translate(_DELTA)
    return max(accumulate(memoryview(brackets).cast("b")), default=0)


def check(data: bytes | str, limit: int, field: str | None = None) -> None:
    """Raise 400 json_too_deep when `data` nests deeper than `limit` levels."""
    if limit <= 0:
        return
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    found = depth(raw)
    if found > limit:
        where = f"{field} " if field else ""
        details = {"limit": limit, "current": found, "setting": "api.json_max_depth"}
        raise ValidationFailed(
            f"{where}JSON nests {found} levels deep; at most {limit} are accepted", field=field, code="json_too_deep", details=details
        )
