"""SIGHUP: re-read the config and replace the processes one at a time, with zero failed requests.

How a reload goes (a phase generator stepped by the arbiter's loop, so
signals and crashes are still handled while it waits):
1. RELOADING=1 to systemd; read and validate the config file again. An
   invalid one is refused with a log line naming the problem; the old
   config keeps serving (READY=1 again).
2. For each api worker slot in turn: start a new worker on a spare index
   (workers + slot, alternating with slot on the next reload; so a spare port
   when base_port is pinned, and its own port the kernel picks by default),
   wait until it answers /health/ping, let the loop add it to
   upstreams.json, mark the old one draining (no new requests), wait until
   balancer-state.json shows the balancer applied that and has nothing in
   flight to it (bounded by grace_period), then SIGTERM the old one.
3. Task workers: the new one starts next to the old one, which then stops
   gracefully (running tasks finish within its grace). The scheduler and the
   monitor are singletons: the old one stops first.
4. The balancers ([balancer] processes) are only replaced when a setting they
   use changed, one at a time like api workers; the supervisor holds the
   listening socket, so the new balancer accepts while the old one finishes
   its requests (and the others keep accepting throughout).
If a new process does not become ready, the reload stops there and the old
processes keep serving.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import msgspec

from appliance.supervisor.kinds import Kind

if TYPE_CHECKING:
    from appliance.supervisor.arbiter import Arbiter
    from appliance.supervisor.child import Child

log = logging.getLogger(__name__)

Phase = Generator[None, None, Any]

# Settings that only take effect when the whole appliance restarts (the supervisor owns them).
RESTART_ONLY = (
    ("server", "data_dir"),
    ("balancer", "listen"),
    ("balancer", "redirect_listen"),
    ("balancer", "backlog"),
)
# Sections the balancer reads: it is replaced on reload only when one of them changed.
BALANCER_SECTIONS = ("server", "balancer", "rate_limits", "auth", "secrets", "redis", "database", "logging", "monitor", "api")


def restart_only_changes(old: Any, new: Any) -> list[str]:
    return [f"[{s}] {k}" for s, k in RESTART_ONLY if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]


def balancer_changed(old: Any, new: Any) -> bool:
    return any(msgspec.json.encode(getattr(old, s)) != msgspec.json.encode(getattr(new, s)) for s in BALANCER_SECTIONS)


def rollout(arb: Arbiter) -> Phase:
    arb.phase_name = "reloading"
    arb.notifier.reloading()
    old_cfg = arb.cfg
    new_cfg = read_new_config(arb)
    if new_cfg is None:
        arb.phase_name = "running"
        return
    arb.cfg = new_cfg
    if arb.settings_for:
        arb.settings = arb.settings_for(new_cfg)
    arb.kinds = arb.kinds_for(new_cfg)
    replace_balancer = balancer_changed(old_cfg, new_cfg)
    replaced, complete = 0, True
    for kind in arb.kinds:
        if kind.listeners and not replace_balancer:
            for child in arb.children:  # its own settings are unchanged; later restarts use the new tree
                if child.kind.role == kind.role:
                    child.kind, child.cfg = kind, new_cfg
            continue
        done, complete = yield from replace_kind(arb, kind)
        replaced += done
        if not complete:
            break
    if complete:
        roles = {k.role for k in arb.kinds}
        for child in [c for c in arb.children if c.kind.role not in roles and not c.retiring]:
            yield from retire(arb, child)
        log.info("reload done: %d processes replaced", replaced, extra={"fields": {"replaced": replaced}})
    arb.phase_name = "running"
    arb.notifier.ready(arb.serving_line())
    if arb.reload_pending:
        arb.reload_pending = False
        yield from rollout(arb)


def read_new_config(arb: Arbiter) -> Any:
    """The config file read again, or None (logged, READY=1 again) when it is refused."""
    source = getattr(arb.cfg, "source", "") or "the config file"
    log.info("SIGHUP: reloading the configuration from %s", source)
    try:
        new_cfg = arb.reload_config() if arb.reload_config else arb.cfg
    except Exception as exc:  # ConfigError names every bad key; anything else must not stop the appliance either
        log.error("reload refused; the running configuration stays: %s", exc)
        arb.notifier.ready(f"{arb.serving_line()}; reload refused: {str(exc).splitlines()[-1].strip()}")
        return None
    for key in restart_only_changes(arb.cfg, new_cfg):
        log.warning("%s changed: it takes effect when the appliance restarts; the reload applies everything else", key)
    return new_cfg


def replace_kind(arb: Arbiter, kind: Kind) -> Phase:
    """Replace every process of one kind, one at a time; (how many, whether all went well)."""
    current = sorted((c for c in arb.children if c.kind.role == kind.role and not c.retiring), key=lambda c: c.slot)
    done = 0
    for old in current:
        if old.slot >= kind.count:
            yield from retire(arb, old)
            continue
        if not (yield from replace(arb, old, kind)):
            return done, False
        done += 1
    for slot in range(len(current), kind.count):
        child = arb.add_child(kind, slot, free_index(arb, kind, slot))
        arb.spawn(child)
        yield from wait_ready(arb, child)
    return done, True


def replace(arb: Arbiter, old: Child, kind: Kind) -> Phase:
    """Put a process with the new config in `old`'s slot; False when the new one did not become ready."""
    if old.proc is None:  # failed, in backoff or stopped: start it afresh with the new config and a clean history
        old.kind, old.cfg, old.restarts = kind, arb.cfg, 0
        old.tracker.reset()
        arb.spawn(old)
        yield from wait_ready(arb, old)
        return True
    if kind.replace == "stop_first":
        old.retiring = True
        arb.terminate(old)
        yield from arb.wait_exit(old, arb.settings.grace_period + 5)
        new = arb.add_child(kind, old.slot, old.index)
        arb.spawn(new)
        if not (yield from wait_ready(arb, new)):
            log.error("the new %s is not ready yet; it stays under supervision", new.name)
        return True
    new = arb.add_child(kind, old.slot, spare_index(arb, kind, old))
    arb.spawn(new)
    if not (yield from wait_ready(arb, new)):
        log.error(
            "reload stopped: the new %s did not become ready; %s keeps serving. Its last lines:\n%s",
            new.name,
            old.name,
            "\n".join("  | " + line for line in new.last_lines(10)),
        )
        yield from discard(arb, new)
        return False
    if kind.drained:
        yield from drain(arb, old)
    old.retiring = True
    arb.terminate(old)
    yield from arb.wait_exit(old, arb.settings.grace_period + 5)
    return True


