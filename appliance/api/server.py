"""The api role: `serve(cfg, index)` runs one worker, waitress on a loopback port.

The port is the kernel's pick (127.0.0.1:0, announced to the supervisor: listen_address.py), or
base_port + index when the operator pinned [api] base_port.

Boot: point prometheus at the shared metrics dir (before it is imported), open
the database (the supervisor migrates; a standalone worker migrates a stale
schema itself), take the app the template built from the same config (app.prebuild:
its pages stay shared) or build it, load the operators' modules (one that fails stops
the boot with exit 3 naming the file), start the revocation mirror, listen.

SIGTERM/SIGINT drain gracefully: the handler only starts a drain thread, which
stops accepting (the listening socket is closed in the loop thread), waits until no request is queued, running or being
written (up to [supervisor] grace_period), then closes every channel so that
waitress's loop ends and serve returns 0.

Waitress warns "Task queue depth is N" for every request queued behind busy
threads; QueueWarningFilter lets one such line through per interval with the
count of those it held back, so logs stay readable under load.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

from appliance import metrics
from appliance.contract import EXIT_BOOT_FAILURE
from appliance.logs import fields

log = logging.getLogger(__name__)


class QueueWarningFilter(logging.Filter):
    """At most one waitress queue-depth warning per `interval` seconds; time is a parameter."""

    def __init__(self, interval: float = 10.0, clock: Any = time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.last = -1e18
        self.suppressed = 0
        self.deepest = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        depth = record.args[0] if isinstance(record.args, tuple) and record.args else 0
        now = self.clock()
        with self.lock:
            self.deepest = max(self.deepest, int(depth) if isinstance(depth, int) else 0)
            if now - self.last < self.interval:
                self.suppressed += 1
                return False
            record.msg = (
                "waitress task queue depth is %d (deepest %d; %d similar warnings held back); consider more [api] threads or workers"
            )
            record.args = (depth, self.deepest, self.suppressed)
            self.last, self.suppressed, self.deepest = now, 0, 0
            return True


def _busy(server: Any, ctx: Any) -> bool:
    if ctx.inflight > 0 or len(server.task_dispatcher.queue) > 0 or server.task_dispatcher.active_count > 0:
        return True
    for channel in list(server._map.values()):
        if getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0):
            return True
    return False


class Drainer:
    """Graceful stop of a waitress server; start() is safe to call from a signal handler."""

    def __init__(self, server: Any, ctx: Any, grace: float):
        self.server, self.ctx, self.grace = server, ctx, grace
        self.started = threading.Event()

    def start(self, signum: int = 0, frame: Any = None) -> None:
        if self.started.is_set():
            return
        self.started.set()
        threading.Thread(target=self.run, name="drain", daemon=True).start()

    def _stop_accepting(self) -> None:
        srv = self.server
        srv.accepting = False
        try:
            srv.del_channel()
            srv.socket.close()
        except OSError:
            pass

    def run(self) -> None:
        from waitress import wasyncore

        self.ctx.draining = True
        log.info("draining: no new connections, finishing in-flight requests", extra=fields(grace=self.grace))
        self.server.trigger.pull_trigger(self._stop_accepting)
        deadline = time.monotonic() + self.grace
        time.sleep(0.05)
        while time.monotonic() < deadline and _busy(self.server, self.ctx):
            time.sleep(0.05)
        if _busy(self.server, self.ctx):
            log.warning("grace period over with requests still in flight; closing", extra=fields(inflight=self.ctx.inflight))
        self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))


def serve(cfg: Any, index: int) -> int:
    """Run API worker `index` until SIGTERM; the exit status for the supervisor."""
    metrics.prepare(cfg)
    logging.getLogger("waitress.queue").addFilter(QueueWarningFilter())
    from appliance import db

    try:
        handle = db.open_for_role(cfg)
    except db.DatabaseError as exc:
        log.error("database %s cannot be used: %s", db.describe(cfg), exc)
        return 1  # transient: the supervisor retries with backoff
    from appliance.api.app import adopt_prebuilt, create_app
    from appliance.api.operator_apps import AppLoadError

    try:
        app = adopt_prebuilt(cfg, index, handle)
        shared = app is not None  # built in the template, shared with the other workers
        app = app or create_app(cfg, index=index, db=handle)
    except AppLoadError as exc:
        log.error("%s", exc)
        print(f"appliance api: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILURE
    import waitress

    from appliance import listen_address
    from appliance.api import inline

    port = listen_address.port_for(cfg.api.base_port, index)
    body_limit = max(cfg.api.max_body_bytes, cfg.api.upload_max_bytes) + 1048576
    dispatcher = inline.InlineDispatcher(stall_after=cfg.api.stall_seconds)
    dispatcher.set_thread_count(cfg.api.threads)
    try:
        server = waitress.create_server(
            app,
            _dispatcher=dispatcher,
            host="127.0.0.1",
            port=port,
            threads=cfg.api.threads,
            connection_limit=cfg.api.connection_limit,
            max_request_body_size=body_limit,
            ident="appliance",
            expose_tracebacks=False,
            channel_timeout=120,
        )
    except OSError as exc:
        dispatcher.shutdown(timeout=1)
        log.error("cannot listen on 127.0.0.1:%d: %s", port, exc.strerror or exc)
        return 1
    inline.install(server, dispatcher)
    app.ctx.pool_stalled = dispatcher.stalled
    port = server.effective_port
    try:
        address = listen_address.announce(port)
    except OSError as exc:
        log.error("cannot announce the address 127.0.0.1:%d to the supervisor: %s", port, exc)
        return 1
    app.ctx.start_background()
    drainer = Drainer(server, app.ctx, cfg.supervisor.grace_period)
    signal.signal(signal.SIGTERM, drainer.start)
    signal.signal(signal.SIGINT, drainer.start)
    log.info(
        "api worker ready",
        extra=fields(index=index, address=address, threads=cfg.api.threads, node_id=app.ctx.node_id, app="template" if shared else "own"),
    )
    dispatcher.bind_loop()
    try:
        server.run()
    finally:
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
        app.ctx.stop_background()
    log.info("api worker stopped", extra=fields(index=index))
    return 0
