"""Reading a request: the body (bounded), JSON validated into a Struct, query parameters.

Every problem is a 400 naming the field (ValidationFailed), a 413 past the body
limit or a 415 for a body that is not JSON; a NUL character (which neither
engine can store) is refused wherever the Struct keeps a string. The Struct
defaults to the one the responder's @operation declared (appliance.api.operations).
"""

from __future__ import annotations

import re
from typing import Any

import falcon
import msgspec

from appliance import jsondepth
from appliance.errors import PayloadTooLarge, UnsupportedMediaType, ValidationFailed

_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def _max_body(req: falcon.Request) -> int:
    return int(getattr(req.context, "max_body_bytes", 1048576))


def read_body(req: falcon.Request, limit: int | None = None) -> bytes:
    """The raw request body, at most `limit` bytes (413 beyond)."""
    limit = _max_body(req) if limit is None else limit
    length = req.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", details={"limit": limit})
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", details={"limit": limit})
    return data


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # clients that send no Content-Type still get their JSON read
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def decode_json(data: bytes, kind: Any, max_depth: int = 64) -> Any:
    """Decode and validate JSON bytes into `kind`; 400 naming the field on any problem (json_too_deep past `max_depth`)."""
    if not data.strip():
        data = b"{}"
    jsondepth.check(data, max_depth)
    try:
        # JSON has one number type: 5.0 is the integer 5 (as JSON Schema's "integer" says), so
        # integral floats are made ints before the typed conversion
        value = msgspec.convert(_integral(msgspec.json.decode(data)), kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _FIELD_RE.search(text) or _MISSING_RE.search(text)
        field = m.group(1) if m and m.group(1) else None
        raise ValidationFailed(text, field=field) from None
    except msgspec.DecodeError as exc:
        raise ValidationFailed(f"body is not valid JSON: {exc}", code="invalid_json") from None
    # NUL cannot be stored (PostgreSQL text/jsonb refuse it); fields the Struct ignores do not matter
    if b"\\u0000" in data and has_nul(msgspec.to_builtins(value)):
        raise ValidationFailed("strings must not contain NUL characters")
    return value


def _integral(value: Any) -> Any:
    """JSON numbers as the server keeps them: integral floats become ints, integers beyond 64 bits floats."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        try:
            return float(value)  # stored JSON (orjson) holds 64-bit integers; a larger one is kept as a number
        except OverflowError:
            raise ValidationFailed("a number is too large") from None
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def has_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds a NUL character in any string or key."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def read_json(req: falcon.Request, kind: Any = None) -> Any:
    """The JSON body validated as `kind` (default: the operation's request Struct)."""
    if kind is None:
        op = getattr(req.context, "operation", None)
        kind = op.request if op is not None and op.request is not None else dict
    if not _is_json(req.content_type):
        raise UnsupportedMediaType("the body must be application/json", details={"content_type": (req.content_type or "")[:100]})
    return decode_json(read_body(req), kind, int(getattr(req.context, "json_max_depth", 64)))


def read_query(req: falcon.Request, kind: Any = None) -> Any:
    """The query parameters validated as Struct `kind` (default: the operation's query Struct)."""
    if kind is None:
        op = getattr(req.context, "operation", None)
        kind = op.query if op is not None else None
        if kind is None:
            raise TypeError("read_query needs a Struct type or an operation with query=")
    params = {k: (v[-1] if isinstance(v, list) else v) for k, v in req.params.items()}
    known = {f.encode_name for f in msgspec.structs.fields(kind)}
    for name, value in params.items():
        if name in known and isinstance(value, str) and "\x00" in value:  # NUL cannot reach a query of the database
            raise ValidationFailed("query parameters must not contain NUL characters", field=name)
    try:
        return msgspec.convert(params, kind, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _FIELD_RE.search(text) or _MISSING_RE.search(text)
        raise ValidationFailed(text.replace("Object", "Query"), field=m.group(1) if m else None) from None