def wait_ready(arb: Arbiter, child: Child) -> Phase:
    deadline = arb.clock() + arb.settings.startup_timeout
    while arb.clock() < deadline:
        if child.state == "up":
            return True
        if child.state in ("backoff", "failed", "stopped"):  # a new process that crashes does not take over
            return False
        yield
    return False


def drain(arb: Arbiter, child: Child) -> Phase:
    """Take `child` out of the balancer and wait (bounded) until it has nothing in flight."""
    child.state = "draining"
    yield  # the loop publishes upstreams.json with it draining and signals the balancer
    version = arb.channel.version
    address = child.address
    if not arb.balancer_serving() or not address or not child.kind.group:
        return
    deadline = arb.clock() + arb.settings.grace_period
    while arb.clock() < deadline:
        # Every balancer process has its own in-flight counts: drained once none has a request on it.
        balancers = [c for c in arb.children if c.kind.listeners and c.proc is not None and c.state == "up"]
        states = [arb.channel.read_state(b.index) for b in balancers]
        if all(s is not None and s.idle(child.kind.group, address, version) for s in states):
            log.info("%s is drained", child.name)
            return
        yield
    log.warning("%s still had requests in flight after %.0fs of draining; stopping it anyway", child.name, arb.settings.grace_period)


def retire(arb: Arbiter, child: Child) -> Phase:
    """Stop a process that is no longer wanted (fewer workers, a role switched off)."""
    if child.proc is not None and child.kind.drained:
        yield from drain(arb, child)
    yield from discard(arb, child)


def discard(arb: Arbiter, child: Child) -> Phase:
    child.retiring = True
    if child.proc is None:
        if child in arb.children:
            arb.children.remove(child)
        return
    arb.terminate(child, signal.SIGTERM)
    yield from arb.wait_exit(child, arb.settings.grace_period + 5)


def spare_index(arb: Arbiter, kind: Kind, old: Child) -> int:
    """Index (so node id, and fixed port if any) for the process replacing `old`: api workers alternate between slot and slot + count.

    Balancers alternate too: the old one and its replacement each write their own state file.
    """
    if not kind.listens and not kind.listeners:
        return old.index
    used = {c.index for c in arb.children if c.kind.role == kind.role}
    for candidate in (old.slot, old.slot + kind.count):
        if candidate not in used:
            return candidate
    return free_index(arb, kind, 0)


def free_index(arb: Arbiter, kind: Kind, preferred: int) -> int:
    used = {c.index for c in arb.children if c.kind.role == kind.role}
    if preferred not in used:
        return preferred
    i = 0
    while i in used:
        i += 1
    return i
