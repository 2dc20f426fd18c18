"""Operators' own API modules, loaded from [api] apps_dir into every worker.

Each `*.py` file in the directory (sorted; names starting with "_" skipped) is
imported as module `appliance_apps.<stem>` and must expose `setup(app, ctx)`,
which adds Falcon routes exactly like a built-in route module: `@operation`
declarations (so the routes appear in /openapi.json), `require_user`, `ok`,
`read_json` and AppError from `appliance.api` / `appliance.errors`, and models
bound to `appliance.db.database` (create their tables in setup with
`ctx.db.create_tables([...], safe=True)`). A file that fails to import or to set
up raises AppLoadError naming the file and the error, and the worker does not start.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from appliance import plugins
from appliance.api.context import ApiContext

log = logging.getLogger(__name__)
PACKAGE = "appliance_apps"


class AppLoadError(Exception):
    """An operator module could not be loaded; the message names the file and the error."""


def app_files(cfg: Any) -> list[Path]:
    folder = cfg.path(cfg.api.apps_dir)
    if not folder.is_dir():
        raise AppLoadError(f"[api] apps_dir {folder} is not a directory")
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    return f" (line {frames[-1].lineno})" if frames else ""


def load_file(app: Any, ctx: ApiContext, path: Path) -> Any:
    try:
        module = plugins.load_module(path, PACKAGE)
    except Exception as exc:
        raise AppLoadError(f"operator app {path} failed to import{_where(exc, path)}: {type(exc).__name__}: {exc}") from exc
    setup = getattr(module, "setup", None)
    if not callable(setup):
        raise AppLoadError(f"operator app {path} has no setup(app, ctx) function")
    try:
        setup(app, ctx)
    except Exception as exc:
        raise AppLoadError(f"operator app {path} failed in setup(){_where(exc, path)}: {type(exc).__name__}: {exc}") from exc
    log.info("operator app loaded", extra={"fields": {"app": str(path)}})
    return module


def load_all(app: Any, ctx: ApiContext) -> list[Any]:
    """Load every operator module; AppLoadError on the first that fails."""
    if PACKAGE not in sys.modules:
        pkg = type(sys)(PACKAGE)
        pkg.__path__ = []  # a namespace for the operators' modules
        sys.modules[PACKAGE] = pkg
    return [load_file(app, ctx, path) for path in app_files(ctx.cfg)]
