"""GET /openapi.json: an OpenAPI 3.1 document built from the app itself.

The builder walks falcon's router, so every route of the app is in the
document (built-in, tasks/data modules and operator apps alike); each
responder's @operation (appliance.api.operations) gives its summary, auth, query
and body Structs and response Struct, and msgspec turns those Structs into JSON
Schema components. Nothing is written twice: the Structs that validate are the
Structs documented. A responder without @operation is still listed, marked
`x-undocumented`, so the gap is visible (a test refuses it for built-in routes).
"""

from __future__ import annotations

import copy
import re
import threading
from typing import Any

import falcon
import msgspec

from appliance import __version__
from appliance.api.context import ApiContext
from appliance.api.operations import Operation, PageMeta, operation, operation_of
from appliance.api.schemas import ErrorEnvelope, refinements

_FIELD_RE = re.compile(r"\{(\w+)(?::(\w+)[^}]*)?\}")
_REF = "#/components/schemas/{name}"
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_REASONS = {
    400: "bad input; details name the field (json_too_deep past [api] json_max_depth)",
    401: "missing, invalid, expired or revoked credentials",
    403: "authenticated but not allowed (e.g. admin_only_task_type)",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "body too large, or quota_exceeded (the upload quota)",
    415: "wrong content type",
    422: "semantically invalid",
    429: "too many requests (see Retry-After): a rate limit of the balancer, a lockout, or quota_exceeded",
    503: "service unavailable",
}
# NUL cannot be stored (PostgreSQL refuses it in text and jsonb), so every string the server keeps is NUL-free
NUL_FREE = "^[^\\x00]*$"
JSON_VALUE = "JsonValue"
JSON_LEVELS = 12  # JsonValue levels spelled out (deeper schemas make generators recurse too far)
_JSON_REF = {"$ref": _REF.format(name=JSON_VALUE)}
# a path segment the balancer accepts: no encoded '/', '\\' or NUL, and no dot segment
_SEGMENT = {"type": "string", "pattern": r"^([^./\\\x00][^/\\\x00]*|\.[^./\\\x00][^/\\\x00]*|\.\.[^/\\\x00]+)$"}
_DOC = (
    "REST API of the appliance; envelopes and codes per API.md. Rules the schemas cannot state are in each operation's "
    "description, with their error code in its responses. Every JSON body: no NUL characters in any string or key the "
    "server keeps (400 validation_error), nested at most [api] json_max_depth deep (400 json_too_deep), at most "
    "[api] max_body_bytes (413). Every route may answer 429 when a rate-limit zone of the balancer refuses it, and "
    "502/503/504 when no api worker can answer. A number that is integral (5.0) is accepted where an integer is asked for."
)


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


