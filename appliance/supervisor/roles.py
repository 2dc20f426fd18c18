"""The table of roles: every child the supervisor starts, each as `appliance _child ROLE --index N`.

A role is a function `serve(cfg, index) -> exit status` in its own package.
Only the supervisor (and the CLI's `_child`, the template's fork) know every
role, so the table lives here, beside kinds.py. Roles are named by dotted path
and imported with importlib so that nothing imports every role at once but the
template, which preloads them all; the frozen binary bundles them
(packaging collects the package). A child's config: appliance/child_config.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
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
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


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


def available(role: str) -> bool:
    """True when the role's module exists in this build."""
    module = ROLES[role].partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_child(args: argparse.Namespace) -> int:
    from appliance import heartbeat
    from appliance.logs import setup_logging

    cfg = child_config(args)
    setup_logging(args.role, getattr(args, "log_format", None) or cfg.logging.format, cfg.logging.level)
    try:
        serve = resolve(args.role)
    except ImportError as exc:  # a role that cannot even load will not boot by retrying
        logging.getLogger(__name__).error("role %s cannot be loaded: %s", args.role, exc)
        return EXIT_BOOT_FAILURE
    # After the import: a role whose module cannot load never looks alive to the supervisor.
    heartbeat.start(cfg, args.role, args.index)
    return int(serve(cfg, args.index) or 0)
