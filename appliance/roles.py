"""The child roles the supervisor starts, each as `appliance _child ROLE --index N`.

A role is a function `serve(cfg, index) -> exit status` in its own package.
The supervisor hands its parsed config to children in the environment
variable APPLIANCE_CONFIG_JSON (the whole tree, parsed once); a child started
by hand reads --config instead. Roles are named by dotted path so that no role
imports another, and the frozen binary bundles them all (packaging lists them).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

from appliance.contract import CONFIG_ENV  # callers name it roles.CONFIG_ENV too

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

EXIT_BOOT_FAILURE = 3  # a child that cannot boot exits with this; the supervisor does not retry forever


_inherited: tuple[str, Any] | None = None


def inherit_config(cfg: Any) -> None:
    """Called before the template is forked: a child handed this very config uses this object as it is.

    Parsing the tree again would cost every child time and a megabyte or so of pages of its own;
    a child handed another config (after a SIGHUP) parses what it was given.
    """
    global _inherited
    _inherited = (cfg.to_json().decode(), cfg)


def child_config(args: argparse.Namespace) -> Any:
    from appliance.config import Config, ConfigError, load_config

    raw = os.environ.get(CONFIG_ENV)
    if raw:
        if _inherited is not None and raw == _inherited[0]:
            return _inherited[1]
        return Config.from_json(raw)
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BOOT_FAILURE) from None


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
