"""The balancer role: `serve(cfg, index)` runs the proxy until SIGTERM.

Start: pick the event loop (uvloop when installed and wanted), load the
upstreams (control file or standalone), build TLS, the rate limiter and the
token hook (starting the RevocationMirror's polling thread for jwt mode), then
serve on the sockets the supervisor handed over (APPLIANCE_LISTEN_FDS: the
public socket, then the optional redirect socket) or bind [balancer] listen and
redirect_listen itself. A problem that makes serving impossible (bad
certificate, address in use) exits with contract.EXIT_BOOT_FAILURE.

Background upkeep, all off the request path: a sweeper 4x a second (deadlines,
access-log flush), once a second (ejections, idle upstream connections,
metrics, balancer-state.json), the control-file poll every 0.5 s, and the
active health checks every [balancer] health_interval.

Signals: SIGTERM/SIGINT stop gracefully (stop accepting, close idle keep-alive
connections, let in-flight requests finish within [supervisor] grace_period,
then cut the rest); SIGHUP re-reads the certificate and the control file;
SIGUSR1 re-reads the control file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from typing import Any

from appliance import metrics
from appliance.balancer import certs, upstreams
from appliance.balancer.exchange import wake_group
from appliance.balancer.framing import ProtocolError, RequestFramer, RequestHead
from appliance.balancer.listeners import close_listeners
from appliance.balancer.proxy import NEW_CONNECTION_GRACE, Proxy
from appliance.balancer.writer import ERROR_LINES, SECURITY_LINES
from appliance.contract import EXIT_BOOT_FAILURE, LISTEN_FDS_ENV
from appliance.errors import error_body

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25
ACCEPTED_SETTLE = 0.05  # seconds a stop waits for connections accepted just before it to show up
GC_THRESHOLD = 20000  # allocations between young-generation collections (Python default: 700)


class BootError(Exception):
    """The balancer cannot serve with this config or environment."""


def serve(cfg: Any, index: int = 0) -> int:
    """Run the balancer until stopped; the exit status."""
    metrics.prepare(cfg)
    loop_factory = None
    if cfg.balancer.use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            log.info("uvloop is not installed; using the stdlib event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(Balancer(cfg, index).run())
        except BootError as exc:
            log.error("balancer cannot start: %s", exc)
            return EXIT_BOOT_FAILURE


def _bind(address: str) -> socket.socket:
    """A socket bound to `address`, not listening yet."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise BootError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def sockets_handed_over() -> bool:
    """True when the supervisor passed the listening sockets (which it may pass on to another balancer)."""
    return bool(os.environ.get(LISTEN_FDS_ENV, "").strip())


def listen_sockets(cfg: Any) -> tuple[socket.socket, socket.socket | None]:
    """(public socket, redirect socket or None): handed over by the supervisor, or bound here."""
    b = cfg.balancer
    fds = os.environ.get(LISTEN_FDS_ENV, "").strip()
    if sockets_handed_over():
        socks = [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.strip()]
        for s in socks:
            s.setblocking(False)
        return socks[0], (socks[1] if len(socks) > 1 else None)
    # Every socket is bound before any listens, and the public one listens last: the kernel
    # completes a client's TCP handshake as soon as a socket listens, so a balancer that then
    # failed on the next socket (and exits) would reset every client that connected meanwhile,
    # while to them (and to anything polling the port) it looked started.
    addresses = [b.listen, b.redirect_listen] if b.redirect_listen else [b.listen]
    socks: list[socket.socket] = []
    try:
        for address in addresses:
            socks.append(_bind(address))
        # Two sockets with SO_REUSEADDR may share an address until one listens (the redirect
        # socket on the public address): that shows only now.
        for sock, address in reversed(list(zip(socks, addresses, strict=True))):
            try:
                sock.listen(b.backlog)
            except OSError as exc:
                raise BootError(f"cannot listen on {address}: {exc.strerror}") from None
    except BootError:
        for sock in socks:
            sock.close()
        raise
    return socks[0], (socks[1] if len(socks) > 1 else None)


OPEN_REDIRECTS: set[RedirectConnection] = set()


