"""Task callbacks: signed JSON POSTs to the progress, completion and error URLs of a task.

Signature: `X-Appliance-Timestamp: <unix seconds>` and
`X-Appliance-Signature: v1=<hex>`, the HMAC-SHA256 with [secrets] callback_secret
over `<timestamp>.<url>.<body>` (the URL exactly as submitted, the exact body
bytes). A receiver recomputes it, compares in constant time and refuses a
timestamp older than a few minutes, so a captured callback can neither be
replayed later nor sent to another URL (`verify` does all three; the README
shows a receiver).

Where a callback may go (the SSRF defence): only http and https URLs; at submit
`check_callbacks` refuses bad URLs and address literals that are internal (400
naming the field); at send time, the authoritative check, the host is resolved
once and every address vetted (appliance.queue.addresses, `[queue]
callback_allow` for internal receivers), the connection goes to the vetted
address itself (no second resolution a rebinding DNS could answer differently)
with the original name in Host (and in TLS SNI and certificate checks),
proxy variables are ignored and no redirect is followed: a 3xx is a failed
delivery.

Delivery runs on a background thread of the process (one per process, restarted
after fork) so a slow receiver never holds a task; each POST has [queue]
callback_timeout and up to callback_retries more tries with a short backoff
(a refused destination or a redirect is not retried). A failing callback is
logged, and written to the task's log with the reason; it never fails the task.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import http.client
import logging
import os
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

import orjson

from appliance.errors import ValidationFailed
from appliance.logs import fields
from appliance.queue import addresses
from appliance.times import now_iso

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Appliance-Signature"
TIMESTAMP_HEADER = "X-Appliance-Timestamp"
EVENT_HEADER = "X-Appliance-Event"
SIGNATURE_VERSION = "v1"
REPLAY_WINDOW = 300  # seconds a receiver should accept a timestamp (verify's default)
URL_KEYS = ("progress_url", "completion_url", "error_url")
MAX_URL = 2000
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


# --- submit-time checks ---------------------------------------------------------------------------


def check_url(url: Any, field: str, policy: addresses.Policy | None = None) -> str:
    """An http(s) URL with a host that is not an internal address literal, or ValidationFailed naming the field."""
    if not isinstance(url, str) or len(url) > MAX_URL or not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValidationFailed(f"{field} must be an http or https URL of at most {MAX_URL} ASCII characters without spaces", field=field)
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise ValidationFailed(f"{field} is not a valid URL", field=field) from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationFailed(f"{field} must be an http or https URL", field=field)
    if parsed.username is not None or parsed.password is not None:
        raise ValidationFailed(f"{field} must not carry credentials (user:password@)", field=field)
    why = addresses.literal_refusal(parsed.hostname, policy or addresses.Policy())
    if why:
        raise ValidationFailed(
            f"{field} is refused: {why}; an operator can allow internal receivers with [queue] callback_allow",
            field=field,
            code="callback_refused",
        )
    return url


def check_callbacks(raw: Any, where: str = "callbacks", policy: addresses.Policy | None = None) -> dict[str, str]:
    """The callback URLs of a submit, checked (see `check_url`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationFailed(f"{where} must be an object", field=where)
    out: dict[str, str] = {}
    for key, value in raw.items():
        if key not in URL_KEYS:
            raise ValidationFailed(f"{where}.{key} is not a callback; use {', '.join(URL_KEYS)}", field=f"{where}.{key}")
        if value:
            out[key] = check_url(value, f"{where}.{key}", policy)
    return out


def policy_of(cfg: Any) -> addresses.Policy:
    return addresses.policy_for(cfg.queue.callback_allow if cfg is not None else ())


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
        raise _Permanent(f"{parts.scheme or 'no'} scheme: only http and https callbacks are sent")
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
        log.warning("callback failed", extra=fields(event=event, url=_safe(url), attempt=attempt + 1, problem=problem[:200]))
        if final:
            break
        if attempt < retries:
            time.sleep(backoff * (2**attempt))
    return problem


def _safe(url: str) -> str:
    """The URL without credentials or query (which may carry tokens) for logs."""
    try:
        p = urllib.parse.urlsplit(url)
        port = f":{p.port}" if p.port else ""
    except ValueError:
        return "<invalid URL>"
    host = f"[{p.hostname}]" if p.hostname and ":" in p.hostname else p.hostname
    return f"{p.scheme}://{host}{port}{p.path}"


# --- the sender thread ------------------------------------------------------------------------------


class _Sender:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=10000)
        # (task, event, url) whose failure is already in the task's log: a refused progress_url is noted once
        self.noted: collections.OrderedDict[tuple[str, str, str], None] = collections.OrderedDict()
        self.thread = threading.Thread(target=self._run, name="task-callbacks", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                task_id, url, event, *args = item
                problem = post(url, *args)
                if problem is not None and task_id:
                    self._note(task_id, event, url, problem)
            except Exception:
                log.exception("callback delivery crashed")
            finally:
                self.q.task_done()

    def _note(self, task_id: str, event: str, url: str, problem: str) -> None:
        from appliance.queue import records

        key = (task_id, event, url)
        if key in self.noted:
            return
        self.noted[key] = None
        if len(self.noted) > 1000:
            self.noted.popitem(last=False)
        records.add_log(task_id, f"{event} callback to {_safe(url)} not delivered: {problem[:500]}", "warning")


_sender: _Sender | None = None
_lock = threading.Lock()


def send(cfg: Any, url: str, event: str, payload: dict[str, Any]) -> None:
    """Queue one signed callback POST (never raises); a failure is noted in the log of payload["task_id"]."""
    global _sender
    try:
        body = orjson.dumps({**payload, "event": event, "timestamp": now_iso()}, default=str)
        with _lock:
            if _sender is None or _sender.pid != os.getpid():
                _sender = _Sender()
            sender = _sender
        item = (
            payload.get("task_id"),
            url,
            event,
            body,
            cfg.secrets.callback_secret,
            event,
            cfg.queue.callback_timeout,
            cfg.queue.callback_retries,
            policy_of(cfg),
        )
        sender.q.put_nowait(item)
    except Exception:
        log.exception("callback could not be queued", extra=fields(event=event))


def drain(timeout: float) -> None:
    """Wait up to `timeout` seconds for queued callbacks of this process to go out."""
    sender = _sender
    if sender is None or sender.pid != os.getpid():
        return
    deadline = time.monotonic() + timeout
    while sender.q.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
