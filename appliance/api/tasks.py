"""The /tasks resources: submit, batch, chain, schedules, status, cancel, logs, stats, list.

Thin HTTP adapters over appliance.tasks.service and appliance.tasks.schedules,
which hold the rules (validation, ownership; appliance.tasks.lifecycle the status). A user sees
and changes only their own tasks and schedules (others' answer 404); an
admin sees all. GET /tasks/logs/{id} answers text/plain when the client's
Accept prefers it, JSON otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import falcon
import msgspec
from msgspec import Meta

from appliance.api.context import ApiContext
from appliance.api.operations import Page, ok, operation, page_meta, require_user
from appliance.api.readers import read_json, read_query
from appliance.tasks import patterns, schedules, service
from appliance.tasks.registry import registry_for
from appliance.tasks.schedules import SchedulePatch, ScheduleRequest
from appliance.tasks.service import BatchRequest, CancelRequest, ChainRequest, SubmitRequest

TAGS = ("tasks",)

_URL_RULE = "an http(s) URL of at most 2000 ASCII characters without credentials whose host is no internal address or localhost name"
# A task type's input checks that its JSON Schema cannot state (registry.TaskType.parse; the 400 names `data`).
_DATA_RULE = (
    "the task type's own checks beyond its input schema: bulk_import takes exactly one of records or source_file_id,"
    f" and each validation_rules[].pattern is an RE2 regular expression of at most {patterns.MAX_PATTERN} characters"
    " (no backreferences or lookaround)"
)
_SUBMIT_RULES = (("callbacks.*", "validation_error|callback_refused", _URL_RULE), ("data", "validation_error", _DATA_RULE))
_GROUP_RULES = (("tasks[].callbacks.*", "validation_error|callback_refused", _URL_RULE), ("tasks[].data", "validation_error", _DATA_RULE))
_CRON_RULES = (
    ("schedule.expression", "validation_error", "a valid 5-field cron expression"),
    ("schedule.timezone", "validation_error", "an IANA time zone name"),
    ("data", "validation_error", _DATA_RULE),
)


# --- response shapes (what /openapi.json documents; checked in tests) ----------------------------


class Progress(msgspec.Struct, kw_only=True):
    percentage: float
    message: str


class Execution(msgspec.Struct, kw_only=True):
    worker_id: str | None
    started_at: str | None
    finished_at: str | None
    running_time: float | None
    attempt: int
    retries: int
    max_retries: int


class HistoryItem(msgspec.Struct, kw_only=True):
    status: str
    message: str
    timestamp: str


class TaskErrorOut(msgspec.Struct, kw_only=True):
    code: str | None
    message: str | None


class TaskOut(msgspec.Struct, kw_only=True):
    task_id: str
    task_type: str
    status: Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
    priority: int
    owner_id: int | None
    created_at: str
    eta: str | None
    progress: Progress
    execution: Execution
    result: Any = None
    error: TaskErrorOut | None = None
    cancel_requested: bool = False
    group_id: str | None = None
    group_index: int | None = None
    schedule_id: int | None = None
    history: list[HistoryItem] | None = None
    input: Any = None
    callbacks: list[str] | None = None


class SubmitOut(msgspec.Struct, kw_only=True):
    task_id: str
    status: str
    priority: int
    task_type: str
    created_at: str
    eta: str | None = None


class GroupOut(msgspec.Struct, kw_only=True):
    batch_id: str | None = None
    chain_id: str | None = None
    name: str
    execution_mode: str
    failure_strategy: str
    status: str
    task_ids: list[str]
    created_at: str


class GroupTask(msgspec.Struct, kw_only=True):
    task_id: str
    index: int | None
    task_type: str
    status: str


class GroupStatusOut(msgspec.Struct, kw_only=True):
    batch_id: str | None = None
    chain_id: str | None = None
    kind: str
    name: str
    status: str
    execution_mode: str
    failure_strategy: str
    created_at: str
    finished_at: str | None
    total: int
    counts: dict[str, int]
    tasks: list[GroupTask]


class CronOut(msgspec.Struct, kw_only=True):
    type: str
    expression: str
    timezone: str


class ScheduleOut(msgspec.Struct, kw_only=True):
    schedule_id: int
    name: str
    task_type: str
    schedule: CronOut
    data: dict[str, Any]
    priority: int
    active: bool
    max_iterations: int | None
    iterations: int
    last_run_at: str | None
    next_run_at: str | None
    owner_id: int | None
    created_at: str
    updated_at: str


class DeletedOut(msgspec.Struct, kw_only=True):
    schedule_id: int
    deleted: bool


class CancelOut(msgspec.Struct, kw_only=True):
    task_id: str
    status: str
    cancel_requested: bool
    force: bool


class LogLine(msgspec.Struct, kw_only=True):
    timestamp: str
    level: str
    line: str


class LogsOut(msgspec.Struct, kw_only=True):
    task_id: str
    logs: list[LogLine]
    total: int


class StatsOut(msgspec.Struct, kw_only=True):
    overview: dict[str, Any]
    performance: dict[str, Any]
    by_type: list[dict[str, Any]]
    workers: dict[str, Any]
    queue: dict[str, Any]
    generated_at: str


class TaskTypeOut(msgspec.Struct, kw_only=True):
    name: str
    description: str
    source: str
    schema: dict[str, Any]
    admin_only: bool = False
    admin_only_when: str | None = None  # which inputs only an administrator may submit


class TasksQuery(Page, kw_only=True):
    status: Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"] | None = None
    task_type: Annotated[str, Meta(max_length=100)] | None = None


class LogsQuery(Page, kw_only=True):
    per_page: Annotated[int, Meta(ge=1, le=10000, description="log lines per page")] = 1000


def caller_of(req: falcon.Request) -> service.Caller:
    who = require_user(req)
    return service.Caller(who.user_id, who.is_admin)


def task_links(task_id: str) -> dict[str, str]:
    return {"status": f"/tasks/status/{task_id}", "cancel": f"/tasks/cancel/{task_id}", "logs": f"/tasks/logs/{task_id}"}


# --- resources ---------------------------------------------------------------------------------------


def _submission(name: str, summary: str, request: Any, response: Any, rules: Any, submit: Any, links: Any) -> type:
    """A resource whose POST submits work, the skeleton Submit, Batch and Chain share: read the declared
    request, hand it to `submit(cfg, caller, body)` (appliance.tasks.service), answer with `links(out)`."""

    class Submission:
        def __init__(self, ctx: ApiContext):
            self.ctx = ctx

        @operation(summary, request=request, response=response, auth="user", errors=(400, 403, 404, 429, 503), tags=TAGS, rules=rules)
        def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
            caller = caller_of(req)
            out = submit(self.ctx.cfg, caller, read_json(req, request))
            ok(resp, out, links=links(out))

    Submission.__name__ = Submission.__qualname__ = name
    return Submission


def _group_links(kind: str) -> Any:
    def links(out: dict[str, Any]) -> dict[str, Any]:
        return {"status": f"/tasks/{kind}/{out[f'{kind}_id']}", "tasks": [f"/tasks/status/{t}" for t in out["task_ids"]]}

    return links


Submit = _submission(
    "Submit",
    "Submit a task (priority 1 = most urgent .. 10)",
    SubmitRequest,
    SubmitOut,
    _SUBMIT_RULES,
    service.submit,
    lambda out: task_links(out["task_id"]),
)
Batch = _submission(
    "Batch", "Submit a batch of tasks (sequential or parallel)", BatchRequest, GroupOut, _GROUP_RULES, service.batch, _group_links("batch")
)
Chain = _submission(
    "Chain",
    "Submit a chain: each step receives the previous step's result",
    ChainRequest,
    GroupOut,
    _GROUP_RULES,
    service.chain,
    _group_links("chain"),
)


class GroupStatus:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Status of a batch or chain and of each of its tasks", response=GroupStatusOut, auth="user", errors=(404,), tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response, group_id: str) -> None:
        ok(resp, service.group_status(self.ctx.cfg, caller_of(req), group_id))


class ScheduleCreate:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Create a cron schedule",
        request=ScheduleRequest,
        response=ScheduleOut,
        auth="user",
        errors=(400, 403, 404, 429),
        tags=TAGS,
        rules=_CRON_RULES,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        body: ScheduleRequest = read_json(req, ScheduleRequest)
        out = schedules.create(self.ctx.cfg, caller, body)
        ok(resp, out, links={"self": f"/tasks/schedules/{out['schedule_id']}"})


class ScheduleList:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("The caller's schedules (an admin: all)", query=Page, response=list[ScheduleOut], auth="user", paginated=True, tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        q: Page = read_query(req, Page)
        items, total = schedules.list_schedules(self.ctx.cfg, caller, q.page, q.per_page)
        ok(resp, items, metadata=page_meta(q, total))


class ScheduleItem:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("One schedule", response=ScheduleOut, auth="user", errors=(404,), tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response, schedule_id: int) -> None:
        ok(resp, schedules.get(self.ctx.cfg, caller_of(req), schedule_id))

    @operation(
        "Change a schedule", request=SchedulePatch, response=ScheduleOut, auth="user", errors=(400, 403, 404), tags=TAGS, rules=_CRON_RULES
    )
    def on_patch(self, req: falcon.Request, resp: falcon.Response, schedule_id: int) -> None:
        caller = caller_of(req)
        body: SchedulePatch = read_json(req, SchedulePatch)
        ok(resp, schedules.update(self.ctx.cfg, caller, schedule_id, body))

    @operation("Delete a schedule", response=DeletedOut, auth="user", errors=(404,), tags=TAGS)
    def on_delete(self, req: falcon.Request, resp: falcon.Response, schedule_id: int) -> None:
        ok(resp, schedules.delete(self.ctx.cfg, caller_of(req), schedule_id))


class Status:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Status, progress, execution, history, result and error of a task", response=TaskOut, auth="user", errors=(404,), tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        out = service.status(self.ctx.cfg, caller_of(req), task_id)
        ok(resp, out, links=task_links(task_id))


class Cancel:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Cancel a task: a queued one never runs, a running one stops at its next check (force: its process is stopped)",
        request=CancelRequest,
        response=CancelOut,
        auth="user",
        errors=(404, 409),
        tags=TAGS,
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        caller = caller_of(req)
        body: CancelRequest = read_json(req, CancelRequest)
        ok(resp, service.cancel(self.ctx.cfg, caller, task_id, body), links=task_links(task_id))


def _wants_text(req: falcon.Request) -> bool:
    accept = (req.get_header("Accept") or "").lower()
    if "text/plain" not in accept:
        return False
    return req.client_prefers(["application/json", "text/plain"]) == "text/plain"


class Logs:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "Log lines of a task (Accept: text/plain for plain text)",
        query=LogsQuery,
        response=LogsOut,
        response_media=("text/plain",),
        auth="user",
        errors=(404,),
        paginated=True,
        tags=TAGS,
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        caller = caller_of(req)
        q: LogsQuery = read_query(req, LogsQuery)
        lines, total = service.logs(self.ctx.cfg, caller, task_id, q.page, q.per_page)
        if _wants_text(req):
            resp.content_type = "text/plain; charset=utf-8"
            resp.text = "".join(f"{ln['timestamp']} {ln['level'].upper()} {ln['line']}\n" for ln in lines)
            return
        ok(resp, {"task_id": task_id, "logs": lines, "total": total}, metadata=page_meta(q, total))


class Stats:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Task statistics: overview, performance, by type, workers, queue depth", response=StatsOut, auth="user", tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok(resp, service.stats(self.ctx.cfg, caller_of(req)))


class Types:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation("Known task types and their input schemas", response=list[TaskTypeOut], auth="user", tags=TAGS)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok(resp, registry_for(self.ctx.cfg).describe())


class TaskList:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @operation(
        "The caller's tasks (an admin: all), filtered by status and task_type",
        query=TasksQuery,
        response=list[TaskOut],
        auth="user",
        paginated=True,
        tags=TAGS,
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        q: TasksQuery = read_query(req, TasksQuery)
        items, total = service.list_tasks(self.ctx.cfg, caller, status=q.status, task_type=q.task_type, page=q.page, per_page=q.per_page)
        ok(resp, items, metadata=page_meta(q, total))


def register(app: falcon.App, ctx: ApiContext) -> None:
    app.add_route("/tasks", TaskList(ctx))
    app.add_route("/tasks/submit", Submit(ctx))
    app.add_route("/tasks/batch", Batch(ctx))
    app.add_route("/tasks/batch/{group_id}", GroupStatus(ctx))
    app.add_route("/tasks/chain", Chain(ctx))
    app.add_route("/tasks/chain/{group_id}", GroupStatus(ctx))
    app.add_route("/tasks/schedule", ScheduleCreate(ctx))
    app.add_route("/tasks/schedules", ScheduleList(ctx))
    app.add_route("/tasks/schedules/{schedule_id:int}", ScheduleItem(ctx))
    app.add_route("/tasks/status/{task_id}", Status(ctx))
    app.add_route("/tasks/cancel/{task_id}", Cancel(ctx))
    app.add_route("/tasks/logs/{task_id}", Logs(ctx))
    app.add_route("/tasks/stats", Stats(ctx))
    app.add_route("/tasks/types", Types(ctx))
