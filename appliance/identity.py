"""Identity headers that only the balancer can set.

After verifying a token, the balancer deletes every identity header the client
sent and sets `X-Appliance-Identity: v1.<payload>.<mac>`, where payload is
base64url JSON {sub, usr, role, jti, fam, gen, exp, ts} and mac is
HMAC-SHA256 over "v1.<payload>" with the identity key from secrets.toml. A
worker trusts the identity only when the MAC checks and ts is recent; a
request with a forged or stale header is refused (401), never trusted.

The client's address travels the same way, on every request (public routes
included: the login lockout needs it): `X-Appliance-Client: v1.<address>.<mac>`,
mac = HMAC-SHA256 over "client.v1.<address>" with the same key. It has no
timestamp because it is minted once per client address and cached by the
balancer; it says only where a request came from, never who sent it. A worker
uses the address when the MAC checks and falls back to the socket peer
otherwise, so a local process that talks to a worker directly cannot pick an
address to hide behind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import orjson

from appliance.errors import Unauthorized

HEADER = "X-Appliance-Identity"
HEADER_LOWER = HEADER.lower()
CLIENT_HEADER = "X-Appliance-Client"
CLIENT_HEADER_LOWER = CLIENT_HEADER.lower()
_CLIENT_PREFIX = b"client.v1."
MAX_AGE = 120.0  # seconds; the header is made per request, so it is always fresh
_FIELDS = ("sub", "usr", "role", "jti", "fam", "gen", "exp")


class IdentityError(Unauthorized):
    """The identity header is forged, malformed or stale (401); `str()` says which, the client is not told."""

    code = "invalid_identity"

    def __init__(self, reason: str):
        super().__init__("the identity header is not valid", reason=reason)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(claims: dict[str, Any], key: bytes, now: float | None = None) -> str:
    """Header value carrying the identity of verified token `claims`."""
    body = {k: claims.get(k) for k in _FIELDS}
    body["ts"] = time.time() if now is None else now
    payload = _b64(orjson.dumps(body))
    mac = hmac.new(key, b"v1." + payload.encode("ascii"), hashlib.sha256).digest()
    return f"v1.{payload}.{_b64(mac)}"


def verify(value: str, key: bytes, now: float | None = None) -> dict[str, Any]:
    """The identity in a header value, or IdentityError."""
    try:
        version, payload, mac = value.split(".")
    except (ValueError, AttributeError):
        raise IdentityError("identity header is malformed") from None
    if version != "v1":
        raise IdentityError("identity header version is unknown")
    expected = hmac.new(key, b"v1." + payload.encode("ascii", "replace"), hashlib.sha256).digest()
    try:
        given = _unb64(mac)
    except (ValueError, TypeError):
        raise IdentityError("identity header is malformed") from None
    if not hmac.compare_digest(expected, given):
        raise IdentityError("identity header signature is invalid")
    try:
        body = orjson.loads(_unb64(payload))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise IdentityError("identity header is malformed") from None
    t = time.time() if now is None else now
    if not isinstance(body, dict) or abs(t - float(body.get("ts", 0))) > MAX_AGE:
        raise IdentityError("identity header is stale")
    return body


def sign_client(address: str, key: bytes) -> str:
    """X-Appliance-Client value vouching that a request came from `address`."""
    mac = hmac.new(key, _CLIENT_PREFIX + address.encode("ascii"), hashlib.sha256).digest()
    return f"v1.{address}.{_b64(mac)}"


def verify_client(value: str, key: bytes) -> str | None:
    """The address in an X-Appliance-Client value, or None when it is not the balancer's."""
    if not value or not value.startswith("v1."):
        return None
    address, _, mac = value[3:].rpartition(".")
    if not address or len(address) > 64:
        return None
    try:
        given = _unb64(mac)
        expected = hmac.new(key, _CLIENT_PREFIX + address.encode("ascii"), hashlib.sha256).digest()
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    return address if hmac.compare_digest(expected, given) else None


def key_bytes(secret: str) -> bytes:
    return secret.encode("utf-8")
