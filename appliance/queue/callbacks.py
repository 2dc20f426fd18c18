"""Task callbacks: signed JSON POSTs to the progress, completion and error URLs of a task.

The body is JSON; the header `X-Appliance-Signature: sha256=<hex>` is
HMAC-SHA256 over the exact body bytes with [secrets] callback_secret, so a
receiver recomputes it and compares in constant time. Only http and https URLs
are accepted (checked at submit). Delivery runs on a background thread of the
process (one per process, restarted after fork) so a slow receiver never holds
a task; each POST has [queue] callback_timeout and up to callback_retries more
tries with a short backoff. A failing callback is logged, never fails the task.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from appliance.errors import ValidationFailed
from appliance.logs import fields
from appliance.times import now_iso

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Appliance-Signature"
EVENT_HEADER = "X-Appliance-Event"
URL_KEYS = ("progress_url", "completion_url", "error_url")


def sign(secret: str, body: bytes) -> str:
    """The signature header value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(secret, body), header or "")


def check_url(url: Any, field: str) -> str:
    """An http(s) URL with a host, or ValidationFailed naming the field."""
    if not isinstance(url, str) or len(url) > 2000:
        raise ValidationFailed(f"{field} must be an http or https URL", field=field)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationFailed(f"{field} must be an http or https URL", field=field)
    return url


def check_callbacks(raw: Any, where: str = "callbacks") -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationFailed(f"{where} must be an object", field=where)
    out: dict[str, str] = {}
    for key, value in raw.items():
        if key not in URL_KEYS:
            raise ValidationFailed(f"{where}.{key} is not a callback; use {', '.join(URL_KEYS)}", field=f"{where}.{key}")
        if value:
            out[key] = check_url(value, f"{where}.{key}")
    return out


def post(url: str, body: bytes, secret: str, event: str, timeout: float, retries: int, backoff: float = 0.5) -> bool:
    """POST once plus `retries` more times; True when the receiver answered 2xx."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body), EVENT_HEADER: event, "User-Agent": "appliance"}
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if 200 <= resp.status < 300:
                    return True
                problem = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        log.warning(
            "callback failed",
            extra=fields(event=event, url=_safe(url), attempt=attempt + 1, problem=problem[:200]),
        )
        if attempt < retries:
            time.sleep(backoff * (2**attempt))
    return False


def _safe(url: str) -> str:
    """The URL without credentials or query (which may carry tokens) for logs."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname}{':' + str(p.port) if p.port else ''}{p.path}"


class _Sender:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=10000)
        self.thread = threading.Thread(target=self._run, name="task-callbacks", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                post(*item)
            except Exception:
                log.exception("callback delivery crashed")
            finally:
                self.q.task_done()


_sender: _Sender | None = None
_lock = threading.Lock()


def send(cfg: Any, url: str, event: str, payload: dict[str, Any]) -> None:
    """Queue one signed callback POST (never raises)."""
    global _sender
    try:
        body = orjson.dumps({**payload, "event": event, "timestamp": now_iso()}, default=str)
        with _lock:
            if _sender is None or _sender.pid != os.getpid():
                _sender = _Sender()
            sender = _sender
        sender.q.put_nowait((url, body, cfg.secrets.callback_secret, event, cfg.queue.callback_timeout, cfg.queue.callback_retries))
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
