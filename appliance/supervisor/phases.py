"""The arbiter's startup and stop phases (generators stepped once per loop tick, like rollout.py).

Startup: wait (bounded) for the template to be ready, start every child of the table, wait until all are ready (bounded by
startup_timeout); a boot failure (exit 3) or a crash loop fails it at once.
On failure everything is stopped and `appliance run` exits 1, logging the
failing child's last lines; on success one line with the URL and READY=1.

Stop (SIGTERM/SIGINT): STOPPING=1; SIGTERM to the balancer and the task
processes first (the balancer stops accepting and finishes its requests,
workers finish running tasks), then to what sits behind the balancer (api
workers, monitor), all within one grace period; whatever is left at its end
is killed. A second signal kills everything at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Generator
from typing import TYPE_CHECKING

from appliance.balancer.listeners import refuse_new_connections
from appliance.logs import fields
from appliance.supervisor.child import describe_exit, indent

if TYPE_CHECKING:
    from appliance.supervisor.arbiter import Arbiter
    from appliance.supervisor.child import Child

log = logging.getLogger(__name__)

Phase = Generator[None, None, None]
TEMPLATE_WAIT = 20.0  # seconds startup waits for the template before starting children with exec


def startup(arb: Arbiter) -> Phase:
    arb.phase_name = "starting"
    arb.notifier.status("starting")
    deadline = arb.clock() + arb.settings.startup_timeout
    if arb.template is not None:  # children forked from it share its imports; it was started before the migrations
        while not arb.template.settled() and arb.clock() < min(deadline, arb.template.started_at + TEMPLATE_WAIT):
            yield
        if not arb.template.settled():
            log.warning("the template is not ready after %.0fs; children are started with exec until it is", TEMPLATE_WAIT)
    for kind in arb.kinds:
        for slot in range(kind.count):
            arb.spawn(arb.add_child(kind, slot, slot))
    while True:
        broken = next((c for c in arb.children if c.boot_failure or c.state == "failed"), None)
        if broken is not None:
            why = "could not boot" if broken.boot_failure else "crashed repeatedly"
            yield from fail_startup(arb, broken, f"{broken.name} {why} ({describe_exit(broken.exit_status or 0)})")
            return
        pending = [c for c in arb.children if c.state != "up"]
        if not pending:
            break
        if arb.clock() > deadline:
            yield from fail_startup(arb, pending[0], f"{pending[0].name} was not ready within {arb.settings.startup_timeout:.0f}s")
            return
        yield
    yield from routed(arb)
    arb.phase_name = "running"
    log.info("appliance is up on %s (%s)", arb.settings.url, arb.counts(), extra=fields(url=arb.settings.url))
    arb._status_line = arb.serving_line()
    arb.notifier.ready(arb._status_line)


def routed(arb: Arbiter, timeout: float = 5.0) -> Phase:
    """Wait (bounded) until the balancer applied the upstreams as they are now: READY means requests reach them.

    Children forked from the template are up in a fraction of a second, the balancer often
    before the api workers, so it learns of them through the channel just before READY.
    """
    version = arb.channel.version
    if not version or not arb.balancer_serving():
        return
    until = arb.clock() + timeout
    while arb.clock() < until:
        balancers = [c for c in arb.children if c.kind.listeners and c.proc is not None and c.state == "up"]
        states = [arb.channel.read_state(b.index) for b in balancers]
        if all(s is not None and s.version >= version for s in states):
            return
        yield


def fail_startup(arb: Arbiter, child: Child, why: str) -> Phase:
    log.error("startup failed: %s; stopping everything. Its last lines:\n%s", why, indent(child.last_lines(10)))
    arb.notifier.status(f"startup failed: {why}")
    yield from shutdown(arb, exit_code=1, grace=min(5.0, arb.settings.grace_period), notify=False)


def shutdown(arb: Arbiter, exit_code: int, grace: float | None = None, notify: bool = True) -> Phase:
    """Drain: the balancer and task processes first, then what sits behind the balancer; kill at the deadline."""
    arb.stopping = True
    arb.phase_name = "stopping"
    if notify:
        arb.notifier.stopping("draining")
    deadline = arb.clock() + (arb.settings.grace_period if grace is None else grace)
    front = [c for c in arb.children if not c.kind.group]
    behind = [c for c in arb.children if c.kind.group]
    for sock in arb.listeners:
        # No new handshake completes from now on; the balancer serves what is already in the
        # backlog, then closes (appliance/balancer/listeners.py).
        refuse_new_connections(sock)
    for child in front:
        arb.terminate(child)
    arb.close_listeners()  # the balancer holds its own copy until it stops accepting
    while any(c.alive for c in front) and arb.clock() < deadline:
        yield
    for child in behind:
        arb.terminate(child)
    while any(c.alive for c in arb.children) and arb.clock() < deadline:
        yield
    left = [c for c in arb.children if c.alive]
    if left:
        log.warning("grace period over: killing %s", ", ".join(f"{c.name} (pid {c.pid})" for c in left))
        yield from kill_all(arb, exit_code)
        return
    for child in arb.children:
        if child.state in ("backoff", "new"):
            child.state = "stopped"
    log.info("every process stopped; goodbye")
    arb.exit_code = exit_code


def kill_all(arb: Arbiter, exit_code: int = 0) -> Phase:
    arb.stopping = True
    arb.phase_name = "stopping"
    for child in arb.children:
        arb.terminate(child, signal.SIGKILL)
    deadline = arb.clock() + 5.0
    while any(c.alive for c in arb.children) and arb.clock() < deadline:
        yield
    arb.exit_code = exit_code
