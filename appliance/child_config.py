"""How a child process gets its config: handed by the supervisor, or read from --config.

The supervisor hands its parsed config to children in the environment variable
APPLIANCE_CONFIG_JSON (the whole tree, parsed once); a child started by hand
reads --config instead. A child forked from the template that is handed the
very config the template inherited uses that object as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from appliance.contract import CONFIG_ENV, EXIT_BOOT_FAILURE

_inherited: tuple[str, Any] | None = None


def inherit_config(cfg: Any) -> None:
    """Called before the template is forked: a child handed this very config uses this object as it is.

    Parsing the tree again would cost every child time and a megabyte or so of pages of its own;
    a child handed another config (after a SIGHUP) parses what it was given.
    """
    global _inherited
    _inherited = (cfg.to_json().decode(), cfg)


def inherited_config() -> Any:
    """The config inherit_config was given in this process (the supervisor, then the template it forked), else None."""
    return _inherited[1] if _inherited is not None else None


def child_config(args: argparse.Namespace) -> Any:
    """The config of this child: the supervisor's (APPLIANCE_CONFIG_JSON) or the --config file's."""
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
