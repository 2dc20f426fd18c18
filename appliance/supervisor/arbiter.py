"""The arbiter: one loop that starts, watches, restarts, reloads and stops every child.

Over 500 lines: one loop with one method per duty, sharing the children's state; the long procedures
already live in phases.py and rollout.py.

How it works (gunicorn's arbiter, for many kinds of child):
- Signal handlers only queue the signal and wake the loop (signal.set_wakeup_fd
  on a pipe); the loop dispatches them: SIGTERM/SIGINT -> drain and stop (a
  second one kills what is left), SIGHUP -> reload and rolling restart.
- Each tick: reap dead children without blocking (Popen.poll), schedule their
  restart with backoff or give up on a crash loop (policy.py), start children
  whose backoff is over, probe starting children for readiness, kill children
  whose heartbeat went silent, publish upstreams.json to the balancer when the
  set of ready api workers changed, step the current phase, ping the systemd
  watchdog, and publish a snapshot for `appliance status`.
- Long procedures (startup, rolling restart, drain) are generators stepped
  once per tick ("phases"), so the loop keeps reaping and answering signals
  while they wait; a SIGTERM during a reload simply abandons the reload.
The table of child kinds (kinds.py) is all the arbiter knows about roles.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import listen_address
from appliance.contract import (
    ADDRESS_DIR,
    ADDRESS_FILE_ENV,
    CONFIG_ENV,
    EXIT_BOOT_FAILURE,
    HEARTBEAT_FILE_ENV,
    LISTEN_FDS_ENV,
    SUPERVISOR_PID_ENV,
)
from appliance.logs import fields
from appliance.supervisor import phases, readiness
from appliance.supervisor.channel import Channel
from appliance.supervisor.child import Child, catches, describe_exit, indent
from appliance.supervisor.kinds import Kind
from appliance.supervisor.notify import Notifier
from appliance.supervisor.policy import RestartPolicy, RestartTracker
from appliance.supervisor.relay import Relay
from appliance.supervisor.template import Orphans, Template

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
# systemd's variables are for the supervisor alone; children must not notify or think they were socket-activated.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", LISTEN_FDS_ENV)
Phase = Generator[None, None, None]
ORPHAN_SWEEP = 1.0  # seconds between looks for exited orphans (a subreaper inherits them)


def child_env() -> dict[str, str]:
    """The environment every child starts from: ours without systemd's private variables."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


@dataclass
class Settings:
    """What the arbiter needs besides the kinds; built from the config by main.py (or by tests)."""

    run_dir: Path
    log_format: str = "json"
    startup_timeout: float = 60.0
    grace_period: float = 30.0
    heartbeat_timeout: float = 30.0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    url: str = ""
    tick: float = 0.1

    @classmethod
    def from_config(cls, cfg: Any, run_dir: Path, log_format: str, url: str) -> Settings:
        sup = cfg.supervisor
        return cls(
            run_dir=run_dir,
            log_format=log_format,
            startup_timeout=sup.startup_timeout,
            grace_period=sup.grace_period,
            heartbeat_timeout=sup.heartbeat_timeout,
            policy=RestartPolicy.from_config(cfg),
            url=url,
        )


