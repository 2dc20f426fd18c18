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
    """falcon.App with its ApiContext at `.ctx`."""

    ctx: ApiContext


def create_app(cfg: Any, *, index: int = 0, db: Any = None, check_responses: bool = False, load_apps: bool = True) -> ApplianceApp:
    """The WSGI app of worker `index`; `app.ctx` is its ApiContext."""
    ctx = ApiContext(cfg=cfg, db=db, index=index, check_responses=check_responses)
    app = ApplianceApp(middleware=middleware.stack(ctx), cors_enable=False)
    app.ctx = ctx
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
