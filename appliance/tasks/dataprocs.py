"""Data task types: csv_profile (profile an uploaded CSV) and bulk_import (validate and store records).

csv_profile streams the file line by line (never loading it whole): rows,
columns, and per column the inferred type, nulls, min/max/mean of numbers,
min/max length of text and the distinct count (exact up to `max_distinct`
values per column, then reported as a lower bound). Progress follows bytes read.

bulk_import takes records inline or from an uploaded file (CSV with a header,
a JSON array, or JSON lines), checks each against `validation_rules`
(required, type, min, max, min_length, max_length, pattern, choices), and
stores valid ones in the named dataset (data_record rows) in transactions of
`batch_size`. error_handling skip_invalid skips bad records (reasons kept, the
first 100 listed); stop ends at the first bad record, keeping what was stored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from appliance.db.models import DataRecord, Upload, database
from appliance.errors import NotFound
from appliance.tasks import datalimits, jsonstream, patterns
from appliance.tasks.registry import owner_rights, task_type

DATASET_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MAX_REASONS = 100


def owned_upload(upload_id: str, user_id: int | None, admin: bool, field: str = "upload_id") -> Upload:
    """The upload when the caller may read it (its owner or an admin), else NotFound: ids are no oracle."""
    up = Upload.get_or_none(Upload.id == upload_id)
    if up is None or not (admin or (user_id is not None and up.owner_id == user_id)):
        raise NotFound(f"no uploaded file {upload_id!r}", details={"field": field})
    return up


def _upload_path(upload_id: str, ctx: Any) -> tuple[str, int]:
    """Path and size of an upload the task's owner may read (checked again here: submit was a while ago)."""
    user_id, admin = owner_rights(ctx.owner_id)
    up = owned_upload(upload_id, user_id, admin)
    return up.path, up.size


class CsvProfileInput(msgspec.Struct, kw_only=True):
    upload_id: Annotated[str, Meta(min_length=1, max_length=32)]
    delimiter: Annotated[str, Meta(min_length=1, max_length=1)] = ","
    has_header: bool = True
    encoding: str = "utf-8"
    max_distinct: Annotated[int, Meta(ge=0, le=1_000_000)] = 10000


_BOOLS = {"true", "false", "yes", "no"}
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")


class _Column:
    __slots__ = ("name", "count", "nulls", "kinds", "num_min", "num_max", "num_sum", "num_n", "len_min", "len_max", "distinct", "capped")

    def __init__(self, name: str):
        self.name = name
        self.count = self.nulls = self.num_n = 0
        self.kinds: dict[str, int] = {}
        self.num_min = math.inf
        self.num_max = -math.inf
        self.num_sum = 0.0
        self.len_min: int | None = None
        self.len_max = 0
        self.distinct: set[str] = set()
        self.capped = False

    def add(self, value: str, max_distinct: int) -> None:
        self.count += 1
        v = value.strip()
        if not v or v.lower() in ("null", "none", "na", "n/a"):
            self.nulls += 1
            return
        kind = _kind(v)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if kind in ("integer", "float"):
            x = float(v)
            if math.isfinite(x):
                self.num_n += 1
                self.num_sum += x
                self.num_min = min(self.num_min, x)
                self.num_max = max(self.num_max, x)
        n = len(v)
        self.len_min = n if self.len_min is None else min(self.len_min, n)
        self.len_max = max(self.len_max, n)
        if not self.capped:
            self.distinct.add(v)
            if len(self.distinct) > max_distinct:
                self.capped = True

    def summary(self) -> dict[str, Any]:
        kinds = set(self.kinds)
        if not kinds:
            ctype = "empty"
        elif len(kinds) == 1:
            ctype = kinds.pop()
        elif kinds <= {"integer", "float"}:
            ctype = "float"
        else:
            ctype = "string"
        out: dict[str, Any] = {
            "name": self.name,
            "type": ctype,
            "count": self.count,
            "nulls": self.nulls,
            "distinct": len(self.distinct),
            "distinct_is_lower_bound": self.capped,
            "type_counts": self.kinds,
        }
        if self.num_n:
            out.update(min=_num(self.num_min), max=_num(self.num_max), mean=self.num_sum / self.num_n)
        if self.len_min is not None:
            out.update(min_length=self.len_min, max_length=self.len_max)
        return out