class Arbiter:
    def __init__(
        self,
        cfg: Any,
        kinds_for: Callable[[Any], list[Kind]],
        settings: Settings,
        *,
        listeners: Iterable[socket.socket] = (),
        notifier: Notifier | None = None,
        reload_config: Callable[[], Any] | None = None,
        settings_for: Callable[[Any], Settings] | None = None,
        on_dead: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        template: Template | None = None,
    ):
        self.cfg = cfg
        self.kinds_for = kinds_for
        self.kinds = kinds_for(cfg)
        self.settings = settings
        self.settings_for = settings_for
        self.listeners = list(listeners)
        self.notifier = notifier or Notifier({})
        self.reload_config = reload_config
        self.on_dead = on_dead
        self.clock = clock
        self.channel = Channel(settings.run_dir)
        self.heartbeat_dir = settings.run_dir / "heartbeat"
        self.address_dir = settings.run_dir / ADDRESS_DIR  # where children that listen announce their port
        self.children: list[Child] = []
        self.signals: deque[int] = deque()
        self.phase: Phase | None = None
        self.phase_name = "starting"
        self.stopping = False
        self.reload_pending = False
        self.exit_code: int | None = None
        self.started_wall = time.time()
        self.snapshot: dict[str, Any] = {}
        self.base_env = child_env()
        self.template = template  # forks children that share its imported code; None: every child is exec'd
        self._next_sweep = 0.0
        self._orphans = Orphans()
        self._wake_r = self._wake_w = -1
        self._spawned = 0
        self._status_line = ""

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; the exit status of `appliance run`."""
        for folder in (self.heartbeat_dir, self.address_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():
                stale.unlink(missing_ok=True)
        self.channel.reset()
        self._install_signals()
        self.phase = phases.startup(self)
        try:
            while self.exit_code is None:
                self._dispatch_signals()
                now = self.clock()
                self._reap(now)
                self._tend_template(now)
                self._respawn(now)
                self._probe(now)
                self._check_hung()
                self._sync_upstreams()
                self._step_phase()
                self._watchdog(now)
                self._publish()
                if self.exit_code is None:
                    self._sleep(self.settings.tick)
        finally:
            self._kill_everything()
            if self.template is not None:
                self.template.stop()
            self._restore_signals()
            self.close_listeners()
            self._publish()
        return self.exit_code

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {sig: signal.signal(sig, self._queue_signal) for sig in SIGNALS}

    def _restore_signals(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(getattr(self, "_old_wakeup", -1))
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _queue_signal(self, sig: int, frame: Any) -> None:
        # Only queue: everything else happens in the loop (the wakeup fd ends its sleep).
        if sig != signal.SIGCHLD:
            self.signals.append(sig)

    def _sleep(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError, OSError):
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                while os.read(self._wake_r, 4096):
                    pass

    def _dispatch_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.handle_stop(sig)
            elif sig == signal.SIGHUP:
                self.handle_reload()

    def handle_stop(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            log.warning("%s again: killing every process now", name)
            self._close_phase()
            self.phase = phases.kill_all(self)
            return
        log.info("%s received: draining, then stopping (grace period %.0fs)", name, self.settings.grace_period)
        self._close_phase()
        self.phase = phases.shutdown(self, exit_code=0)

    def handle_reload(self) -> None:
        if self.phase_name == "reloading":
            log.info("SIGHUP during a reload: another reload follows this one")
            self.reload_pending = True
        elif self.phase_name != "running":
            log.warning("SIGHUP ignored while %s", self.phase_name)
        else:
            from appliance.supervisor.rollout import rollout

            self.phase = rollout(self)

    def _close_phase(self) -> None:
        if self.phase is not None:
            self.phase.close()
            self.phase = None

    def _step_phase(self) -> None:
        if self.phase is None:
            return
        try:
            next(self.phase)
        except StopIteration:
            self.phase = None
        except Exception:
            if self.phase_name != "reloading":
                raise  # startup and shutdown have no fallback: the loop's `finally` kills every child
            log.exception("the reload failed; the processes that run keep serving")
            self.phase, self.phase_name = None, "running"
            self.notifier.ready(self.serving_line())

    # --- children ------------------------------------------------------------------------------

    def add_child(self, kind: Kind, slot: int, index: int) -> Child:
        child = Child(kind=kind, slot=slot, index=index, cfg=self.cfg, tracker=RestartTracker(self.settings.policy))
        self.children.append(child)
        return child

    def heartbeat_path(self, child: Child) -> Path:
        return child.heartbeat or self.heartbeat_dir / "none"

    def spawn(self, child: Child) -> None:
        now = self.clock()
        self._spawned += 1
        if child.heartbeat:
            child.heartbeat.unlink(missing_ok=True)
        hb = child.heartbeat = self.heartbeat_dir / f"{child.kind.role}-{child.index}-{self._spawned}"
        env = dict(self.base_env)
        env[CONFIG_ENV] = child.cfg.to_json().decode()
        env[HEARTBEAT_FILE_ENV] = str(hb)
        self._forget_address(child)
        if child.kind.listens:  # it announces where it listens here; a port the kernel picked is learnt from it
            child.address_file = self.address_dir / hb.name
            env[ADDRESS_FILE_ENV] = str(child.address_file)
        fds: tuple[int, ...] = ()
        if child.kind.listeners and self.listeners:
            fds = tuple(s.fileno() for s in self.listeners)
            env[LISTEN_FDS_ENV] = ",".join(str(fd) for fd in fds)
        command = child.kind.command(child.index)
        proc: Any = self.template.launch(command, env, fds) if self.template is not None else None
        child.via = "template" if proc is not None else "exec"
        try:
            proc = proc or subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
                process_group=0,  # our own group: a terminal's Ctrl-C reaches the supervisor only, which drains in order
            )
        except OSError as exc:
            log.error("cannot start %s: %s", child.name, exc)
            child.started_at = now
            self._after_crash(child, now, None)
            return
        child.proc, child.pid, child.exit_status = proc, proc.pid, None
        child.state = "starting"
        child.started_at, child.started_wall, child.last_probe = now, time.time(), 0.0
        assert proc.stdout is not None
        child.relay = Relay(proc.stdout, child.kind.role, proc.pid, self.settings.log_format)
        log.info(
            "started %s (pid %d, %s)",
            child.name,
            proc.pid,
            "forked from the template" if child.via == "template" else "exec",
            extra=fields(child_role=child.kind.role, child_pid=proc.pid, child_via=child.via),
        )

    def terminate(self, child: Child, sig: int = signal.SIGTERM) -> None:
        if child.proc is None:
            if child.state in ("backoff", "new"):
                child.state = "stopped"
            return
        if sig == signal.SIGTERM and child.state != "stopping":
            child.state = "stopping"
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.proc.pid, sig)

    def _reap(self, now: float) -> None:
        for child in list(self.children):
            if child.proc is None:
                continue
            code = child.proc.poll()
            if code is not None:
                self._on_exit(child, code, now)

    def _on_exit(self, child: Child, code: int, now: float) -> None:
        pid = child.proc.pid if child.proc else 0
        child.proc, child.exit_status = None, code
        self._forget_address(child)
        if child.kind.listeners:  # its last balancer state goes with it: drains and status read the live ones
            self.channel.state_path_for(child.index).unlink(missing_ok=True)
        if self.on_dead:
            with contextlib.suppress(Exception):
                self.on_dead(pid)
        if child.retiring or self.stopping or child.state == "stopping":
            log.info("%s (pid %d) stopped: %s", child.name, pid, describe_exit(code))
            child.state = "stopped"
            if child.retiring and child in self.children:
                self.children.remove(child)
                if child.heartbeat:
                    child.heartbeat.unlink(missing_ok=True)
            return
        child.boot_failure = code == EXIT_BOOT_FAILURE
        self._after_crash(child, now, code)

    def _after_crash(self, child: Child, now: float, code: int | None) -> None:
        what = describe_exit(code) if code is not None else "could not be started"
        tail = child.last_lines(5)
        if not child.kind.restart:
            child.state = "stopped"
            log.warning("%s (pid %s) %s; it is not restarted", child.name, child.pid, what)
            return
        decision = child.tracker.on_exit(now, child.started_at)
        if decision.give_up:
            child.state = "failed"
            log.error(
                "%s %s and crashed %d times within %.0fs: giving up on it; the rest keep serving. Its last lines:\n%s",
                child.name,
                what,
                decision.deaths_in_window,
                self.settings.policy.window,
                indent(tail),
                extra=fields(child_role=child.kind.role, child_state="failed"),
            )
            return
        child.state = "backoff"
        child.next_start = now + decision.delay
        child.restarts += 1
        log.warning(
            "%s (pid %s) %s; restarting it in %.0fs. Its last lines:\n%s",
            child.name,
            child.pid,
            what,
            decision.delay,
            indent(tail),
            extra=fields(child_role=child.kind.role, restart_delay=decision.delay),
        )

    def _tend_template(self, now: float) -> None:
        """Restart the template when it died; reap orphans a child left to us (we are their subreaper)."""
        if self.template is None:
            return
        if not self.stopping:
            self.template.tick(now)
        if now >= self._next_sweep:
            self._next_sweep = now + ORPHAN_SWEEP
            known = {c.proc.pid for c in self.children if c.proc is not None}
            if self.template.pid:
                known.add(self.template.pid)
            self._orphans.sweep(known, now)

    def _respawn(self, now: float) -> None:
        if self.stopping:
            return
        for child in list(self.children):
            if child.state == "backoff" and now >= child.next_start:
                self.spawn(child)

    def _probe(self, now: float) -> None:
        for child in self.children:
            if child.state != "starting" or child.proc is None or now - child.last_probe < 0.1:
                continue
            child.last_probe = now
            if self.is_ready(child, now):
                child.state = "up"
                log.info("%s (pid %d) is ready after %.1fs", child.name, child.proc.pid, now - child.started_at)

    def is_ready(self, child: Child, now: float) -> bool:
        kind = child.kind
        if kind.readiness in ("http", "tcp") and kind.listens:
            address = child.address or self._learn_address(child)
            if address is None:  # it has not bound its port yet
                return False
            return readiness.http_ok(address, kind.ready_path) if kind.readiness == "http" else readiness.tcp_ok(address)
        if kind.readiness == "balancer":
            return readiness.balancer_ready(self.channel.state_path_for(child.index), child.started_wall, child.pid or 0)
        return readiness.heartbeat_ready(self.heartbeat_path(child), child.started_wall, now - child.started_at)

    def _learn_address(self, child: Child) -> str | None:
        if child.address_file is None:
            return None
        child.address = listen_address.read(child.address_file)
        if child.address is not None:
            log.info("%s listens on %s", child.name, child.address, extra=fields(child_role=child.kind.role, address=child.address))
        return child.address

    def _forget_address(self, child: Child) -> None:
        """A process that ends (or is replaced) takes a port the kernel picked with it; a fixed one stays."""
        if child.address_file is not None:
            child.address_file.unlink(missing_ok=True)
            child.address_file = None
        child.address = child.kind.address(child.index)

    def _check_hung(self) -> None:
        if self.stopping:
            return
        wall = time.time()
        for child in self.children:
            if child.proc is None or child.state not in ("starting", "up", "draining"):
                continue
            try:
                last = max(child.started_wall, self.heartbeat_path(child).stat().st_mtime)
            except OSError:
                last = child.started_wall
            silent = wall - last
            if silent > self.settings.heartbeat_timeout:
                log.error("%s (pid %d) sent no heartbeat for %.0fs: killing it", child.name, child.proc.pid, silent)
                self.terminate(child, signal.SIGKILL)
                child.started_wall = wall  # one kill per silence; the reaper restarts it

    # --- the balancer's view ------------------------------------------------------------------------

    def upstream_groups(self) -> dict[str, list[tuple[str, str]]]:
        groups: dict[str, list[tuple[str, str]]] = {k.group: [] for k in self.kinds if k.group}
        for child in self.children:
            group, address = child.kind.group, child.address
            if group and address and child.proc is not None and child.state in ("up", "draining"):
                groups.setdefault(group, []).append((address, "draining" if child.state == "draining" else "up"))
        return groups

    def _sync_upstreams(self) -> None:
        try:
            changed = self.channel.publish(self.upstream_groups())
        except OSError as exc:
            log.error("cannot write %s: %s", self.channel.upstreams_path, exc)
            return
        if changed:
            for child in self.children:
                # A balancer that does not catch SIGUSR1 yet would die of it; it reads the file when it starts
                # and polls its mtime anyway.
                if child.kind.listeners and child.proc is not None and catches(child.proc.pid, signal.SIGUSR1):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.proc.pid, signal.SIGUSR1)

    def balancer_serving(self) -> bool:
        return any(c.kind.listeners and c.proc is not None and c.state == "up" for c in self.children)

    # --- phases --------------------------------------------------------------------------------------

    def wait_exit(self, child: Child, timeout: float) -> Phase:
        """Wait (bounded) for a child we asked to stop; SIGKILL it at the deadline."""
        deadline = self.clock() + timeout
        while child.alive and self.clock() < deadline:
            yield
        if child.alive:
            log.warning("%s (pid %s) did not stop within %.0fs: killing it", child.name, child.pid, timeout)
            self.terminate(child, signal.SIGKILL)
            deadline = self.clock() + 5.0
            while child.alive and self.clock() < deadline:
                yield

    def _kill_everything(self) -> None:
        """Last resort on the way out (an exception in the loop): no child outlives the supervisor."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(5)

    def close_listeners(self) -> None:
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self.listeners = []

    # --- health, watchdog, status ----------------------------------------------------------------------

    def serving_line(self) -> str:
        """systemd's StatusText while it serves: the URL and what runs (e.g. "1 balancer, 2 api, 1 worker")."""
        return f"serving on {self.settings.url}: {self.counts()}"

    def counts(self) -> str:
        """What runs, e.g. "2 api, 1 worker, 1 monitor + scheduler, 1 balancer" (a kind's jobs run in its processes)."""
        return ", ".join(f"{k.count} {' + '.join([k.role, *k.jobs])}" for k in self.kinds)

    def healthy(self) -> bool:
        """All is well enough for the systemd watchdog: the loop runs and the public side can serve."""
        if self.phase_name == "stopping":
            return False
        for kind in self.kinds:
            if (kind.listeners or kind.group == "api") and kind.count:
                mine = [c for c in self.children if c.kind.role == kind.role]
                if mine and all(c.state == "failed" for c in mine):
                    return False
        return True

    def _watchdog(self, now: float) -> None:
        if self.notifier.ping_due(now) and self.healthy():
            self.notifier.ping(now)

    def _publish(self) -> None:
        rows = [
            {
                "role": c.kind.role,
                "index": c.index,
                "slot": c.slot,
                "pid": c.pid if c.proc is not None else None,
                "state": c.state,
                "restarts": c.restarts,
                "started": c.started_wall if c.proc is not None else None,
                "address": c.address,
                "exit_status": c.exit_status,
                "via": c.via,
                "jobs": list(c.kind.jobs),  # other roles' loops it runs in a thread (the monitor: the scheduler)
            }
            for c in self.children
        ]
        # A process replaced by a reload is expected to be starting or stopping; anything else not up is a problem.
        fine = ("up", "draining", "starting", "stopping") if self.phase_name == "reloading" else ("up", "draining")
        degraded = any(r["state"] not in fine for r in rows)
        if self.phase_name == "running":
            problems = [f"{r['role']}[{r['index']}] {r['state']}" for r in rows if r["state"] not in ("up", "draining")]
            summary = self.serving_line() + (f"; {', '.join(problems)}" if problems else "")
            if summary != self._status_line:
                self._status_line = summary
                self.notifier.status(summary)
        if self.template is not None:  # shown, but not part of health: without it children are exec'd
            rows.append(self.template.row())
        self.snapshot = {
            "pid": os.getpid(),
            "phase": self.phase_name,
            "url": self.settings.url,
            "started": self.started_wall,
            "config": getattr(self.cfg, "source", ""),
            "processes": rows,
            "healthy": self.phase_name in ("running", "reloading") and not degraded,
            "upstreams_version": self.channel.version,
        }
