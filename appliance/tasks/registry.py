"""The task registry: every task type the appliance can run, with its input schema.

A task type is a name, a function `fn(ctx, data) -> result` and an input schema
(a msgspec Struct, or None for "any JSON object"). Built-in types come from
appliance.tasks.builtins and appliance.tasks.dataprocs; operators add their own
as Python files in `[queue] tasks_dir`, each declaring its types with the
`task_type` decorator:

    import msgspec
    from appliance.tasks.registry import task_type

    class Resize(msgspec.Struct, forbid_unknown_fields=True):
        path: str
        width: int = 800

    @task_type("resize", schema=Resize, description="resize one image")
    def resize(ctx, data: Resize):
        ctx.progress(50, "half way")
        return {"path": data.path}

Who may run a type: `admin_only=True` reserves it for administrators;
`admin_only_when=predicate(parsed_input) -> bool` reserves only some inputs
(the predicate's docstring says which, in the 403 message); `access=check(parsed
input, user_id, admin)` is the type's own check of what the input refers to
(e.g. an upload the caller must own), raising an AppError (404 so ids are no
oracle).

`TaskType.admit` is the one admission check: every way a task enters (submit,
batch, chain, data processing, bulk import, schedule create/update and each
firing of a schedule) calls it with the caller. It validates the input with
`parse` (a ValidationFailed naming the field on bad input), then applies the
three rules above (a Forbidden naming the task type). The runner only parses
again before running, so a task row whose schema changed since submit fails
cleanly instead of crashing a worker.

`keep_unknown_fields=True` hands the task a dict instead of the Struct: the
input as sent, with the schema's fields validated and defaulted (`sample`
echoes fields it does not know).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from appliance import plugins
from appliance.db.models import User
from appliance.errors import BadRequest, Forbidden, ValidationFailed

log = logging.getLogger(__name__)

_FIELD_RE = re.compile(r"at `\$((?:\.[A-Za-z0-9_]+|\[\d+\])+)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]+)`")


@dataclass
class TaskType:
    """One runnable kind of task."""

    name: str
    func: Callable[..., Any]
    schema: type | None = None
    description: str = ""
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)
    admin_only: bool = False
    admin_only_when: Callable[[Any], bool] | None = None
    access: Callable[[Any, int | None, bool], None] | None = None
    keep_unknown_fields: bool = False

    def __call__(self, ctx: Any, data: Any) -> Any:
        return self.func(ctx, data)

    def admit(self, data: Any, user_id: int | None, admin: bool, where: str = "") -> Any:
        """The one admission check of a task entering: parse, who may run it, what it may touch.

        `where` prefixes field names (e.g. "tasks[2]."); returns the parsed input.
        """
        if not admin and self.admin_only:  # before parsing: the input of such a type is none of the caller's business
            self._forbid("", where)
        parsed = self.parse(data, where=f"{where}data")
        if not admin:
            why = self.admin_reason(parsed)
            if why is not None:
                self._forbid(why, where)
        if self.access is not None:
            self.access(parsed, user_id, admin)
        return parsed

    def _forbid(self, why: str, where: str) -> None:
        raise Forbidden(
            f"task type {self.name!r}{why} may only be run by an administrator",
            code="admin_only_task_type",
            details={"task_type": self.name, "field": f"{where}task_type"},
        )

    def admin_reason(self, parsed: Any) -> str | None:
        """None when anyone may run this input, else the words the 403 adds after the type's name."""
        if self.admin_only:
            return ""
        if self.admin_only_when is not None and self.admin_only_when(parsed):
            note = _first_line(self.admin_only_when)
            return f" ({note})" if note else " with this input"
        return None

    def parse(self, data: Any, where: str = "data") -> Any:
        """Validate task input against the schema; raise ValidationFailed naming the field."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValidationFailed(f"{where} must be a JSON object", field=where)
        if self.schema is None:
            return data
        try:
            parsed = msgspec.convert(data, self.schema, strict=False)
        except msgspec.ValidationError as exc:
            name = field_of(str(exc))
            shown = f"{where}.{name}" if name else where
            raise ValidationFailed(f"invalid {shown}: {exc}", field=shown) from None
        if self.keep_unknown_fields:
            return {**data, **msgspec.to_builtins(parsed)}
        return parsed

    def json_schema(self) -> dict[str, Any]:
        if self.schema is None:
            return {"type": "object"}
        try:
            return msgspec.json.schema(self.schema)
        except Exception:  # a schema msgspec cannot describe still validates
            return {"type": "object"}


def owner_rights(owner_id: int | None) -> tuple[int | None, bool]:
    """(user id, admin now) of the owner of a task or schedule; no owner is the system (a task it made itself)."""
    if owner_id is None:
        return None, True
    user = User.select(User.role, User.is_active).where(User.id == owner_id).first()
    return owner_id, bool(user is not None and user.is_active and user.role == "admin")


def _first_line(func: Any) -> str:
    return (getattr(func, "__doc__", None) or "").strip().split("\n")[0]


def field_of(message: str) -> str | None:
    """The field a msgspec validation message is about, as a dotted path."""
    for regex in (_MISSING_RE, _UNKNOWN_RE):
        m = regex.search(message)
        if m:
            prefix = ""
            at = _FIELD_RE.search(message)
            if at:
                prefix = at.group(1).lstrip(".") + "."
            return prefix + m.group(1)
    m = _FIELD_RE.search(message)
    if m:
        return m.group(1).lstrip(".")
    return None


def task_type(
    name: str,
    schema: type | None = None,
    description: str = "",
    *,
    admin_only: bool = False,
    admin_only_when: Callable[[Any], bool] | None = None,
    access: Callable[[Any, int | None, bool], None] | None = None,
    keep_unknown_fields: bool = False,
) -> Callable[[Callable[..., Any]], TaskType]:
    """Decorator declaring a task type (used by built-ins and operator modules alike); see the module docstring."""

    def wrap(func: Callable[..., Any]) -> TaskType:
        return TaskType(
            name=name,
            func=func,
            schema=schema,
            description=description or _first_line(func),
            admin_only=admin_only,
            admin_only_when=admin_only_when,
            access=access,
            keep_unknown_fields=keep_unknown_fields,
        )

    return wrap


class Registry:
    """Task types by name."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def add(self, ttype: TaskType) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", ttype.name):
            raise ValueError(f"task type name {ttype.name!r} is invalid: letters, digits, _ . - (at most 100)")
        self._types[ttype.name] = ttype

    def get(self, name: str) -> TaskType:
        """The task type, or a BadRequest that lists the known ones."""
        ttype = self._types.get(name) if isinstance(name, str) else None
        if ttype is None:
            known = sorted(self._types)
            raise BadRequest(
                f"unknown task_type {name!r}; known task types: {', '.join(known)}",
                code="unknown_task_type",
                details={"field": "task_type", "known": known},
            )
        return ttype

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "description": t.description,
                "source": t.source,
                "schema": t.json_schema(),
                "admin_only": t.admin_only,
                "admin_only_when": (_first_line(t.admin_only_when) or "some inputs") if t.admin_only_when else None,
            }
            for t in sorted(self._types.values(), key=lambda t: t.name)
        ]

    def load_dir(self, directory: str | Path) -> list[str]:
        """Load every *.py in `directory`; a module that fails to import is logged and skipped."""
        loaded: list[str] = []
        path = Path(directory)
        if not path.is_dir():
            log.warning("tasks_dir %s is not a directory; no operator task types loaded", path)
            return loaded
        for file in sorted(path.glob("*.py")):
            if file.name.startswith("_"):
                continue
            try:
                module = plugins.load_module(file, "appliance_operator_tasks")
            except Exception:
                log.exception("operator task module %s failed to load; skipped", file)
                continue
            for value in vars(module).values():
                if isinstance(value, TaskType):
                    value.source = str(file)
                    try:
                        self.add(value)
                    except ValueError as exc:
                        log.error("operator task module %s: %s", file, exc)
                        continue
                    loaded.append(value.name)
        return loaded


_REGISTRIES: dict[str, Registry] = {}


def build_registry(tasks_dir: str = "") -> Registry:
    """The built-in task types plus the operator's (cached per tasks_dir in this process)."""
    reg = _REGISTRIES.get(tasks_dir)
    if reg is not None:
        return reg
    from appliance.tasks import builtins, dataprocs

    reg = Registry()
    for module in (builtins, dataprocs):
        for value in vars(module).values():
            if isinstance(value, TaskType):
                reg.add(value)
    if tasks_dir:
        reg.load_dir(tasks_dir)
    _REGISTRIES[tasks_dir] = reg
    return reg


def registry_for(cfg: Any) -> Registry:
    tasks_dir = str(cfg.path(cfg.queue.tasks_dir)) if cfg.queue.tasks_dir else ""
    return build_registry(tasks_dir)