def _num(x: float) -> float | int:
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _kind(v: str) -> str:
    try:
        int(v)
        return "integer"
    except ValueError:
        pass
    try:
        float(v)
        return "float"
    except ValueError:
        pass
    if v.lower() in _BOOLS:
        return "boolean"
    if _DATE_RE.match(v):
        return "date"
    return "string"


def _lines(fh: Any, encoding: str, seen: list[int], max_bytes: int) -> Iterator[str]:
    for raw in datalimits.bounded_lines(fh, max_bytes, seen):
        yield raw.decode(encoding, errors="replace")


def _limits(ctx: Any) -> Any:
    """The config whose [queue] limits apply (a context built outside a worker has none: the defaults)."""
    cfg = getattr(ctx, "cfg", None)
    if cfg is None:
        from appliance.config import Config

        cfg = Config()
    return cfg


def _profile_access(data: CsvProfileInput, user_id: int | None, admin: bool) -> None:
    owned_upload(data.upload_id, user_id, admin, "data.upload_id")


@task_type(
    "csv_profile",
    schema=CsvProfileInput,
    description="profiles an uploaded CSV file: rows, columns, types, nulls, min/max/mean, distinct",
    access=_profile_access,
)
def csv_profile(ctx: Any, data: CsvProfileInput) -> dict[str, Any]:
    path, size = _upload_path(data.upload_id, ctx)
    seen = [0]
    columns: list[_Column] = []
    rows = 0
    ragged = 0
    next_report = 0.0
    cfg = _limits(ctx)
    with open(path, "rb") as fh:
        reader = datalimits.csv_rows(_lines(fh, data.encoding, seen, cfg.queue.data_max_record_bytes), cfg, data.delimiter)
        for record in reader:
            if not columns:
                names = record if data.has_header else [f"column_{i + 1}" for i in range(len(record))]
                columns = [_Column(n or f"column_{i + 1}") for i, n in enumerate(names)]
                if data.has_header:
                    continue
            rows += 1
            if len(record) != len(columns):
                ragged += 1
                while len(record) > len(columns):
                    columns.append(_Column(f"column_{len(columns) + 1}"))
            for col, value in zip(columns, record, strict=False):
                col.add(value, data.max_distinct)
            if rows % 2000 == 0 and size:
                pct = 100.0 * seen[0] / size
                if pct >= next_report:
                    ctx.progress(min(pct, 99.0), f"{rows} rows read")
                    next_report = pct + 5
                else:
                    ctx.check()
    ctx.progress(100, f"{rows} rows profiled")
    return {
        "rows": rows,
        "columns": len(columns),
        "ragged_rows": ragged,
        "bytes": seen[0],
        "column_profiles": [c.summary() for c in columns],
    }


# --- bulk import ------------------------------------------------------------------------


class Rule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    field: Annotated[str, Meta(min_length=1, max_length=200)]
    required: bool = False
    type: Literal["string", "integer", "number", "boolean", "object", "array"] | None = None
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: Annotated[str, Meta(max_length=patterns.MAX_PATTERN)] | None = None
    choices: list[Any] | None = None


# The one schema of a bulk import: the task's input and, with its HTTP extras, the body of
# POST /api/data/bulk-import (appliance.api.data.BulkImportRequest subclasses it).
class BulkImportFields(msgspec.Struct, kw_only=True):
    dataset: Annotated[str, Meta(pattern=DATASET_RE)]
    records: list[dict[str, Any]] | None = None
    source_file_id: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=10000)] = 500
    validation_rules: list[Rule] = []
    error_handling: Literal["skip_invalid", "stop"] = "skip_invalid"


