"""Signed outbound POSTs to vetted addresses: task callbacks (appliance.tasks) and alert webhooks (appliance.monitor).

Signature: `X-Appliance-Timestamp: <unix seconds>` and
`X-Appliance-Signature: v1=<hex>`, the HMAC-SHA256 with [secrets] callback_secret
over `<timestamp>.<url>.<body>` (the URL exactly as configured or submitted, the
exact body bytes). A receiver recomputes it, compares in constant time and
refuses a timestamp older than a few minutes, so a captured POST can neither be
replayed later nor sent to another URL (`verify` does all three; the README
shows a receiver).

Where a POST may go (the SSRF defence): only http and https URLs; the host is
resolved once per try and every address vetted (appliance.addresses, `[queue]
callback_allow` for internal receivers), the connection goes to the vetted
address itself (no second resolution a rebinding DNS could answer differently)
with the original name in Host (and in TLS SNI and certificate checks), proxy
variables are ignored and no redirect is followed: a 3xx is a failed delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import socket
import ssl
import time
import urllib.parse
from typing import Any

from appliance import addresses
from appliance.logs import fields

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Appliance-Signature"
TIMESTAMP_HEADER = "X-Appliance-Timestamp"
EVENT_HEADER = "X-Appliance-Event"
SIGNATURE_VERSION = "v1"
REPLAY_WINDOW = 300  # seconds a receiver should accept a timestamp (verify's default)
_ANSWER_READ = 65536  # bytes of a receiver's answer read before closing


# --- signatures -----------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, url: str, body: bytes) -> str:
    """The X-Appliance-Signature value of one POST."""
    message = timestamp.encode() + b"." + url.encode() + b"." + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str, url: str, body: bytes, timestamp: str, signature: str, now: float | None = None, window: int = REPLAY_WINDOW
) -> bool:
    """True when `signature` is ours for (timestamp, url, body) and the timestamp is within `window` seconds of now."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > window:
        return False
    return hmac.compare_digest(sign(secret, str(timestamp), url, body), signature or "")


# --- one POST ---------------------------------------------------------------------------------------


class _Permanent(Exception):
    """A failure another try would repeat (refused destination, redirect): no retry."""


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to one vetted socket address; Host (and, for HTTPS, SNI) stay the URL's name."""

    def __init__(self, host: str, port: int, target: tuple[int, tuple[Any, ...]], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._target = target

    def connect(self) -> None:
        family, sockaddr = self._target
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_tls: ssl.SSLContext | None = None


class _PinnedHTTPS(_PinnedHTTP):
    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        global _tls
        super().connect()
        _tls = _tls or ssl.create_default_context()
        self.sock = _tls.wrap_socket(self.sock, server_hostname=self.host)


def _post_once(
    url: str, body: bytes, secret: str, event: str, timeout: float, policy: addresses.Policy, resolver: addresses.Resolver
) -> int:
    """One POST to the vetted address of the URL's host; the answer's status. Raises _Permanent or OSError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Permanent(f"{parts.scheme or 'no'} scheme: only http and https URLs are posted to")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        targets = addresses.resolve(parts.hostname, port, policy, resolver)
    except addresses.Refused as exc:
        raise _Permanent(f"refused: {exc} (allow it with [queue] callback_allow)") from None
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "appliance",
        EVENT_HEADER: event,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, url, body),
        "Connection": "close",
    }
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    cls = _PinnedHTTPS if https else _PinnedHTTP
    problem: OSError | None = None
    for address in targets:  # the next address only when this one could not be reached: the POST went nowhere
        conn = cls(parts.hostname, port, address, timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                problem = exc
                continue
            conn.request("POST", target, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(_ANSWER_READ)
            if 300 <= resp.status < 400:
                raise _Permanent(f"HTTP {resp.status}: redirects are not followed")
            return resp.status
        finally:
            conn.close()
    assert problem is not None
    raise problem


def post(
    url: str,
    body: bytes,
    secret: str,
    event: str,
    timeout: float,
    retries: int,
    policy: addresses.Policy,
    backoff: float = 0.5,
    resolver: addresses.Resolver = socket.getaddrinfo,
    what: str = "callback",
) -> str | None:
    """POST once plus up to `retries` more times; None when the receiver answered 2xx, else why it failed.

    `resolver` (getaddrinfo's signature) is asked once per try; the POST goes to an address it gave and vet passed.
    """
    problem = ""
    for attempt in range(retries + 1):
        try:
            status = _post_once(url, body, secret, event, timeout, policy, resolver)
            if 200 <= status < 300:
                return None
            problem = f"HTTP {status}"
            final = False
        except _Permanent as exc:
            problem, final = str(exc), True
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem, final = f"{type(exc).__name__}: {exc}", False
        log.warning("%s failed", what, extra=fields(event=event, url=safe_url(url), attempt=attempt + 1, problem=problem[:200]))
        if final:
            break
        if attempt < retries:
            time.sleep(backoff * (2**attempt))
    return problem


def safe_url(url: str) -> str:
    """The URL without credentials or query (which may carry tokens) for logs."""
    try:
        p = urllib.parse.urlsplit(url)
        port = f":{p.port}" if p.port else ""
    except ValueError:
        return "<invalid URL>"
    host = f"[{p.hostname}]" if p.hostname and ":" in p.hostname else p.hostname
    return f"{p.scheme}://{host}{port}{p.path}"