def _path_params(template: str, declared: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Path parameters: ints, segments the balancer passes, or what the operation's `path` Struct declares."""
    params = []
    for name, conv in _FIELD_RE.findall(template):
        schema: dict[str, Any] = {"type": "integer", "format": "int64"} if conv == "int" else dict(_SEGMENT)
        param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
        if declared and name in declared:
            prop = dict(declared[name])
            description = prop.pop("description", None)
            param["schema"] = prop
            if description:
                param["description"] = description
        params.append(param)
    return params


def _struct_props(kind: Any) -> dict[str, Any]:
    schema = msgspec.json.schema(kind)
    ref = schema.get("$ref", "")
    body = schema.get("$defs", {}).get(ref.rsplit("/", 1)[-1], schema) if ref else schema
    return {name: tighten(prop) for name, prop in body.get("properties", {}).items()}


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
        prop = tighten(dict(prop))
        description = prop.pop("description", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


# --- rules the Structs alone do not state ---------------------------------------------------------

_ANY_KEYS = ("type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const", "not")


def tighten(schema: Any) -> Any:
    """A request schema with what the decoder also enforces: NUL-free strings and keys, JSON values anywhere `Any` is.

    Structs that ignore unknown fields are left open (the server drops those fields unread).
    """
    if not isinstance(schema, dict):
        return schema
    if not any(k in schema for k in _ANY_KEYS):  # Any: every JSON value the server keeps
        return {**schema, **_JSON_REF}
    out = dict(schema)
    kind = out.get("type")
    if kind == "string" and not any(k in out for k in ("pattern", "enum", "const", "format", "contentEncoding")):
        out["pattern"] = NUL_FREE
    if kind == "integer":  # 64-bit integers (a larger JSON number is not an integer to the server)
        out.setdefault("minimum", -(2**63))
        out.setdefault("maximum", 2**63 - 1)
    if kind == "array":
        out["items"] = tighten(out["items"]) if "items" in out else _JSON_REF
    if kind == "object" and "properties" not in out:  # a dict: every key and value is kept
        out["propertyNames"] = {"pattern": NUL_FREE}
        extra = out.get("additionalProperties")
        out["additionalProperties"] = _JSON_REF if extra in (None, True) else tighten(extra)
    if "properties" in out:
        out["properties"] = {k: tighten(v) for k, v in out["properties"].items()}
    for key in ("anyOf", "oneOf", "allOf"):
        if key in out:
            out[key] = [tighten(v) for v in out[key]]
    return out


def _json_values(levels: int) -> dict[str, Any]:
    """JsonValue: any JSON value without NUL characters, one component per level (spec tools do not all follow a
    recursive $ref); below `levels` any value is allowed here, though the server refuses NUL at any depth."""
    out: dict[str, Any] = {}
    for level in range(levels):
        name = JSON_VALUE if level == 0 else f"{JSON_VALUE}{level}"
        inner: dict[str, Any] = {"$ref": _REF.format(name=f"{JSON_VALUE}{level + 1}")} if level + 1 < levels else {}
        out[name] = {
            "description": "any JSON value without NUL characters, nested at most [api] json_max_depth deep",
            "anyOf": [
                {"type": "string", "pattern": NUL_FREE},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "array", "items": inner},
                {"type": "object", "propertyNames": {"pattern": NUL_FREE}, "additionalProperties": inner},
            ],
        }
    return out


def _refs(schema: Any, out: set[str]) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            out.add(ref.rsplit("/", 1)[-1])
        for value in schema.values():
            _refs(value, out)
    elif isinstance(schema, list):
        for value in schema:
            _refs(value, out)


def _reachable(roots: set[str], components: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in components:
            continue
        seen.add(name)
        found: set[str] = set()
        _refs(components[name], found)
        todo.extend(found - seen)
    return seen


def _data_schema(ttype: Any, ref: dict[str, Any] | None, components: dict[str, Any]) -> dict[str, Any]:
    """The `data` of one task type: its input Struct; the dict it arrives in is stored as sent, so it is NUL-free too."""
    if ref is None:
        return tighten({"type": "object"})
    body = components.get(_ref_name(ref), {})
    if body.get("additionalProperties") is False:
        return ref
    return {"allOf": [ref, {"type": "object", "propertyNames": {"pattern": NUL_FREE}, "additionalProperties": _JSON_REF}]}


def _by_task_type(base: dict[str, Any], variants: list[tuple[str, dict[str, Any], bool]], field: str = "data") -> dict[str, Any]:
    """One schema per known task type (task_type const + its input schema as `field`), as a oneOf."""
    out = []
    for name, data, needed in variants:
        v = copy.deepcopy(base)
        v["title"] = f"{base.get('title', 'Task')} ({name})"
        v.setdefault("properties", {})["task_type"] = {"const": name}
        v["properties"][field] = data
        required = [r for r in v.get("required", []) if r != field]
        v["required"] = sorted({*required, "task_type", *([field] if needed else [])})
        out.append(v)
    doc = base.get("description", "")
    note = "task_type is one of the known task types (GET /tasks/types); unknown ones answer 400 unknown_task_type"
    return {"title": base.get("title", ""), "description": f"{doc} {note}".strip(), "oneOf": out}


def _task_rules(components: dict[str, Any], types: list[tuple[Any, dict[str, Any] | None]]) -> None:
    """Every request that names a task type: one variant per known type, its data checked against that type's schema."""
    variants = []
    uploads = []
    for ttype, ref in types:
        data = _data_schema(ttype, ref, components)
        body = components.get(_ref_name(ref), {}) if ref else {}
        variants.append((ttype.name, data, bool(body.get("required"))))
        if "upload_id" in body.get("properties", {}):
            params = copy.deepcopy(body)
            params["properties"].pop("upload_id")
            params["required"] = [r for r in params.get("required", []) if r != "upload_id"]
            params["title"] = f"{body.get('title', ttype.name)} parameters"
            if params.get("additionalProperties") is not False:  # the whole object is kept as the task's input
                params.update(propertyNames={"pattern": NUL_FREE}, additionalProperties=_JSON_REF)
            uploads.append((ttype.name, params, bool(params["required"])))
    if not variants:
        return
    for name in ("SubmitRequest", "ScheduleRequest"):
        if name in components:
            components[name] = _by_task_type(components[name], variants)
    form = components.get("ProcessingForm")
    if form is not None and uploads:
        form["properties"]["file"] = {"type": "string", "format": "binary", "description": "the file (a part with a filename)"}
        form["properties"]["processing_type"] = {"enum": [u[0] for u in uploads]}
        if len(uploads) == 1:
            form["properties"]["parameters"] = uploads[0][1]
        else:
            components["ProcessingForm"] = _by_task_type(form, uploads, field="parameters")
            for v in components["ProcessingForm"]["oneOf"]:
                v["properties"]["processing_type"] = v["properties"].pop("task_type")
                v["required"] = sorted({*(r for r in v["required"] if r != "task_type"), "processing_type"})


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _success_schema(op: Operation, data_schema: dict[str, Any] | None) -> dict[str, Any]:
    if not op.envelope:
        return data_schema or {}
    props: dict[str, Any] = {"status": {"const": "success"}, "data": data_schema or {}}
    link = {"type": "string"}
    props["links"] = {"type": "object", "additionalProperties": {"anyOf": [link, {"type": "array", "items": link}]}}
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
    statuses = set(op.errors) | {429}
    if op.rules:
        statuses.add(400)
        listed = "; ".join(f"{field}: {rule} (400 {code})" for field, code, rule in op.rules)
        entry["description"] = (entry.get("description", "") + " Also checked, beyond the schema: " + listed + ".").strip()
        entry["x-unexpressed-rules"] = [{"field": field, "code": code, "status": 400, "rule": rule} for field, code, rule in op.rules]
    if req_i is not None:
        statuses |= {400, 413, 415}
        body_schema = schemas[req_i]
        body = components.get(_ref_name(body_schema), {})
        required = bool(body.get("required") or body.get("oneOf"))
        media: dict[str, Any] = {"schema": body_schema}
        if op.request_media == "multipart/form-data":
            parts = body.get("properties", {})
            media["encoding"] = {k: {"contentType": "application/json"} for k, v in parts.items() if v.get("type") == "object"}
        entry["requestBody"] = {"required": required, "content": {op.request_media: media}}
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


def _task_types(app: falcon.App) -> list[Any]:
    ctx = getattr(app, "ctx", None)
    if ctx is None:
        return []
    from appliance.tasks.registry import registry_for

    reg = registry_for(ctx.cfg)
    return [reg.get(name) for name in reg.names()]


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
    ttypes = [(t, builder.add(t.schema) if t.schema is not None else None) for t in _task_types(app)]
    schemas, components = builder.components()
    for kind, extra in refinements().items():
        name = getattr(kind, "__name__", "")
        if name in components:
            components[name].update(copy.deepcopy(extra))
    _task_rules(components, [(t, schemas[i] if i is not None else None) for t, i in ttypes])
    roots = {_ref_name(schemas[i]) for _, _, _, i, _ in pending if i is not None}
    roots |= {_ref_name(schemas[i]) for _, i in ttypes if i is not None}
    for name in _reachable(roots, components):
        components[name] = tighten(components[name])
    components.update(_json_values(JSON_LEVELS))
    error_ref = schemas[0]
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for template, method, op, req_i, resp_i in pending:
        entry: dict[str, Any] = {"operationId": _operation_id(method, template, seen)}
        params = _path_params(template, _struct_props(op.path) if op is not None and op.path is not None else None)
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
        "info": {"title": title, "version": __version__, "description": _DOC},
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