class BulkImportInput(BulkImportFields, kw_only=True):
    def __post_init__(self) -> None:
        if (self.records is None) == (self.source_file_id is None):
            raise ValueError("give exactly one of records or source_file_id")
        for rule in self.validation_rules:
            if rule.pattern is not None:
                try:
                    patterns.compile_pattern(rule.pattern)
                except patterns.PatternError as exc:
                    raise ValueError(f"validation rule for {rule.field}: bad pattern: {exc}") from None


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def check_record(record: Any, rules: list[Rule]) -> str | None:
    """None when the record passes every rule, else the reason."""
    if not isinstance(record, dict):
        return "record is not an object"
    for r in rules:
        present = r.field in record and record[r.field] is not None and record[r.field] != ""
        if not present:
            if r.required:
                return f"{r.field}: required"
            continue
        v = record[r.field]
        if r.type:
            ok = isinstance(v, _TYPES[r.type]) and not (r.type in ("integer", "number") and isinstance(v, bool))
            if not ok:
                return f"{r.field}: expected {r.type}"
        if r.min is not None and isinstance(v, int | float) and v < r.min:
            return f"{r.field}: below {_num(float(r.min))}"
        if r.max is not None and isinstance(v, int | float) and v > r.max:
            return f"{r.field}: above {_num(float(r.max))}"
        if isinstance(v, str | list):
            if r.min_length is not None and len(v) < r.min_length:
                return f"{r.field}: shorter than {r.min_length}"
            if r.max_length is not None and len(v) > r.max_length:
                return f"{r.field}: longer than {r.max_length}"
        if r.pattern is not None and (not isinstance(v, str) or not patterns.fullmatch(r.pattern, v)):
            return f"{r.field}: does not match {r.pattern}"
        if r.choices is not None and v not in r.choices:
            return f"{r.field}: not one of the allowed values"
    return None


def _file_records(upload_id: str, ctx: Any) -> Iterator[Any]:
    path, _ = _upload_path(upload_id, ctx)
    cfg = _limits(ctx)
    longest, depth = cfg.queue.data_max_record_bytes, cfg.api.json_max_depth
    with open(path, "rb") as fh:  # every reader holds one record at a time, at most `longest` bytes
        head = fh.read(4096).lstrip()[:1]
        fh.seek(0)
        if path.lower().endswith(".csv"):
            yield from datalimits.csv_dicts((raw.decode("utf-8", "replace") for raw in datalimits.bounded_lines(fh, longest)), cfg)
        elif head == b"[":
            yield from jsonstream.array_records(fh, longest, depth)
        else:
            yield from jsonstream.line_records(fh, longest, depth)


def _import_access(data: BulkImportInput, user_id: int | None, admin: bool) -> None:
    if data.source_file_id is not None:
        owned_upload(data.source_file_id, user_id, admin, "data.source_file_id")


@task_type("bulk_import", schema=BulkImportInput, description="validates records and stores them in a dataset", access=_import_access)
def bulk_import(ctx: Any, data: BulkImportInput) -> dict[str, Any]:
    source = iter(data.records) if data.records is not None else _file_records(data.source_file_id or "", ctx)
    total_hint = len(data.records) if data.records is not None else 0
    imported = skipped = failed = 0
    reasons: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    stopped = False

    def store() -> None:
        nonlocal imported, failed
        if not batch:
            return
        try:
            with database.atomic():
                DataRecord.insert_many(batch).execute()
            imported += len(batch)
        except Exception as exc:  # the batch is lost, the import goes on
            failed += len(batch)
            ctx.log(f"storing a batch of {len(batch)} failed: {type(exc).__name__}", "error")
        batch.clear()

    index = -1
    for index, record in enumerate(source):
        reason = check_record(record, data.validation_rules)
        if reason is not None:
            if data.error_handling == "stop":
                failed += 1
                reasons.append({"index": index, "reason": reason})
                stopped = True
                break
            skipped += 1
            if len(reasons) < MAX_REASONS:
                reasons.append({"index": index, "reason": reason})
            continue
        batch.append({"dataset": data.dataset, "data": record, "task_id": ctx.task_id})
        if len(batch) >= data.batch_size:
            store()
            pct = 100.0 * (index + 1) / total_hint if total_hint else 50.0
            ctx.progress(min(pct, 99.0), f"{imported} imported")
    store()  # with stop, the valid records before the bad one are kept too
    ctx.progress(100, f"{imported} imported, {skipped} skipped, {failed} failed")
    return {
        "dataset": data.dataset,
        "processed": index + 1,
        "imported": imported,
        "skipped": skipped,
        "failed": failed,
        "stopped": stopped,
        "skipped_reasons": reasons,
    }
