"""The Falcon application factory of an API worker.

`create_app(cfg)` builds the app: middleware (appliance.api.middleware), the
error handlers (appliance.api.error_handlers), then every route module of
ROUTE_MODULES (each exposes `register(app, ctx)`), then the operators' own modules
from [api] apps_dir (appliance.api.operator_apps). A module marked optional
(tasks, data) is skipped when absent from a build; a present module that fails to
import is an error, never skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import falcon

from appliance.api import error_handlers, middleware
from appliance.api.context import ApiContext

log = logging.getLogger(__name__)


# (module, required): each module exposes register(app, ctx).
ROUTE_MODULES: list[tuple[str, bool]] = [
    ("appliance.api.health", True),
    ("appliance.api.auth", True),
    ("appliance.api.mfa", True),
    ("appliance.api.users", True),
    ("appliance.api.stats", True),
    ("appliance.api.tasks", False),
    ("appliance.api.data", False),
    ("appliance.api.openapi", True),
]


class BoundedIntConverter(falcon.routing.IntConverter):
    """`{x:int}` path fields that fit a 64-bit database integer; larger ones match no route (404)."""

    def convert(self, value: str) -> int | None:
        number = super().convert(value)
        if number is None or not -(2**63) <= number < 2**63:
            return None
        return number


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class ApplianceApp(falcon.App):
    """falcon.App with its ApiContext at `.ctx` and its CompiledRouter at `.router`."""

    ctx: ApiContext
    router: falcon.routing.CompiledRouter


def create_app(cfg: Any, *, index: int = 0, db: Any = None, check_responses: bool = False, load_apps: bool = True) -> ApplianceApp:
    """The WSGI app of worker `index`; `app.ctx` is its ApiContext."""
    ctx = ApiContext(cfg=cfg, db=db, index=index, check_responses=check_responses)
    router = falcon.routing.CompiledRouter()
    app = ApplianceApp(middleware=middleware.stack(ctx), cors_enable=False, router=router)
    app.ctx, app.router = ctx, router
    app.router_options.converters["int"] = BoundedIntConverter
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.auto_parse_qs_csv = False
    app.req_options.media_handlers[falcon.MEDIA_JSON] = middleware.json_media(cfg.api.json_max_depth)
    error_handlers.install(app)
    for module, required in ROUTE_MODULES:
        if not required and not _present(module):
            continue
        importlib.import_module(module).register(app, ctx)
    if load_apps and cfg.api.apps_dir:
        from appliance.api import operator_apps

        operator_apps.load_all(app, ctx)
    return app


# --- built once in the template ---------------------------------------------------------------------

_prebuilt: tuple[Any, ApplianceApp] | None = None  # (the config it was built from, the app)


def prebuild(cfg: Any) -> None:
    """Build the app in the template, from the config every child inherits, before any worker is forked.

    Building it costs each worker some 4 MiB of pages of its own (falcon's route and middleware
    setup touches objects all over the shared heap); built here, the workers share it. It opens
    nothing (no database, socket or thread: see ApiContext.bind and start_background). The
    operators' apps are not loaded here: each worker loads them after the fork (adopt_prebuilt).
    """
    global _prebuilt
    app = create_app(cfg, load_apps=False)
    app.router.find("/")  # compiles the router here, not at the first request of every worker
    _prebuilt = (cfg, app)


def adopt_prebuilt(cfg: Any, index: int, db: Any) -> ApplianceApp | None:
    """The template's app for worker `index` with this process's database, when it was built from `cfg`, else None.

    A worker handed another config (after a SIGHUP) or forked from a template that built none
    builds its own with create_app. Raises operator_apps.AppLoadError like create_app.
    """
    global _prebuilt
    if _prebuilt is None or _prebuilt[0] is not cfg:
        return None
    app = _prebuilt[1]
    _prebuilt = None  # one worker per process: a second call builds its own
    app.ctx.bind(db, index)
    if cfg.api.apps_dir:
        from appliance.api import operator_apps

        operator_apps.load_all(app, app.ctx)
    return app
