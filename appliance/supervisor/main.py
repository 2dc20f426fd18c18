"""`appliance run`: everything that happens before the arbiter's loop, in order, and its teardown.

1. Read and validate the config (a bad one exits 2 naming every bad key; nothing has started).
2. Take the data dir's lock (one appliance per data dir; a second one exits naming the pid).
   Before that, with no thread, socket or database open yet: import every role's code and
   fork the template process children are forked from (appliance/template.py), the
   supervisor being their child subreaper, so all share those pages.
3. Apply pending migrations (so children never race to create tables).
4. Empty and prepare the shared metrics directory, before any child starts.
5. Open the public listening socket(s): the supervisor holds them for its
   whole life and hands them to each balancer it starts, so a balancer that
   dies leaves new connections waiting in the backlog, never refused.
6. Start the control socket and run the arbiter until it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from appliance import heartbeat, metrics, onefile
from appliance.contract import RUN_DIR
from appliance.logs import setup_logging
from appliance.supervisor.arbiter import Arbiter, Settings, child_env
from appliance.supervisor.channel import Channel
from appliance.supervisor.control import ControlServer, socket_path
from appliance.supervisor.kinds import appliance_kinds, template_command
from appliance.supervisor.lock import AlreadyRunning, DataDirLock
from appliance.supervisor.notify import Notifier
from appliance.supervisor.policy import RestartPolicy
from appliance.supervisor.template import Template, subreaper

log = logging.getLogger("appliance.supervisor")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def run_dir(cfg: Any) -> Path:
    return cfg.path(RUN_DIR)


def public_url(cfg: Any) -> str:
    if cfg.server.public_url:
        return cfg.server.public_url
    host, _, port = cfg.balancer.listen.rpartition(":")
    scheme = "https" if cfg.balancer.tls_cert else "http"
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(host, host)
    return f"{scheme}://{shown}:{port}"


def open_listener(address: str, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port ([v6]:port too), inheritable by the balancer."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def open_listeners(cfg: Any) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for key in ("listen", "redirect_listen"):
        address = getattr(cfg.balancer, key)
        if not address:
            continue
        try:
            socks.append(open_listener(address, cfg.balancer.backlog))
        except OSError as exc:
            for s in socks:
                s.close()
            raise OSError(f"cannot listen on [balancer] {key} = {address!r}: {exc.strerror or exc}; is another server using it?") from None
    return socks


def migrate(cfg: Any) -> None:
    from appliance import db

    handle = db.open_database(cfg)
    try:
        with db.translated():
            handle.connect(reuse_if_open=True)
            for number, name in db.migrate(handle):
                log.info("applied migration %d: %s", number, name)
    finally:
        with contextlib.suppress(Exception):
            handle.close()


def status_extras(cfg: Any, channel: Channel, snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
    """Upstream health (from the balancer processes) and queue depth (from the database) for `appliance status`."""
    out: dict[str, Any] = {}
    live = None
    if snapshot is not None:  # only the state files of the balancer processes running now
        live = {r["pid"] for r in snapshot.get("processes", []) if r.get("role") == "balancer" and r.get("pid")}
    state = channel.combined_state(live)
    out["upstreams"] = state.upstreams if state else None
    try:
        from appliance import db
        from appliance.db.connection import make_database
        from appliance.db.models import Task

        handle = make_database(cfg)
        with db.translated(), handle.connection_context():
            out["queue"] = {s: Task.select().where(Task.status == s).count(handle) for s in ("queued", "running")}
    except Exception as exc:  # status must answer even with the database down
        out["queue"] = {"error": str(exc)[:200]}
    return out


def load(path: str | None) -> Any:
    from appliance.config import load_config

    return load_config(path)


def run(args: argparse.Namespace) -> int:
    """`appliance run`; returns the process exit status."""
    from appliance.config import ConfigError

    config_path = getattr(args, "config", None)
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    fmt = getattr(args, "log_format", None) or cfg.logging.format
    setup_logging("supervisor", fmt, cfg.logging.level)
    onefile.detach_group()  # one-file binary: a signal to the whole group reaches us once, through the bootloader
    template, code = start_template(cfg, fmt)
    if code is not None:
        return code  # this is the template, or a child it forked, on its way out
    try:
        return _run_supervisor(cfg, fmt, template)
    finally:
        if template is not None:
            template.stop()


def _run_supervisor(cfg: Any, fmt: str, template: Template | None) -> int:
    lock = DataDirLock(run_dir(cfg) / "appliance.lock")
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        onefile.sweep_stale(run_dir(cfg))  # the unpacked dir of a one-file start that was SIGKILLed
        return _run_locked(cfg, cfg.source, fmt, template)
    finally:
        lock.release()


def start_template(cfg: Any, fmt: str) -> tuple[Template | None, int | None]:
    """The template (zygote) children are forked from: (template, None) here, (None, exit status) in the fork.

    This process imports every role's code first, then forks the template before it has a
    thread, a socket or a database connection, so the template and every child share those
    pages with the supervisor too. None when `[supervisor] template = false` or when we cannot
    be the children's subreaper (a child the template forks must become ours); then every child
    is started with exec.
    """
    if not cfg.supervisor.template:
        return None, None
    if not subreaper():
        log.warning("cannot become a child subreaper (prctl): children are started with exec, without the template")
        return None, None
    import gc

    from appliance import template as preloader
    from appliance.child_config import inherit_config

    os.environ[metrics.ENV] = str(metrics.metrics_dir(cfg))  # prepared (emptied) before any child starts
    _, failed = preloader.preload()
    for line in failed:
        log.warning("cannot preload %s", line)
    inherit_config(cfg)
    gc.collect()
    gc.freeze()
    template = Template(lambda fd: template_command(fd, fmt), child_env(), fmt, RestartPolicy.from_config(cfg))
    code = template.fork_first()
    return (None, code) if code is not None else (template, None)


def _run_locked(cfg: Any, source: str, fmt: str, template: Template | None) -> int:
    from appliance import db

    try:
        migrate(cfg)
    except db.DatabaseError as exc:
        log.error("database %s cannot be used: %s; check [database] url and that the server runs", db.describe(cfg), exc)
        return EXIT_FAIL
    metrics.prepare(cfg, reset=True)
    try:
        listeners = open_listeners(cfg)
    except OSError as exc:
        log.error("%s", exc)
        return EXIT_FAIL
    url = public_url(cfg)
    rdir = run_dir(cfg)
    arbiter = Arbiter(
        cfg,
        lambda c: appliance_kinds(c, fmt),
        Settings.from_config(cfg, rdir, fmt, url),
        listeners=listeners,
        notifier=Notifier(onefile.notify_env()),
        reload_config=lambda: load(source),
        settings_for=lambda c: Settings.from_config(c, rdir, fmt, url),
        on_dead=metrics.mark_dead,
        template=template,
    )
    beat = heartbeat.Heartbeat(cfg, "supervisor", 0, env={})  # its own row in /health/nodes (no file, no parent check)
    beat.start()
    control = ControlServer(
        socket_path(rdir), lambda: arbiter.snapshot, lambda: status_extras(arbiter.cfg, arbiter.channel, arbiter.snapshot)
    )
    control.start()
    try:
        return arbiter.run()
    finally:
        control.stop()
        beat.stop()
        arbiter.notifier.close()
