"""The table of roles: every child the supervisor starts, each as `appliance _child ROLE --index N`.

A role is a function `serve(cfg, index) -> exit status` in its own package.
Only the supervisor (and the CLI's `_child`, the template's fork) know every
role, so the table lives here, beside kinds.py. Roles are named by dotted path
and imported with importlib so that nothing imports every role at once but the
template, which preloads them all; the frozen binary bundles them
(packaging collects the package). A child's config: appliance/child_config.py.

A role's process may also run another role's loop in a thread of its own (JOBS,
`hosted_jobs`): the monitor runs the scheduler's ("housekeeping": a once-a-second
cron tick and a sampler buy nothing from a process each, and the scheduler process
cost some 12 MiB PSS). run_child starts those threads next to the role, stops them
when the role returns (its SIGTERM), and exits 1 when one died, so that the
supervisor restarts the process. The roles themselves still import no other role.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from appliance.child_config import child_config
from appliance.contract import EXIT_BOOT_FAILURE

ROLES: dict[str, str] = {
    "balancer": "appliance.balancer.server:serve",
    "api": "appliance.api.server:serve",
    "worker": "appliance.queue.worker:serve",
    "scheduler": "appliance.queue.scheduler:serve",
    "monitor": "appliance.monitor.server:serve",
}

# What a role builds in the template from the config every child inherits, before any child is forked:
# `fn(cfg)`, opening no database, socket or thread. Each child of the role then shares it (api: its app).
PREPARE: dict[str, str] = {"api": "appliance.api.app:prebuild"}

# Loops that another role's process runs in a thread of its own: `fn(cfg, stop: threading.Event)`, returning when stop is set.
JOBS: dict[str, str] = {"scheduler": "appliance.queue.scheduler:hosted"}
JOB_STOP_TIMEOUT = 10.0  # seconds a job may take to finish its tick after the role stopped (bounded by the grace period)

log = logging.getLogger(__name__)

# The template (appliance/template.py) imports, once, every module of this package (roles import
# much of it lazily while they set up: create_app alone imports some twenty) and these libraries
# the roles import lazily, so every child forked from it shares those pages. Importing opens nothing.
PRELOAD_LIBRARIES = ("uvloop", "waitress", "waitress.server", "pyotp", "psutil")
# prometheus_client picks its value class when imported: only import it where the multiprocess dir is set.
METRICS_MODULES = ("prometheus_client", "prometheus_client.multiprocess")


def resolve(role: str) -> Any:
    target = ROLES.get(role)
    if target is None:
        raise SystemExit(f"appliance: unknown role {role!r}; known roles: {', '.join(ROLES)}")
    return _load(target)


def _load(target: str) -> Any:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def hosted_jobs(role: str, cfg: Any) -> tuple[str, ...]:
    """The other roles whose loop the process of `role` runs: the scheduler's in the monitor while [monitor] enabled.

    kinds.appliance_kinds starts no process of their own then; both read this one rule.
    """
    return ("scheduler",) if role == "monitor" and cfg.monitor.enabled else ()


def _stop_this_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class HostedJob(threading.Thread):
    """Another role's loop `fn(cfg, stop)` in a thread of this process.

    The loop catches its own per-tick errors. If the thread still ends without being asked
    to (an exception that got out, or the loop returned), it calls `on_death`: by default the
    process sends itself SIGTERM, so the role stops as it does for the supervisor, and
    run_child exits 1; the supervisor then restarts it instead of keeping a process that
    looks alive while its scheduler is gone.
    """

    def __init__(self, name: str, fn: Callable[[Any, threading.Event], Any], cfg: Any, on_death: Callable[[], None] | None = None):
        super().__init__(name=name, daemon=True)
        self.fn, self.cfg = fn, cfg
        self.stopping = threading.Event()
        self.died: str | None = None
        self.on_death = on_death or _stop_this_process

    def run(self) -> None:
        try:
            self.fn(self.cfg, self.stopping)
            if self.stopping.is_set():
                return
            self.died = "its loop returned"
        except BaseException as exc:  # whatever ended the thread, the process must not go on without it
            self.died = f"{type(exc).__name__}: {exc}"
            log.exception("the %s thread raised", self.name)
        log.error(
            "the %s thread died (%s): stopping this process so that the supervisor restarts it",
            self.name,
            self.died,
            extra={"fields": {"job": self.name, "died": self.died}},
        )
        if not self.stopping.is_set():  # already stopping: run_child's exit status says it (1)
            self.on_death()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.join(timeout)
        if self.is_alive():
            log.warning("the %s thread did not finish within %.0f s; leaving it", self.name, timeout)


def start_jobs(cfg: Any, names: tuple[str, ...]) -> list[HostedJob]:
    """Start a HostedJob for each name of JOBS; raises ImportError when one cannot be loaded."""
    jobs = [HostedJob(name, _load(JOBS[name]), cfg) for name in names]
    for job in jobs:
        job.start()
    return jobs


def stop_jobs(jobs: list[HostedJob], status: int, cfg: Any) -> int:
    """Stop the jobs once the role has returned `status`; 1 instead of 0 when one of them died."""
    timeout = min(JOB_STOP_TIMEOUT, cfg.supervisor.grace_period)
    for job in jobs:
        job.stop(timeout)
    if status == 0 and any(job.died for job in jobs):
        return 1
    return status


def preload_modules() -> list[str]:
    """Every module the template imports: each role's own, every module of this package, then libraries."""
    import pkgutil

    import appliance

    names = [target.partition(":")[0] for target in ROLES.values()]
    names += [m.name for m in pkgutil.walk_packages(appliance.__path__, "appliance.") if not m.name.endswith("__main__")]
    names += PRELOAD_LIBRARIES
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        names += METRICS_MODULES
    return names


