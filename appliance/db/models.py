"""The schema: one set of peewee models for SQLite and PostgreSQL.

Models bind to `database`, a DatabaseProxy that appliance.db.connection
initialises from the config in each process. Times are naive UTC datetimes
(appliance.times). JSON columns are text holding orjson, so both engines store
them alike.

Schema changes after a release go through a new migration in
appliance/db/migrations.py (never by editing migration 1's effect).
"""

from __future__ import annotations

from typing import Any

import orjson
import peewee as pw

from appliance.times import utcnow

database = pw.DatabaseProxy()


class JSONField(pw.TextField):
    """A JSON value stored as text (orjson), the same on both engines."""

    def db_value(self, value: Any) -> str | None:
        if value is None:
            return None
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()

    def python_value(self, value: Any) -> Any:
        if value is None:
            return None
        return orjson.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class User(BaseModel):
    username = pw.CharField(max_length=64, unique=True)
    email = pw.CharField(max_length=254, unique=True)
    password_hash = pw.CharField(max_length=100)
    role = pw.CharField(max_length=16, default="user", index=True)  # admin | user
    is_active = pw.BooleanField(default=True)
    full_name = pw.CharField(max_length=200, default="")
    department = pw.CharField(max_length=200, default="")
    preferences = JSONField(default=dict)
    mfa_secret = pw.CharField(max_length=64, null=True)
    mfa_enabled = pw.BooleanField(default=False)
    mfa_last_step = pw.BigIntegerField(null=True)  # last TOTP time step accepted: a code is good once
    token_generation = pw.IntegerField(default=0)  # bumped by logout-all / password change
    login_count = pw.IntegerField(default=0)
    last_login = pw.DateTimeField(null=True)
    last_activity = pw.DateTimeField(null=True)
    failed_logins = pw.IntegerField(default=0)
    locked_until = pw.DateTimeField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)


class TokenFamily(BaseModel):
    """One login session's chain of rotated refresh tokens."""

    id = pw.CharField(max_length=32, primary_key=True)
    user = pw.ForeignKeyField(User, backref="token_families", on_delete="CASCADE")
    current_jti = pw.CharField(max_length=32)  # the one refresh token of the family that may be used
    created_at = pw.DateTimeField(default=utcnow)
    last_used_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(index=True)
    revoked_at = pw.DateTimeField(null=True)
    revoked_reason = pw.CharField(max_length=64, null=True)
    user_agent = pw.CharField(max_length=256, default="")
    address = pw.CharField(max_length=64, default="")


class RecoveryCode(BaseModel):
    """One-time MFA recovery code of a user, stored as a keyed hash (appliance.secondfactor); used once."""

    user = pw.ForeignKeyField(User, backref="recovery_codes", on_delete="CASCADE")
    code_hash = pw.CharField(max_length=64)
    created_at = pw.DateTimeField(default=utcnow)
    used_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("user", "code_hash"), True),)


class RevocationEvent(BaseModel):
    """Append-only log of revocations that every process mirrors (appliance.revocation).

    kind: "jti" (one token), "family" (a refresh family and its access tokens),
    "generation" (every token of user `user_id` with gen < `generation`).
    """

    id = pw.BigAutoField()
    kind = pw.CharField(max_length=16)
    value = pw.CharField(max_length=64)
    user_id = pw.IntegerField(null=True)
    generation = pw.IntegerField(null=True)
    reason = pw.CharField(max_length=64, default="")
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField(index=True)

    class Meta:
        indexes = ((("kind", "value"), False),)


class LoginThrottle(BaseModel):
    """Failed-login counters per account ("user:<name>") and per client address ("addr:<ip>")."""

    key = pw.CharField(max_length=300, primary_key=True)
    failures = pw.IntegerField(default=0)
    window_start = pw.DateTimeField(default=utcnow)
    locked_until = pw.DateTimeField(null=True)


class TaskGroup(BaseModel):
    """A batch or a chain of tasks."""

    id = pw.CharField(max_length=32, primary_key=True)
    kind = pw.CharField(max_length=16)  # batch | chain
    name = pw.CharField(max_length=200, default="")
    owner = pw.ForeignKeyField(User, null=True, backref="task_groups", on_delete="SET NULL")
    execution_mode = pw.CharField(max_length=16, default="parallel")  # sequential | parallel
    failure_strategy = pw.CharField(max_length=16, default="continue")  # stop_on_error | continue
    status = pw.CharField(max_length=16, default="queued")
    created_at = pw.DateTimeField(default=utcnow)
    finished_at = pw.DateTimeField(null=True)


class Schedule(BaseModel):
    owner = pw.ForeignKeyField(User, null=True, backref="schedules", on_delete="CASCADE")
    name = pw.CharField(max_length=200, default="")
    task_type = pw.CharField(max_length=100)
    expression = pw.CharField(max_length=100)
    timezone = pw.CharField(max_length=64, default="UTC")
    data = JSONField(default=dict)
    priority = pw.SmallIntegerField(default=5)
    active = pw.BooleanField(default=True, index=True)
    max_iterations = pw.IntegerField(null=True)
    iterations = pw.IntegerField(default=0)
    last_run_at = pw.DateTimeField(null=True)
    next_run_at = pw.DateTimeField(null=True, index=True)
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)


