"""Task callbacks: signed JSON POSTs to the progress, completion and error URLs of a task.

Signing, address vetting and the POST itself are the core's (appliance.outbound,
appliance.addresses), shared with the monitor's alert webhook. This module adds
what is the queue's own: at submit `check_callbacks` refuses bad URLs and
address literals that are internal (400 naming the field; `[queue]
callback_allow` lets internal receivers through); send time, the authoritative
check, vets every resolved address again.

Delivery runs on a background thread of the process (one per process, restarted
after fork) so a slow receiver never holds a task; each POST has [queue]
callback_timeout and up to callback_retries more tries with a short backoff
(a refused destination or a redirect is not retried). A failing callback is
logged, and written to the task's log with the reason; it never fails the task.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import urllib.parse
from typing import Any

import orjson

from appliance import addresses
from appliance.errors import ValidationFailed
from appliance.logs import fields
from appliance.outbound import post, safe_url
from appliance.times import now_iso

log = logging.getLogger(__name__)

URL_KEYS = ("progress_url", "completion_url", "error_url")
MAX_URL = 2000


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
        from appliance.tasks import records

        key = (task_id, event, url)
        if key in self.noted:
            return
        self.noted[key] = None
        if len(self.noted) > 1000:
            self.noted.popitem(last=False)
        records.add_log(task_id, f"{event} callback to {safe_url(url)} not delivered: {problem[:500]}", "warning")


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