def prepare_in_template(cfg: Any) -> list[str]:
    """Run every role's PREPARE step; the problems (role: error) of those that failed (their children build their own)."""
    failed = []
    for role, target in PREPARE.items():
        if not available(role):
            continue
        try:
            _load(target)(cfg)
        except Exception as exc:  # the role's children do the same work themselves, and report what fails
            failed.append(f"{role}: {type(exc).__name__}: {exc}")
    return failed


def available(role: str) -> bool:
    """True when the role's module exists in this build."""
    module = ROLES[role].partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# The front door keeps the supervisor's priority; every other role runs [supervisor] worker_nice lower.
FRONT_ROLES = frozenset({"balancer"})


def lower_priority(role: str, cfg: Any) -> None:
    """Make this child [supervisor] worker_nice nicer than its parent, unless it is the balancer.

    Before any thread starts: on Linux niceness is per thread, and threads inherit their creator's.
    On a saturated machine the balancer's one thread then gets the CPU when it has work, instead of
    a 1/30 share beside the workers' threads (clients saw a p99 of 1.3 s at 256 connections while
    the balancer's own was 250 ms: their requests waited to be read and written).
    """
    if role in FRONT_ROLES or not cfg.supervisor.worker_nice:
        return
    try:
        os.nice(cfg.supervisor.worker_nice)
    except OSError as exc:  # pragma: no cover - raising niceness is always allowed; keep serving regardless
        log.warning("cannot lower this process's priority: %s", exc)


def run_child(args: argparse.Namespace) -> int:
    from appliance import heartbeat
    from appliance.logs import setup_logging

    cfg = child_config(args)
    lower_priority(args.role, cfg)
    setup_logging(args.role, getattr(args, "log_format", None) or cfg.logging.format, cfg.logging.level)
    names = hosted_jobs(args.role, cfg)
    try:
        serve = resolve(args.role)
        for name in names:
            _load(JOBS[name])
    except ImportError as exc:  # a role that cannot even load will not boot by retrying
        log.error("role %s cannot be loaded: %s", args.role, exc)
        return EXIT_BOOT_FAILURE
    if names:  # /health/nodes shows it in this process's info
        heartbeat.set_info(jobs=list(names))
    # After the import: a role whose module cannot load never looks alive to the supervisor.
    heartbeat.start(cfg, args.role, args.index)
    jobs = start_jobs(cfg, names)
    status = int(serve(cfg, args.index) or 0)
    return stop_jobs(jobs, status, cfg)