class Task(BaseModel):
    """The durable record of a task: the source of truth; the queue is only the fast path."""

    id = pw.CharField(max_length=32, primary_key=True)
    task_type = pw.CharField(max_length=100, index=True)
    # owner, status and group lead the composite indexes below; a status update is never a
    # HOT update, so each index more costs a new entry per state change (migration 4)
    owner = pw.ForeignKeyField(User, null=True, backref="tasks", on_delete="SET NULL", index=False)
    status = pw.CharField(max_length=16, default="queued")
    priority = pw.SmallIntegerField(default=5)  # 1 = most urgent .. 10
    input = JSONField(default=dict)
    result = JSONField(null=True)
    error = pw.TextField(null=True)
    error_code = pw.CharField(max_length=64, null=True)
    progress = pw.FloatField(default=0.0)
    progress_message = pw.CharField(max_length=500, default="")
    attempt = pw.IntegerField(default=0)
    retries = pw.IntegerField(default=0)
    max_retries = pw.IntegerField(default=0)
    retry_delay = pw.FloatField(default=0.0)
    exponential_backoff = pw.BooleanField(default=False)
    callbacks = JSONField(default=dict)
    eta = pw.DateTimeField(null=True)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    queued_at = pw.DateTimeField(null=True)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)
    running_time = pw.FloatField(null=True)
    worker_id = pw.CharField(max_length=200, null=True)  # only ever read among running tasks
    cancel_requested = pw.BooleanField(default=False)
    cancel_reason = pw.CharField(max_length=500, null=True)
    cancel_force = pw.BooleanField(default=False)  # stop the running process, do not wait for a check
    group = pw.ForeignKeyField(TaskGroup, null=True, backref="tasks", on_delete="SET NULL", index=False)
    group_index = pw.IntegerField(null=True)
    schedule = pw.ForeignKeyField(Schedule, null=True, backref="tasks", on_delete="SET NULL")

    class Meta:
        indexes = (
            (("owner", "status", "created_at"), False),
            (("status", "priority", "created_at"), False),
            (("group", "group_index"), False),
        )


class TaskHistory(BaseModel):
    task = pw.ForeignKeyField(Task, backref="history", on_delete="CASCADE")
    status = pw.CharField(max_length=16)
    message = pw.CharField(max_length=500, default="")
    at = pw.DateTimeField(default=utcnow, index=True)


class TaskLog(BaseModel):
    task = pw.ForeignKeyField(Task, backref="logs", on_delete="CASCADE")
    level = pw.CharField(max_length=10, default="info")
    line = pw.TextField()
    at = pw.DateTimeField(default=utcnow, index=True)


class ScheduleRun(BaseModel):
    """One fired slot of a schedule; unique (schedule, slot) makes each slot fire once cluster-wide."""

    schedule = pw.ForeignKeyField(Schedule, backref="runs", on_delete="CASCADE")
    slot = pw.DateTimeField()
    task_id = pw.CharField(max_length=32, null=True)
    fired_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("schedule", "slot"), True),)


class NodeHeartbeat(BaseModel):
    node_id = pw.CharField(max_length=200, primary_key=True)  # host:role:index
    role = pw.CharField(max_length=32)
    host = pw.CharField(max_length=200)
    pid = pw.IntegerField()
    status = pw.CharField(max_length=32, default="starting")
    cpu = pw.FloatField(default=0.0)
    rss = pw.BigIntegerField(default=0)
    started_at = pw.DateTimeField(default=utcnow)
    last_heartbeat = pw.DateTimeField(default=utcnow, index=True)
    info = JSONField(default=dict)


class AuditEvent(BaseModel):
    event = pw.CharField(max_length=64, index=True)
    user_id = pw.IntegerField(null=True, index=True)
    username = pw.CharField(max_length=64, null=True)
    address = pw.CharField(max_length=64, null=True)
    request_id = pw.CharField(max_length=64, null=True)
    details = JSONField(default=dict)
    at = pw.DateTimeField(default=utcnow, index=True)


class Upload(BaseModel):
    id = pw.CharField(max_length=32, primary_key=True)
    owner = pw.ForeignKeyField(User, null=True, backref="uploads", on_delete="SET NULL")
    filename = pw.CharField(max_length=255)
    path = pw.CharField(max_length=1024)
    size = pw.BigIntegerField()
    content_type = pw.CharField(max_length=200, default="application/octet-stream")
    created_at = pw.DateTimeField(default=utcnow)


class DataRecord(BaseModel):
    dataset = pw.CharField(max_length=100)
    data = JSONField()
    task_id = pw.CharField(max_length=32, null=True)
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("dataset", "id"), False),)


ALL_MODELS: list[type[BaseModel]] = [
    User,
    TokenFamily,
    RevocationEvent,
    LoginThrottle,
    TaskGroup,
    Schedule,
    Task,
    TaskHistory,
    TaskLog,
    ScheduleRun,
    NodeHeartbeat,
    AuditEvent,
    Upload,
    DataRecord,
    RecoveryCode,
]
