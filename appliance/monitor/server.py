"""The monitor role: Prometheus exposition of every process's metrics, on loopback.

GET /metrics       text exposition read from the shared metrics directory
                   (appliance/metrics.py), i.e. every process of this host;
                   through the balancer only for admins (see _refuse_metrics).
GET /health/ping   liveness for the balancer's health checks and the supervisor.
/status...         the status page, its login and its data (appliance/monitor/web.py),
                   fed by the sampler thread (appliance/monitor/sampler.py).

The process also runs the scheduler's loop in a thread of its own while [monitor] enabled
("housekeeping": supervisor/roles.py starts and stops it around `serve`, which knows nothing
of it; a SIGTERM here ends both, and a dead scheduler thread stops the process with exit 1).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

from appliance import identity, metrics
from appliance.contract import RUN_DIR
from appliance.errors import error_body
from appliance.times import now_iso

log = logging.getLogger(__name__)

_JSON = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store")]


def _refuse_metrics(environ: dict[str, Any], cfg: Any, key: bytes) -> tuple[str, str, str] | None:
    """Why /metrics is refused (status, code, message), or None to serve it.

    A request straight to the monitor's loopback port (a local scraper) is served.
    One through the balancer (which always sets X-Real-IP; waitress drops
    X-Forwarded-For from untrusted peers, so that one cannot tell) must carry the
    identity of an admin, unless [monitor] metrics_require_admin is false.
    """
    if not cfg.monitor.metrics_require_admin or "HTTP_X_REAL_IP" not in environ:
        return None
    value = environ.get("HTTP_" + identity.HEADER.upper().replace("-", "_"))
    if not value:
        return "401 Unauthorized", "missing_token", "metrics need an admin token"
    try:
        who = identity.verify(value, key)
    except identity.IdentityError:
        return "401 Unauthorized", "invalid_identity", "the identity header is not valid"
    if who.get("role") != "admin":
        return "403 Forbidden", "forbidden", "metrics are for admins"
    return None


def conventional_exposition(sampler: Any = None, db: Any = None) -> Any:
    """A callable giving /metrics' text: every process's families plus the conventional ones (exposition.py)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from appliance.monitor.exposition import ConventionalCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(ConventionalCollector(MultiProcessCollector(None), sampler, db))
    return lambda: generate_latest(registry)


def make_app(cfg: Any, node_id: str, site: Any = None, exposition: Any = None) -> Any:
    """The monitor's WSGI application; `site` serves /status (None: /status answers 404); `exposition` makes /metrics."""
    import orjson

    key = identity.key_bytes(cfg.secrets.identity_key)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        rid = environ.get("HTTP_X_REQUEST_ID")
        if site is not None and (path == "/status" or path.startswith("/status/")):
            return site(environ, start_response)
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [*_JSON, ("Allow", "GET, HEAD")])
            return [error_body("method_not_allowed", f"{method} is not allowed here", request_id=rid)]
        if path == "/metrics":
            refused = _refuse_metrics(environ, cfg, key)
            if refused is not None:
                status, code, message = refused
                start_response(status, _JSON)
                return [error_body(code, message, request_id=rid)]
            try:
                body = (exposition or metrics.exposition)()
            except Exception:  # a torn metrics file must not take the monitor down
                log.exception("reading metrics failed")
                start_response("503 Service Unavailable", _JSON)
                return [error_body("metrics_unavailable", "metrics could not be read; see the monitor log", request_id=rid)]
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Cache-Control", "no-store")])
            return [body]
        if path == "/health/ping":
            start_response("200 OK", _JSON)
            return [orjson.dumps({"status": "ok", "node_id": node_id, "timestamp": now_iso()})]
        start_response("404 Not Found", _JSON)
        return [error_body("not_found", f"no such path: {path[:200]}", request_id=rid)]

    return app


def serve(cfg: Any, index: int) -> int:
    """Role entry: serve the monitor on loopback until SIGTERM: the kernel's pick of port, or [monitor] port when set."""
    metrics.prepare(cfg)
    from waitress.server import create_server

    from appliance import listen_address
    from appliance.db.connection import open_database
    from appliance.db.models import database
    from appliance.monitor.sampler import Sampler
    from appliance.monitor.web import StatusSite

    node_id = f"{cfg.server.node_name or socket.gethostname()}:monitor:{index}"
    # Without connecting: the page serves, and says the database is unreachable, while it is away.
    # A scheduler thread of this process (supervisor/roles.py) may have bound the models first: one handle, one pool.
    db = database.obj if database.obj is not None else open_database(cfg)
    sampler = Sampler(cfg, db, cfg.path(RUN_DIR))
    sampler.start()
    site = StatusSite(cfg, sampler, db)
    server = create_server(
        make_app(cfg, node_id, site, conventional_exposition(sampler, db)),
        host="127.0.0.1",
        port=listen_address.port_for(cfg.monitor.port),
        threads=4,
        ident="appliance-monitor",
    )
    address = listen_address.announce(server.effective_port)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # waitress's run() catches it and shuts its task threads down

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("monitor listening", extra={"fields": {"address": address, "pid": os.getpid()}})
    server.run()
    return 0
