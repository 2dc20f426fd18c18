"""GET /openapi.json: an OpenAPI 3.1 document built from the app itself.

The builder walks falcon's router, so every route of the app is in the
document (built-in, tasks/data modules and operator apps alike); each
responder's @operation (appliance.api.helpers) gives its summary, auth, query
and body Structs and response Struct, and msgspec turns those Structs into JSON
Schema components. Nothing is written twice: the Structs that validate are the
Structs documented. A responder without @operation is still listed, marked
`x-undocumented`, so the gap is visible (a test refuses it for built-in routes).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import falcon
import msgspec

from appliance import __version__
from appliance.api.context import ApiContext
from appliance.api.helpers import Operation, PageMeta, operation, operation_of
from appliance.api.schemas import ErrorEnvelope

_FIELD_RE = re.compile(r"\{(\w+)(?::(\w+)[^}]*)?\}")
_REF = "#/components/schemas/{name}"
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_REASONS = {
    400: "bad input; details name the field",
    401: "missing, invalid, expired or revoked credentials",
    403: "authenticated but not allowed",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "body too large",
    415: "wrong content type",
    422: "semantically invalid",
    429: "too many requests (see Retry-After)",
    503: "service unavailable",
}


def routes(app: falcon.App) -> list[tuple[str, str, Any]]:
    """(uri_template, METHOD, responder) of every responder a resource defines."""
    out: list[tuple[str, str, Any]] = []

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.resource is not None and node.method_map:
                for method, responder in node.method_map.items():
                    if method in _METHODS and getattr(responder, "__self__", None) is node.resource:
                        out.append((node.uri_template, method, responder))
            walk(node.children)

    walk(app._router._roots)  # falcon's compiled router keeps its tree here
    return sorted(out)


def openapi_path(template: str) -> str:
    return _FIELD_RE.sub(lambda m: "{" + m.group(1) + "}", template)


def _path_params(template: str) -> list[dict[str, Any]]:
    params = []
    for name, conv in _FIELD_RE.findall(template):
        schema: dict[str, Any] = {"type": "integer", "format": "int64"} if conv == "int" else {"type": "string"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


class _Builder:
    def __init__(self) -> None:
        self.types: list[Any] = [ErrorEnvelope, PageMeta]

    def add(self, kind: Any) -> int:
        self.types.append(kind)
        return len(self.types) - 1

    def components(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        schemas, components = msgspec.json.schema_components(self.types, ref_template=_REF)
        return list(schemas), components


def _query_params(kind: Any) -> list[dict[str, Any]]:
    schema = msgspec.json.schema(kind)
    defs = schema.get("$defs", {})
    ref = schema.get("$ref", "")
    body = defs.get(ref.rsplit("/", 1)[-1], schema) if ref else schema
    required = set(body.get("required", []))
    params = []
    for name, prop in body.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _success_schema(op: Operation, data_schema: dict[str, Any] | None) -> dict[str, Any]:
    if not op.envelope:
        return data_schema or {}
    props: dict[str, Any] = {"status": {"const": "success"}, "data": data_schema or {}}
    props["links"] = {"type": "object", "additionalProperties": {"type": "string"}}
    props["metadata"] = {"$ref": _REF.format(name="PageMeta")} if op.paginated else {"type": "object"}
    return {"type": "object", "required": ["status", "data"], "properties": props}


def _operation_id(method: str, template: str, seen: set[str]) -> str:
    base = method.lower() + "_" + (re.sub(r"[^A-Za-z0-9]+", "_", openapi_path(template)).strip("_") or "root")
    name, n = base, 2
    while name in seen:
        name, n = f"{base}_{n}", n + 1
    seen.add(name)
    return name


def _describe(
    entry: dict[str, Any],
    op: Operation,
    params: list[dict[str, Any]],
    schemas: list[dict[str, Any]],
    components: dict[str, Any],
    req_i: int | None,
    resp_i: int | None,
    errors: dict[str, Any],
) -> None:
    """Fill one operation object from its @operation declaration."""
    error_ref = schemas[0]
    entry["summary"] = op.summary
    if op.description:
        entry["description"] = op.description
    if op.tags:
        entry["tags"] = list(op.tags)
    if op.query is not None:
        params += _query_params(op.query)
    if params:
        entry["parameters"] = params
    statuses = set(op.errors)
    if req_i is not None:
        statuses |= {400, 413, 415}
        body_schema = schemas[req_i]
        required = bool(components.get(_ref_name(body_schema), {}).get("required"))
        entry["requestBody"] = {"required": required, "content": {op.request_media: {"schema": body_schema}}}
    if op.query is not None:
        statuses.add(400)
    if op.auth:
        statuses.add(401)
        entry["security"] = [{"bearer": []}]
    if op.auth == "admin":
        statuses.add(403)
    success = _success_schema(op, schemas[resp_i] if resp_i is not None else None)
    content = _json(success)
    for media in op.response_media:
        content[media] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(op.status): {"description": "success", "content": content}}
    for status in op.also:
        responses[str(status)] = {"description": _REASONS.get(status, "see description"), "content": content}
    for status in sorted(statuses):
        responses.setdefault(str(status), {"description": _REASONS.get(status, "error"), "content": _json(error_ref)})
    responses.update(errors)
    entry["responses"] = responses


def build(app: falcon.App, title: str = "Appliance API") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of `app`."""
    builder = _Builder()
    found = routes(app)
    pending: list[tuple[str, str, Operation | None, int | None, int | None]] = []
    for template, method, responder in found:
        op = operation_of(responder)
        req_i = builder.add(op.request) if op is not None and op.request is not None else None
        resp_i = builder.add(op.response) if op is not None and op.response is not None else None
        pending.append((template, method, op, req_i, resp_i))
    schemas, components = builder.components()
    error_ref = schemas[0]
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for template, method, op, req_i, resp_i in pending:
        entry: dict[str, Any] = {"operationId": _operation_id(method, template, seen)}
        params = _path_params(template)
        errors = {"default": {"description": "error", "content": _json(error_ref)}}
        if op is None:
            entry.update(summary="undocumented", responses=errors, **{"x-undocumented": True})
            if params:
                entry["parameters"] = params
            paths.setdefault(openapi_path(template), {})[method.lower()] = entry
            continue
        _describe(entry, op, params, schemas, components, req_i, resp_i, errors)
        paths.setdefault(openapi_path(template), {})[method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__, "description": "REST API of the appliance; envelopes and codes per API.md."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def _ref_name(schema: dict[str, Any]) -> str:
    return str(schema.get("$ref", "")).rsplit("/", 1)[-1]


class OpenApiResource:
    def __init__(self, app: falcon.App, ctx: ApiContext):
        self.app = app
        self.ctx = ctx
        self._doc: bytes | None = None
        self._lock = threading.Lock()

    @operation("The OpenAPI 3.1 document of this API", response=dict[str, Any], envelope=False, tags=("meta",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._doc is None:
            with self._lock:
                if self._doc is None:
                    self._doc = msgspec.json.encode(build(self.app))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._doc


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/openapi.json", OpenApiResource(app, ctx))
