"""The data resources: file upload with processing, bulk import, reading a dataset.

POST /api/data-processing takes multipart/form-data with `file`,
`processing_type` (a task type, e.g. csv_profile) and `parameters` (JSON
object). The file part is streamed to <data_dir>/uploads/<id>/<name> in 64 KiB
chunks, never held in memory; beyond [api] upload_max_bytes the partial file is
removed and the answer is 413. Then a task of the processing type runs with
{**parameters, "upload_id": id} as its input (validated like any submit).

POST /api/data/bulk-import submits a bulk_import task (records inline or an
uploaded file by id; callback_url receives the completion or error callback).
GET /api/data/{dataset} lists stored records, paginated: a user sees the
records their own imports stored, an admin every record. Dataset names that
are also routes under /api/data/ (RESERVED_DATASETS: `bulk-import`) are refused
at import (400 reserved_dataset_name), so no dataset hides behind a route.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from typing import Annotated, Any

import falcon
import msgspec
import orjson
from msgspec import Meta

from appliance import jsondepth
from appliance.api.context import ApiContext
from appliance.api.operations import Page, ok, operation, paginate, require_user
from appliance.api.readers import has_nul, read_json, read_query
from appliance.api.schemas import refine
from appliance.api.tasks import SubmitOut, caller_of, task_links
from appliance.db.models import DataRecord, Task, Upload
from appliance.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from appliance.tasks import quotas, records, service
from appliance.tasks.dataprocs import DATASET_RE, BulkImportFields, BulkImportInput
from appliance.times import iso

CHUNK = 65536
FIELD_MAX = 65536  # bytes of a form field other than the file
TAGS = ("data",)
# names that are routes beside /api/data/{dataset}: a dataset of that name could not be read
RESERVED_DATASETS = ("bulk-import",)
DatasetName = Annotated[
    str,
    Meta(
        pattern=DATASET_RE,
        description="1-100 letters, digits, _ . - (not a reserved name)",
        extra_json_schema={"not": {"enum": list(RESERVED_DATASETS)}},
    ),
]


class UploadOut(msgspec.Struct, kw_only=True):
    upload_id: str
    filename: str
    size: int


class ProcessingOut(SubmitOut, kw_only=True):
    upload: UploadOut


class ProcessingForm(msgspec.Struct, kw_only=True):
    """The multipart form (documented; parsed by hand so the file streams)."""

    file: bytes
    processing_type: str
    parameters: str = "{}"


# The bulk_import task's input (appliance.tasks.dataprocs, one schema) plus where to call back and the priority.
class BulkImportRequest(BulkImportFields, kw_only=True, forbid_unknown_fields=True):
    dataset: DatasetName  # documents the reserved names too
    callback_url: str | None = None
    priority: Annotated[int, Meta(ge=1, le=10)] = 5


# "exactly one of records or source_file_id" (checked by BulkImportInput when the task is admitted)
_ONE_SOURCE = {
    "oneOf": [
        {"required": ["records"], "properties": {"records": {"type": "array"}, "source_file_id": {"type": "null"}}},
        {"required": ["source_file_id"], "properties": {"source_file_id": {"type": "string"}, "records": {"type": "null"}}},
    ]
}
refine(BulkImportRequest, **_ONE_SOURCE)
refine(BulkImportInput, **_ONE_SOURCE)


class DatasetPath(msgspec.Struct, kw_only=True):
    dataset: DatasetName


class RecordOut(msgspec.Struct, kw_only=True):
    id: int
    dataset: str
    data: Any
    task_id: str | None
    created_at: str


def _safe_name(name: str | None) -> str:
    base = os.path.basename((name or "upload").replace("\\", "/"))
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:200]
    return base or "upload"


class DataProcessing:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Upload a file and run a processing task on it (multipart: file, processing_type, parameters)",
        request=ProcessingForm,
        request_media="multipart/form-data",
        response=ProcessingOut,
        auth="user",
        errors=(400, 403, 404, 413, 415, 429, 503),
        tags=TAGS,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        cfg = self.ctx.cfg
        media = (req.content_type or "").split(";", 1)[0].strip().lower()
        if media != "multipart/form-data":
            raise UnsupportedMediaType("the body must be multipart/form-data", details={"content_type": (req.content_type or "")[:100]})
        quotas.check_pending(cfg, caller)  # before the file is written: the task would be refused after it
        limit, too_large = self._limit(cfg, caller, req.content_length)
        upload_id = records.new_id()
        folder = cfg.path("uploads") / upload_id
        fields: dict[str, str] = {}
        saved: tuple[str, str, int, str] | None = None
        try:
            try:
                form = req.get_media()
                for part in form:
                    if part.name == "file" and part.filename is not None:
                        if saved is not None:
                            raise BadRequest("only one file per upload", details={"field": "file"})
                        saved = self._stream(part, folder, limit, too_large)
                    elif part.name in ("processing_type", "parameters"):
                        fields[part.name] = self._text(part)
            except falcon.MediaMalformedError as exc:
                raise BadRequest(f"the multipart body is malformed: {exc.description or exc.title}", code="invalid_multipart") from None
            if saved is None:
                raise ValidationFailed("a file part named 'file' is required", field="file")
            ptype = fields.get("processing_type", "").strip()
            if not ptype:
                raise ValidationFailed("processing_type is required", field="processing_type")
            jsondepth.check(fields.get("parameters", "{}"), cfg.api.json_max_depth, field="parameters")
            try:
                params = orjson.loads(fields.get("parameters", "{}"))  # absent: {}; present: a JSON object
            except orjson.JSONDecodeError:
                raise ValidationFailed("parameters must be a JSON object", field="parameters") from None
            if not isinstance(params, dict):
                raise ValidationFailed("parameters must be a JSON object", field="parameters")
            if has_nul(params):
                raise ValidationFailed("strings must not contain NUL characters", field="parameters")
            name, path, size, ctype = saved
            Upload.create(id=upload_id, owner=caller.user_id, filename=name, path=path, size=size, content_type=ctype[:200])
            try:
                out = service.submit(cfg, caller, service.SubmitRequest(task_type=ptype, data={**params, "upload_id": upload_id}))
            except Exception:
                Upload.delete().where(Upload.id == upload_id).execute()
                raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        out["upload"] = {"upload_id": upload_id, "filename": name, "size": size}
        ok(resp, out, links=task_links(out["task_id"]))

    @staticmethod
    def _limit(cfg: Any, caller: service.Caller, length: int | None) -> tuple[int, Callable[[int], Exception]]:
        """The most bytes this upload may have, and the error past it: [api] upload_max_bytes (413
        payload_too_large), or what is left of the caller's upload quota when that is less (413 quota_exceeded)."""
        limit = cfg.api.upload_max_bytes

        def too_large(size: int) -> Exception:
            return PayloadTooLarge(f"upload is larger than {limit} bytes", details={"limit": limit})

        if length is not None and length > limit + 65536:  # the form's own parts may add a little
            raise too_large(length)
        budget = quotas.upload_budget(cfg, caller)
        if budget is None:
            return limit, too_large
        quota, stored = budget
        room = max(0, quota - stored)
        if room == 0 or (length is not None and length > room + 65536):
            raise quotas.upload_exceeded(quota, stored, length or 1)
        if room >= limit:
            return limit, too_large
        return room, lambda size: quotas.upload_exceeded(quota, stored, size)

    @staticmethod
    def _text(part: Any) -> str:
        """A form field as text, whatever Content-Type the part names (parameters is often application/json)."""
        raw = part.stream.read(FIELD_MAX + 1)
        if len(raw) > FIELD_MAX:
            raise ValidationFailed(f"{part.name} is larger than {FIELD_MAX} bytes", field=part.name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationFailed(f"{part.name} must be UTF-8 text", field=part.name) from None

    @staticmethod
    def _stream(part: Any, folder: Any, limit: int, too_large: Callable[[int], Exception]) -> tuple[str, str, int, str]:
        folder.mkdir(parents=True, exist_ok=True)
        name = _safe_name(part.filename)
        path = folder / name
        size = 0
        with open(path, "wb") as fh:
            while True:
                chunk = part.stream.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise too_large(size)
                fh.write(chunk)
        return name, str(path), size, part.content_type or "application/octet-stream"


class BulkImport:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Validate and store records in a dataset (a task)",
        request=BulkImportRequest,
        response=SubmitOut,
        auth="user",
        errors=(400, 404, 429, 503),
        tags=TAGS,
        rules=(
            ("callback_url", "validation_error|callback_refused", "an http(s) URL whose host is no internal address or localhost name"),
        ),
        description="Dataset names that are routes under /api/data/ (bulk-import) are refused: 400 reserved_dataset_name.",
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        body: BulkImportRequest = read_json(req, BulkImportRequest)
        if body.dataset in RESERVED_DATASETS:
            raise ValidationFailed(
                f"dataset name {body.dataset!r} is reserved: GET /api/data/{body.dataset} is another route",
                field="dataset",
                code="reserved_dataset_name",
            )
        if body.source_file_id is not None:
            up = Upload.get_or_none(Upload.id == body.source_file_id)
            if up is None or not (caller.admin or up.owner_id == caller.user_id):
                raise NotFound(f"no uploaded file {body.source_file_id!r}", details={"field": "source_file_id"})
        data = msgspec.to_builtins(body)
        callback = data.pop("callback_url", None)
        priority = data.pop("priority", 5)
        data = {k: v for k, v in data.items() if v is not None}
        callbacks = service.Callbacks(completion_url=callback, error_url=callback) if callback else None
        try:
            req_obj = service.SubmitRequest(task_type="bulk_import", data=data, priority=priority, callbacks=callbacks)
            out = service.submit(self.ctx.cfg, caller, req_obj)
        except ValidationFailed as exc:
            where = exc.details.get("field", "")
            if where.startswith("callbacks."):
                exc.details["field"] = "callback_url"
            elif where.startswith("data."):
                exc.details["field"] = where[5:]
            raise
        ok(resp, out, links=task_links(out["task_id"]))


class DatasetQuery(Page, kw_only=True):
    per_page: Annotated[int, Meta(ge=1, le=1000, description="records per page")] = 50


class Dataset:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "The stored records of a dataset, paginated",
        query=DatasetQuery,
        path=DatasetPath,
        response=list[RecordOut],
        auth="user",
        errors=(400,),
        paginated=True,
        tags=TAGS,
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response, dataset: str) -> None:
        who = require_user(req)
        if not re.match(DATASET_RE, dataset):
            raise ValidationFailed("dataset names are 1-100 letters, digits, _ . -", field="dataset")
        q: DatasetQuery = read_query(req, DatasetQuery)
        query = DataRecord.select().where(DataRecord.dataset == dataset)
        if not who.is_admin:
            query = query.join(Task, on=(DataRecord.task_id == Task.id)).where(Task.owner == who.user_id)
        rows, meta = paginate(query.order_by(DataRecord.id), q)
        items = [{"id": r.id, "dataset": r.dataset, "data": r.data, "task_id": r.task_id, "created_at": iso(r.created_at)} for r in rows]
        ok(resp, items, metadata=meta, links={"dataset": f"/api/data/{dataset}"})


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/api/data-processing", DataProcessing(ctx))
    app.add_route("/api/data/bulk-import", BulkImport(ctx))
    app.add_route("/api/data/{dataset}", Dataset(ctx))
