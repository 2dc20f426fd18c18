"""Request ids and W3C trace ids: the client's when valid, else minted from pooled randomness.

Minting costs one slice of a hex pool refilled from os.urandom every 256 requests
(one getrandom call per 256 requests, not one per request). A request that brings
neither X-Request-ID nor traceparent (the common case) gets both from one slice.
"""

from __future__ import annotations

import binascii
import os
import re

ID_POOL_BYTES = 24 * 256  # 24 random bytes (48 hex digits) per request
REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
_hexlify = binascii.hexlify
_urandom = os.urandom
_pool = b""
_pos = 0


def random_hex48() -> bytes:
    """48 random hex digits (trace id + parent id), sliced from a pool refilled from os.urandom."""
    global _pool, _pos
    pos = _pos
    if pos >= len(_pool):
        _pool = _hexlify(_urandom(ID_POOL_BYTES))
        pos = 0
    _pos = pos + 48
    return _pool[pos : pos + 48]


def new_request_id() -> bytes:
    """A fresh 32-hex-digit request id (for answers to requests whose head never parsed)."""
    return random_hex48()[:32]


def valid_traceparent(value: bytes) -> bool:
    m = _TRACEPARENT.fullmatch(value)
    return bool(m) and m.group(1) != b"ff" and m.group(2) != _ZERO_TRACE and m.group(3) != _ZERO_PARENT


def request_ids(captured: dict[bytes, bytes]) -> tuple[bytes, bytes]:
    """(X-Request-ID, traceparent) for a request: the client's when valid, else new ones.

    `captured` holds what the framer captured from the client (x-request-id, traceparent, ...).
    """
    if not captured:  # the common case: no ids from the client, both made from one pool slice
        new = random_hex48()
        rid = new[:32]
        return rid, b"00-%s-%s-01" % (rid, new[32:])
    rid = captured.get(b"x-request-id")
    trace = captured.get(b"traceparent")
    if trace is None or not valid_traceparent(trace):
        new = random_hex48()
        trace = b"00-%s-%s-01" % (new[:32], new[32:])
        if rid is None or not REQUEST_ID.fullmatch(rid):
            rid = new[:32]
    elif rid is None or not REQUEST_ID.fullmatch(rid):
        rid = random_hex48()[:32]
    return rid, trace
