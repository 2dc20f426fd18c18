"""The alert webhook: every firing and resolved alert POSTed to `[monitor] alert_webhook`.

The body is the alert's log line as JSON (alert, state, value, threshold, what,
since, time, node), signed like a task callback (appliance.outbound: the
X-Appliance-Signature over `<timestamp>.<url>.<body>` with callback_secret) with
X-Appliance-Event `alert`; the host is vetted at every try against `[queue]
callback_allow`, no redirect is followed and proxy variables are ignored.

Sending is a background thread fed by a bounded queue, so a slow or dead
receiver never holds the sampler: when the queue is full the alert is dropped
with a logged warning. Each POST has TIMEOUT seconds and up to RETRIES more
tries. Outcomes are counted in appliance_alert_webhook_total{result} (sent,
failed, dropped).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import orjson

from appliance import addresses, outbound
from appliance.logs import fields
from appliance.times import now_iso

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # seconds per POST
RETRIES = 3  # extra tries of a failing POST (a refused address or a redirect is not retried)
BACKOFF = 0.5  # seconds before the first retry, doubled each time
QUEUE_SIZE = 100  # alert changes waiting to be sent; beyond, they are dropped
EVENT = "alert"


class AlertWebhook:
    """POSTs alert changes from a thread of its own; `send` never blocks and never raises."""

    def __init__(
        self,
        url: str,
        secret: str,
        policy: addresses.Policy,
        node: str,
        count: Callable[[str], None] = lambda result: None,
        resolver: addresses.Resolver = socket.getaddrinfo,
        queue_size: int = QUEUE_SIZE,
        backoff: float = BACKOFF,
    ) -> None:
        self.url = url
        self.secret = secret
        self.policy = policy
        self.node = node
        self.count = count
        self.resolver = resolver
        self.backoff = backoff
        self.dropped = 0
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self.thread.start()

    @classmethod
    def from_config(cls, cfg: Any, count: Callable[[str], None] = lambda result: None) -> AlertWebhook | None:
        """The webhook of [monitor] alert_webhook, or None when it is empty."""
        url = cfg.monitor.alert_webhook
        if not url:
            return None
        node = cfg.server.node_name or socket.gethostname()
        return cls(url, cfg.secrets.callback_secret, addresses.policy_for(cfg.queue.callback_allow), node, count)

    def body(self, change: dict[str, Any]) -> bytes:
        """The JSON of one alert change: the fields of its log line plus time and node."""
        kept = {k: v for k, v in change.items() if k != "at"}
        return orjson.dumps({**kept, "time": now_iso(), "node": self.node}, default=str)

    def send(self, change: dict[str, Any]) -> None:
        """Queue one alert change (an item of Alerts.evaluate's answer); dropped, counted and logged when the queue is full."""
        try:
            self.q.put_nowait(self.body(change))
        except queue.Full:
            self.dropped += 1
            self._count("dropped")
            log.warning(
                "alert webhook queue full: alert dropped",
                extra=fields(alert=change.get("alert"), state=change.get("state"), dropped=self.dropped),
            )
        except Exception:
            log.exception("alert webhook could not queue an alert")

    def _run(self) -> None:
        while True:
            body = self.q.get()
            try:
                if body is None:
                    return
                problem = outbound.post(
                    self.url, body, self.secret, EVENT, TIMEOUT, RETRIES, self.policy, self.backoff, self.resolver, what="alert webhook"
                )
                self._count("sent" if problem is None else "failed")
                if problem is not None:
                    log.warning("alert webhook not delivered", extra=fields(url=outbound.safe_url(self.url), problem=problem[:500]))
            except Exception:
                log.exception("alert webhook delivery crashed")
            finally:
                self.q.task_done()

    def _count(self, result: str) -> None:
        try:
            self.count(result)
        except Exception:  # metrics must not stop the webhook
            log.debug("alert webhook metric failed", exc_info=True)

    def close(self, timeout: float = 5.0) -> None:
        """Let the queued alerts go out (up to `timeout` seconds), then stop the thread."""
        try:
            self.q.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)