class RedirectConnection(asyncio.Protocol):
    """The plain-HTTP listener next to TLS: every request gets a 308 to the https URL."""

    def __init__(self, base: bytes, https_port: int):
        self.base = base  # from [server] public_url, or empty: derived from Host
        self.https_port = https_port
        self.framer = RequestFramer(self, max_header_bytes=16384, max_body_bytes=0)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened = time.monotonic()
        OPEN_REDIRECTS.add(self)  # a stop waits for the answer (a moment; they are never kept alive)

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN_REDIRECTS.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.framer.feed(data)
        except ProtocolError as exc:
            body = error_body(exc.code, exc.message)
            self.transport.write(
                b"HTTP/1.1 %d Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
                % (exc.status, len(body), ERROR_LINES)
                + body
            )
            self.transport.close()

    def on_request(self, head: RequestHead) -> None:
        if self.base:
            location = self.base + head.target
        else:
            host = head.host.rsplit(b":", 1)[0] if head.host and not head.host.endswith(b"]") else head.host
            port = b"" if self.https_port == 443 else b":%d" % self.https_port
            location = b"https://" + (host or b"localhost") + port + head.target
        self.transport.write(
            b"HTTP/1.1 308 Permanent Redirect\r\nlocation: "
            + location
            + b"\r\ncontent-length: 0\r\n"
            + SECURITY_LINES
            + b"connection: close\r\n\r\n"
        )
        self.transport.close()

    def on_body(self, data: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        pass


class Balancer:
    """One balancer process: sockets, proxy, upkeep tasks and signals."""

    def __init__(self, cfg: Any, index: int = 0):
        self.cfg = cfg
        self.index = index  # which of the [balancer] processes this is (its state file, its limiter slot file)
        self.stop_event: asyncio.Event | None = None
        self.ssl_ctx: Any = None
        self.mirror: Any = None
        self.servers: list[Any] = []
        self.listeners: list[tuple[socket.socket, Any, Any]] = []  # (socket, protocol factory, ssl) per server
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> int:
        cfg, b = self.cfg, self.cfg.balancer
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        table = upstreams.UpstreamTable(cfg, self.index)
        table.load()
        if b.tls_cert:
            try:
                self.ssl_ctx = certs.server_context(cfg.path(b.tls_cert), cfg.path(b.tls_key))
            except (OSError, ValueError) as exc:
                raise BootError(f"TLS certificate {b.tls_cert} / key {b.tls_key} cannot be used: {exc}") from None
        proxy = Proxy(cfg, table, self._limiter(), self._hook(), tls=self.ssl_ctx is not None)
        proxy.loop = loop
        self.proxy = proxy
        main_sock, redirect_sock = listen_sockets(cfg)
        self.servers.append(
            await loop.create_server(
                proxy.factory,
                sock=main_sock,
                ssl=self.ssl_ctx,
                ssl_handshake_timeout=self._handshake_timeout(),
                backlog=b.backlog,
            )
        )
        self.listeners.append((main_sock, proxy.factory, self.ssl_ctx))
        if redirect_sock is not None:
            base = cfg.server.public_url.rstrip("/").encode() if cfg.server.public_url.startswith("https://") else b""
            port = main_sock.getsockname()[1]

            def redirect_factory() -> RedirectConnection:
                return RedirectConnection(base, port)

            self.servers.append(await loop.create_server(redirect_factory, sock=redirect_sock, backlog=b.backlog))
            self.listeners.append((redirect_sock, redirect_factory, None))
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
            (signal.SIGUSR1, self.reload_upstreams),
        ):
            loop.add_signal_handler(sig, handler)
        # What start-up made (modules, config, tables, the hook's keys) lives as long as the process:
        # frozen out of the collector, every collection walks only what requests made since, and
        # the first generation is collected less often (requests make few reference cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        self.tasks = [
            loop.create_task(self._sweeper()),
            loop.create_task(self._poll_control()),
            loop.create_task(self._health_checks()),
        ]
        log.info(
            "balancer listening",
            extra={
                "fields": {
                    "listen": "{}:{}".format(*main_sock.getsockname()[:2]),
                    "tls": self.ssl_ctx is not None,
                    "loop": type(loop).__module__.split(".")[0],
                    "upstreams": {g: [u.address for u in grp.upstreams] for g, grp in table.groups.items()},
                }
            },
        )
        await self.stop_event.wait()
        await self._shutdown()
        return 0

    def _limiter(self) -> Any:
        try:
            from appliance.balancer import limiter
        except ImportError:
            return None
        return limiter.build(self.cfg)

    def _hook(self) -> Any:
        cfg = self.cfg
        if cfg.balancer.auth_mode == "off":
            return None
        try:
            from appliance.balancer import authhook
        except ImportError:
            return None
        if cfg.balancer.auth_mode == "jwt":
            # Plain SQL on a connection of its own: no peewee and no models in the balancer.
            from appliance.revocation_mirror import RevocationMirror, SqlEvents

            self.mirror = RevocationMirror(source=SqlEvents(cfg))
            self.mirror.start_polling()  # a failing poll is retried; tokens are still verified meanwhile
        return authhook.build(cfg, self.mirror)

    # -- signals ----------------------------------------------------------------------------
    def stop(self) -> None:
        if self.stop_event is not None and not self.stop_event.is_set():
            log.info("balancer stopping")
            self.stop_event.set()

    def reload(self) -> None:
        b = self.cfg.balancer
        if self.ssl_ctx is not None:
            try:
                certs.reload(self.ssl_ctx, self.cfg.path(b.tls_cert), self.cfg.path(b.tls_key))
                log.info("TLS certificate reloaded", extra={"fields": {"cert": b.tls_cert}})
            except (OSError, ValueError) as exc:
                log.error("TLS certificate not reloaded, the old one stays: %s", exc)
        self.reload_upstreams()

    def reload_upstreams(self) -> None:
        if self.proxy.upstreams.load(force=True):
            log.info("upstreams reloaded", extra={"fields": {"version": self.proxy.upstreams.version}})

    # -- upkeep -----------------------------------------------------------------------------
    async def _sweeper(self) -> None:
        proxy = self.proxy
        table = proxy.upstreams
        idle_timeout = self.cfg.balancer.upstream_idle_timeout
        last_second = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            proxy.now = now
            try:
                for conn in [c for c in proxy.connections if c.deadline and c.deadline <= now]:
                    conn.on_deadline()
                for group in table.groups.values():
                    if group.waiting:  # slots a new or recovered upstream brought, which no vacate announced
                        wake_group(group, proxy.upstream_max_active)
                proxy.access.flush()
                if now - last_second >= 1.0:
                    last_second = now
                    table.sweep(now, now - idle_timeout)
                    proxy.stats.flush(table.groups, table.take_retired())
                    table.write_state()
            except Exception:
                log.exception("balancer upkeep failed")

    async def _poll_control(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                if self.proxy.upstreams.load():
                    log.info("upstreams reloaded", extra={"fields": {"version": self.proxy.upstreams.version}})
            except Exception:
                log.exception("control file poll failed")

    async def _health_checks(self) -> None:
        b = self.cfg.balancer
        timeout = min(b.health_interval, b.upstream_connect_timeout, 5.0)
        while True:
            await asyncio.sleep(b.health_interval)
            try:
                await upstreams.check_all(self.proxy.upstreams, timeout)
            except Exception:
                log.exception("health checks failed")

    def _handshake_timeout(self) -> float | None:
        return self.cfg.balancer.client_header_timeout if self.ssl_ctx else None

    async def _shutdown(self) -> None:
        proxy = self.proxy
        proxy.closing = True
        adopting = close_listeners(self.servers, self.listeners, self._handshake_timeout(), refuse=not sockets_handed_over())
        grace = self.cfg.supervisor.grace_period
        deadline = time.monotonic() + grace
        if adopting:  # connections from the backlog count once they are the loop's
            await asyncio.wait(adopting, timeout=grace)
        # uvloop accepts eagerly: a connection it took just before the close gets its
        # connection_made in a later callback; let those run before looking for work left.
        await asyncio.sleep(ACCEPTED_SETTLE)
        while (proxy.connections or OPEN_REDIRECTS) and time.monotonic() < deadline:
            now = time.monotonic()
            for conn in list(proxy.connections):
                conn.close_if_idle(now)
            for redirect in [r for r in OPEN_REDIRECTS if now - r.opened >= NEW_CONNECTION_GRACE]:
                redirect.transport.close()
            await asyncio.sleep(0.05)
        for conn in [*proxy.connections, *OPEN_REDIRECTS]:
            conn.transport.abort()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        proxy.access.flush()
        proxy.stats.flush(proxy.upstreams.groups, proxy.upstreams.take_retired())
        proxy.upstreams.write_state(force=True)
        if self.mirror is not None:
            self.mirror.stop()
        for closer in (proxy.limiter, proxy.hook):
            close = getattr(closer, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
        log.info("balancer stopped")
