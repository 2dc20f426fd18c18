"""The configuration tree: one typed section per subsystem.

(Over 500 lines on purpose: every section of the tree in one place, so one file says every key;
the loader and the renderers of the sample and the README table are kept beside the classes they read.)

Each field carries its type, default, bounds and a help line (msgspec Meta
description). The sample appliance.toml and the README table are generated
from these classes (`render_sample`, `render_markdown_table`), and a test fails
when the committed copies drift.

Loading goes file -> environment overrides (APPLIANCE_<SECTION>__<KEY>) ->
per-key validation, so that every bad key is reported at once with the file,
section, key, bad value and what is allowed. A config that does not validate
raises ConfigError and nothing starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ENV_PREFIX = "APPLIANCE_"
DEFAULT_CONFIG = Path("appliance-data") / "appliance.toml"
SECRETS_SECTION = "secrets"


class ConfigError(Exception):
    """One or more configuration problems; `problems` lists each in a sentence."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section."""


def _h(text: str, **bounds: Any) -> Meta:
    return Meta(description=text, **bounds)


Port = Annotated[int, _h("TCP port", ge=1, le=65535)]


class ServerSettings(Section):
    data_dir: Annotated[str, _h("data directory; empty means the directory holding this file")] = ""
    node_name: Annotated[str, _h("name of this host in /health/nodes; empty means the host name")] = ""
    public_url: Annotated[str, _h("URL clients use, for links and redirects; empty means derived from [balancer] listen")] = ""


class RateLimitZone(Section):
    name: Annotated[str, _h("zone name", min_length=1, max_length=64)]
    prefixes: Annotated[list[str], _h("route prefixes this zone applies to")]
    methods: Annotated[list[str], _h("HTTP methods; empty means all")] = []
    key: Annotated[Literal["address", "user", "address_user"], _h("what is counted")] = "address"
    rate: Annotated[str, _h("requests per second or minute, e.g. 10/s or 5/m", pattern=r"^\d+(\.\d+)?/[sm]$")] = "10/s"
    burst: Annotated[int, _h("requests allowed above the rate before rejecting", ge=0, le=100000)] = 0
    nodelay: Annotated[bool, _h("serve burst requests at once instead of spacing them out")] = True


def _default_zones() -> list[RateLimitZone]:
    return [
        RateLimitZone(
            name="login",
            prefixes=["/auth/login", "/auth/register", "/status/login"],
            methods=["POST"],
            key="address",
            rate="5/m",
            burst=5,
            nodelay=True,
        ),
        # 20/s per user with a burst of 60: a client that fires a batch of 50 parallel submits (the reference
        # design's own load test) is served whole, while a flood from one account is still cut at 20/s.
        RateLimitZone(name="api", prefixes=["/api/", "/tasks", "/auth/"], key="user", rate="20/s", burst=60, nodelay=True),
    ]


class Upstream(Section):
    address: Annotated[str, _h("host:port of a remote upstream", min_length=3)]
    weight: Annotated[int, _h("relative share of connections", ge=1, le=100)] = 1
    group: Annotated[str, _h("upstream group this server belongs to")] = "api"


class Route(Section):
    prefix: Annotated[str, _h("path prefix; the longest matching prefix wins", min_length=1)]
    group: Annotated[str, _h("upstream group: api, monitor or a group of [balancer] upstreams")]


class BalancerSettings(Section):
    listen: Annotated[str, _h("public address host:port of the proxy")] = "127.0.0.1:8080"
    processes: Annotated[
        int,
        _h("balancer processes accepting from the one public socket; 0 means 1 on 1-2 CPUs, else max(2, CPUs // 4)", ge=0, le=64),
    ] = 0
    backlog: Annotated[int, _h("listen backlog of the public socket", ge=16, le=65535)] = 1024
    tls_cert: Annotated[str, _h("PEM certificate path; empty means plain HTTP")] = ""
    tls_key: Annotated[str, _h("PEM private key path")] = ""
    redirect_listen: Annotated[str, _h("optional plain-HTTP address that answers 308 to https")] = ""
    hsts_max_age: Annotated[int, _h("Strict-Transport-Security max-age when TLS is on", ge=0)] = 31536000
    trusted_proxies: Annotated[list[str], _h("addresses/CIDRs whose X-Forwarded-For is trusted")] = []
    max_header_bytes: Annotated[int, _h("largest request head (431 beyond)", ge=1024, le=1048576)] = 65536
    max_body_bytes: Annotated[int, _h("largest request body (413 beyond)", ge=0)] = 104857600
    client_header_timeout: Annotated[float, _h("seconds to receive a request head", gt=0, le=3600)] = 10.0
    client_body_timeout: Annotated[float, _h("seconds between body reads", gt=0, le=3600)] = 60.0
    keepalive_timeout: Annotated[float, _h("seconds an idle client connection is kept", gt=0, le=3600)] = 75.0
    max_connections: Annotated[int, _h("most client connections at once", ge=1, le=1000000)] = 10000
    upstream_connect_timeout: Annotated[float, _h("seconds to connect to an upstream", gt=0, le=600)] = 5.0
    upstream_read_timeout: Annotated[float, _h("seconds to wait for an upstream answer (504 beyond)", gt=0, le=3600)] = 60.0
    upstream_keepalive: Annotated[int, _h("idle keep-alive connections kept per upstream", ge=0, le=10000)] = 64
    upstream_idle_timeout: Annotated[float, _h("seconds an idle upstream connection is kept open", gt=0, le=3600)] = 30.0
    upstream_max_active: Annotated[
        int,
        _h("requests in flight per upstream (and weight) before the next waits its turn here; 0 means 2 x [api] threads", ge=0, le=100000),
    ] = 0
    upstream_queue_timeout: Annotated[float, _h("seconds a request may wait for an upstream slot (503 beyond)", gt=0, le=3600)] = 30.0
    retries: Annotated[int, _h("extra upstreams tried for an idempotent request", ge=0, le=10)] = 2
    retry_non_idempotent: Annotated[bool, _h("also retry POST and PATCH when the upstream never answered")] = False
    health_interval: Annotated[float, _h("seconds between active health checks", gt=0, le=3600)] = 2.0
    health_rise: Annotated[int, _h("passed checks that bring an upstream back", ge=1, le=100)] = 2
    health_fall: Annotated[int, _h("failed checks that take an upstream out", ge=1, le=100)] = 2
    max_fails: Annotated[int, _h("passive failures within fail_timeout that eject an upstream", ge=1, le=1000)] = 3
    fail_timeout: Annotated[float, _h("seconds of the passive failure window and ejection", gt=0, le=3600)] = 10.0
    upstreams: Annotated[list[Upstream], _h("remote upstreams in addition to the local api workers")] = []
    routes: Annotated[list[Route], _h("extra prefix routes; / goes to the api workers")] = []
    auth_mode: Annotated[Literal["jwt", "subrequest", "callable", "off"], _h("how protected routes are checked")] = "jwt"
    auth_subrequest_url: Annotated[str, _h("auth endpoint for auth_mode = subrequest")] = ""
    auth_cache_seconds: Annotated[float, _h("how long subrequest answers are cached", ge=0, le=3600)] = 5.0
    auth_callable: Annotated[str, _h("module:function for auth_mode = callable")] = ""
    public_prefixes: Annotated[list[str], _h("routes served without a token")] = msgspec.field(
        default_factory=lambda: [
            "/health/",
            "/auth/login",
            "/auth/register",
            "/auth/refresh",
            "/auth/validate",
            "/api/status",
            "/openapi.json",
            "/status",
        ]
    )
    access_log: Annotated[bool, _h("one access-log line per request, JSON or text as the process logs")] = True
    use_uvloop: Annotated[bool, _h("use uvloop when installed")] = True


class ApiSettings(Section):
    workers: Annotated[int, _h("API worker processes; 0 means one per CPU", ge=0, le=256)] = 0
    base_port: Annotated[
        int,
        _h("0: each worker gets a loopback port the kernel picks (no planning); else worker i listens on base_port + i", ge=0, le=65000),
    ] = 0
    threads: Annotated[int, _h("waitress threads per worker", ge=1, le=256)] = 8
    connection_limit: Annotated[int, _h("waitress connections per worker", ge=10, le=100000)] = 1000
    stall_seconds: Annotated[
        float, _h("GET /health/ping answers 503 when requests have waited this long with no thread finishing one", ge=1, le=3600)
    ] = 10.0
    max_body_bytes: Annotated[int, _h("largest JSON body a worker accepts (413 beyond)", ge=1024)] = 1048576
    upload_max_bytes: Annotated[int, _h("largest file upload (413 beyond)", ge=1024)] = 1073741824
    gzip_min_bytes: Annotated[int, _h("responses larger than this are gzipped when accepted; 0 turns it off", ge=0)] = 1024
    apps_dir: Annotated[str, _h("directory of operator API modules; empty means none")] = ""
    json_max_depth: Annotated[
        int, _h("deepest nesting of arrays/objects accepted in a JSON body or parameter (400 json_too_deep beyond)", ge=2, le=200)
    ] = 64
    user_upload_quota_bytes: Annotated[
        int, _h("bytes of uploads one user may keep stored (413 quota_exceeded beyond); 0 means no quota; admins are exempt", ge=0)
    ] = 5368709120
    upload_retention_hours: Annotated[
        float, _h("uploads older than this whose tasks are finished are deleted (by the scheduler); 0 keeps them", ge=0, le=87600)
    ] = 24.0


class QueueSettings(Section):
    workers: Annotated[int, _h("task worker processes", ge=0, le=256)] = 2
    concurrency: Annotated[int, _h("tasks run at once by each worker process", ge=1, le=256)] = 4
    worker_type: Annotated[Literal["thread", "process"], _h("how a worker runs tasks")] = "thread"
    tasks_dir: Annotated[str, _h("directory of operator task modules; empty means none")] = ""
    default_max_retries: Annotated[int, _h("retries of a task that asks for none", ge=0, le=100)] = 0
    reaper_interval: Annotated[float, _h("seconds between checks for tasks of dead workers", gt=0, le=3600)] = 5.0
    callback_timeout: Annotated[float, _h("seconds per callback POST", gt=0, le=600)] = 5.0
    callback_retries: Annotated[int, _h("extra tries of a failing callback", ge=0, le=20)] = 3
    history_days: Annotated[int, _h("days database_cleanup keeps by default", ge=1, le=36500)] = 30
    audit_retention_days: Annotated[
        int, _h("days of audit events database_cleanup always keeps, whatever its `days` (admins' included)", ge=1, le=36500)
    ] = 90
    callback_allow: Annotated[
        list[str],
        _h(
            "CIDRs and host names task callbacks and [monitor] alert_webhook may reach although internal (loopback, private, link-local... "
            "are refused by default), e.g. ['10.1.2.0/24', 'hooks.internal']"
        ),
    ] = []
    user_max_pending: Annotated[
        int, _h("queued + running tasks one user may have (429 quota_exceeded beyond); 0 means no quota; admins are exempt", ge=0)
    ] = 200
    user_max_schedules: Annotated[
        int, _h("schedules one user may have (429 quota_exceeded beyond); 0 means no quota; admins are exempt", ge=0)
    ] = 50
    user_max_running: Annotated[
        int,
        _h(
            "fair share: tasks of one user (admins too) running at once in the cluster; more wait, so others' tasks get slots; "
            "keep below workers * concurrency; 0 means no cap",
            ge=0,
        ),
    ] = 6
    csv_max_columns: Annotated[int, _h("most columns csv_profile reads (the task fails beyond)", ge=1, le=100000)] = 2000
    csv_max_field_bytes: Annotated[int, _h("largest CSV field a data task reads (the task fails beyond)", ge=1024, le=104857600)] = 262144
    data_max_record_bytes: Annotated[
        int, _h("largest record a data task reads: a CSV row, a JSON line or array element (the task fails beyond)", ge=4096, le=268435456)
    ] = 1048576


class DatabaseSettings(Section):
    url: Annotated[str, _h("postgresql://user:pass@host/db; empty means SQLite in the data dir")] = ""
    sqlite_file: Annotated[str, _h("SQLite file name inside the data dir")] = "appliance.db"
    max_connections: Annotated[int, _h("pooled PostgreSQL connections per process; at least [queue] concurrency + 2", ge=1, le=1000)] = 20
    stale_timeout: Annotated[int, _h("seconds after which a pooled connection is replaced", ge=1)] = 300
    busy_timeout_ms: Annotated[int, _h("SQLite busy timeout", ge=0, le=600000)] = 10000


class RedisSettings(Section):
    url: Annotated[str, _h("redis://host:port/db; empty means no Redis (SQLite queue, in-memory limits)")] = ""
    key_prefix: Annotated[str, _h("prefix of every key this appliance writes")] = "appliance:"


class AuthSettings(Section):
    jwt_algorithm: Annotated[Literal["HS256", "HS384", "HS512"], _h("the one algorithm tokens are signed and accepted with")] = "HS256"
    issuer: Annotated[str, _h("iss claim of issued tokens", min_length=1)] = "appliance"
    audience: Annotated[str, _h("aud claim of issued tokens", min_length=1)] = "appliance-api"
    access_token_minutes: Annotated[int, _h("access token lifetime", ge=1, le=1440)] = 15
    refresh_token_days: Annotated[int, _h("refresh token lifetime", ge=1, le=365)] = 30
    leeway_seconds: Annotated[int, _h("clock skew allowed on exp/nbf", ge=0, le=300)] = 10
    bcrypt_rounds: Annotated[int, _h("bcrypt cost", ge=10, le=16)] = 12
    min_password_length: Annotated[int, _h("shortest password accepted", ge=8, le=128)] = 10
    login_max_failures: Annotated[int, _h("failed logins before an account is locked", ge=1, le=1000)] = 5
    login_lockout_seconds: Annotated[int, _h("how long a locked account is refused", ge=1, le=86400)] = 300
    login_address_max_failures: Annotated[int, _h("failed logins from one client address before it is locked out", ge=1, le=100000)] = 20
    allow_registration: Annotated[bool, _h("let anyone register a user account")] = True
    mfa_issuer: Annotated[str, _h("issuer name in TOTP URIs")] = "Appliance"
    secrets_file: Annotated[str, _h("generated secrets (mode 0600), relative to the data dir")] = "secrets.toml"


class RateLimitSettings(Section):
    enabled: Annotated[bool, _h("enforce the zones below in the balancer")] = True
    max_keys: Annotated[int, _h("most keys tracked in memory per zone; idle ones are evicted", ge=100)] = 100000
    zones: Annotated[
        list[RateLimitZone],
        _h(
            "limit zones. Defaults: login/register 5/min per client address, burst 5 (password guessing is stopped "
            "within seconds); api 20/s per user, burst 60 (a client's parallel batch of 50 submits passes whole, "
            "a flood from one account is cut at 20/s; [queue] user_max_pending bounds what it can queue)"
        ),
    ] = msgspec.field(default_factory=_default_zones)


class AlertSettings(Section):
    hold_seconds: Annotated[float, _h("a condition must last this long to fire, and be gone this long to resolve", ge=0, le=86400)] = 30.0
    cpu_percent: Annotated[float, _h("host cpu % above which an alert fires; 0 turns it off", ge=0, le=100)] = 90.0
    memory_percent: Annotated[float, _h("host memory % in use above which an alert fires; 0 turns it off", ge=0, le=100)] = 90.0
    disk_free_percent: Annotated[float, _h("free % of the data dir's disk below which an alert fires; 0 turns it off", ge=0, le=100)] = 10.0
    error_ratio: Annotated[float, _h("share of 5xx answers above which an alert fires (0.05 = 5 %); 0 turns it off", ge=0, le=1)] = 0.05
    p99_ms: Annotated[float, _h("p99 latency of API answers in ms above which an alert fires; 0 turns it off", ge=0)] = 2000.0
    queue_age_seconds: Annotated[float, _h("age of the oldest queued task above which an alert fires; 0 turns it off", ge=0)] = 300.0
    login_failures_per_min: Annotated[float, _h("failed logins per minute above which an alert fires; 0 turns it off", ge=0)] = 30.0
    process_failed: Annotated[bool, _h("alert when the supervisor gives a process up (crash loop)")] = True
    store_unreachable: Annotated[bool, _h("alert when the database or Redis cannot be reached")] = True


class MonitorSettings(Section):
    enabled: Annotated[
        bool, _h("run the monitor process (/status, /metrics); it also runs the scheduler's loop, else the scheduler is its own process")
    ] = True
    port: Annotated[
        int, _h("0: a loopback port the kernel picks (no planning); else the monitor's fixed loopback port", ge=0, le=65535)
    ] = 0
    sample_interval: Annotated[
        float, _h("seconds between samples of the status page's collectors (an hour of them is kept)", gt=0, le=3600)
    ] = 2.0
    metrics_require_admin: Annotated[
        bool, _h("/metrics through the balancer needs an admin token; false also needs /metrics in [balancer] public_prefixes")
    ] = True
    session_minutes: Annotated[int, _h("a /status login lasts this long (server-side), then asks again", ge=1, le=1440)] = 60
    alert_webhook: Annotated[
        str,
        _h(
            "http(s) URL every firing and resolved alert is POSTed to, signed like task callbacks; an internal host "
            "must be in [queue] callback_allow (the same allow-list); empty means off"
        ),
    ] = ""
    alerts: Annotated[AlertSettings, _h("alert thresholds, in [monitor.alerts]")] = msgspec.field(default_factory=AlertSettings)


class SupervisorSettings(Section):
    startup_timeout: Annotated[float, _h("seconds every child has to become ready", gt=0, le=3600)] = 60.0
    grace_period: Annotated[float, _h("seconds to drain on stop before killing", ge=0, le=3600)] = 30.0
    heartbeat_interval: Annotated[float, _h("seconds between child heartbeats", gt=0, le=600)] = 2.0
    heartbeat_timeout: Annotated[float, _h("a child silent this long is killed and restarted", gt=0, le=3600)] = 30.0
    max_restarts: Annotated[int, _h("restarts within restart_window that mark a child failed", ge=1, le=1000)] = 5
    restart_window: Annotated[float, _h("seconds of the crash-loop window", gt=0, le=86400)] = 60.0
    template: Annotated[
        bool, _h("fork children from one preloaded template process (shared memory, fast restarts); false: exec each child")
    ] = True
    worker_nice: Annotated[
        int,
        _h(
            "niceness added to every child but the balancer, so that the front door still reads and answers when workers fill the CPU",
            ge=0,
            le=19,
        ),
    ] = 5


class LoggingSettings(Section):
    format: Annotated[Literal["json", "text"], _h("json: one object a line; text: for people")] = "json"
    level: Annotated[Literal["debug", "info", "warning", "error"], _h("lowest level written")] = "info"


class Secrets(Section):
    """Generated by `appliance init` into secrets.toml (0600); never logged, never in the sample."""

    jwt_secret: str = ""
    identity_key: str = ""
    callback_secret: str = ""


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    balancer: BalancerSettings = msgspec.field(default_factory=BalancerSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    rate_limits: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    monitor: MonitorSettings = msgspec.field(default_factory=MonitorSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    secrets: Secrets = msgspec.field(default_factory=Secrets)
    # Where this tree was read from; set by load_config, empty for built defaults.
    source: str = ""

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    def path(self, name: str) -> Path:
        """A path relative to the data dir (absolute paths pass through)."""
        p = Path(name)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def api_workers(self) -> int:
        return self.api.workers or (os.cpu_count() or 1)

    @property
    def balancer_processes(self) -> int:
        """[balancer] processes, with 0 (auto) resolved for this machine."""
        if self.balancer.processes:
            return self.balancer.processes
        cpus = os.cpu_count() or 1
        return 1 if cpus <= 2 else max(2, cpus // 4)

    def to_json(self) -> bytes:
        """The whole tree (secrets included) for handing to a child process."""
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Config:
        return msgspec.json.decode(data, type=cls)


SECTIONS: dict[str, type[Section]] = {
    f.name: f.type for f in msgspec.structs.fields(Config) if isinstance(f.type, type) and issubclass(f.type, Section)
}


def default_config_path(env: typing.Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("APPLIANCE_CONFIG") or DEFAULT_CONFIG)


def _allowed(tp: Any) -> str:
    """Say in words what a field accepts, from its annotation."""
    try:
        schema = msgspec.json.schema(tp)
    except Exception:  # pragma: no cover - every field type here has a schema
        return str(tp)
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type", "value")
    if "$ref" in schema or kind == "array":
        return "a list" if kind == "array" else "a table"
    parts = [{"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false"}.get(kind, kind)]
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    if "minLength" in schema:
        parts.append(f"at least {schema['minLength']} characters")
    return " ".join(parts)


def _parse_env_value(raw: str) -> Any:
    """An environment value is read as a TOML value when it is one (3, true, [..]), else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(env: typing.Mapping[str, str], problems: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in SECTIONS:
            problems.append(f"environment {name}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
            continue
        table = out.setdefault(section, {})
        if "__" in key:  # a nested table: APPLIANCE_MONITOR__ALERTS__CPU_PERCENT
            sub, _, key = key.partition("__")
            table = table.setdefault(sub, {}) if isinstance(table.get(sub, {}), dict) else table
        table[key] = _parse_env_value(raw)
    return out


def _subsection(field: msgspec.structs.FieldInfo) -> type[Section] | None:
    """The Section class of a nested table field ([monitor.alerts]), else None."""
    tp = typing.get_args(field.type)[0] if typing.get_origin(field.type) is Annotated else field.type
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def _validate_section(where: str, name: str, cls: type[Section], raw: Any, problems: list[str]) -> Section | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: [{name}] must be a table, got {raw!r}")
        return None
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    good: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            problems.append(f"{where}: [{name}] unknown key '{key}'; known keys: {', '.join(fields)}")
            continue
        nested = _subsection(field)
        if nested is not None:  # e.g. [monitor.alerts]: validated key by key like a section
            sub = _validate_section(where, f"{name}.{key}", nested, value, problems)
            if sub is not None:
                good[key] = sub
            continue
        try:
            good[key] = msgspec.convert(value, field.type, strict=True)
        except msgspec.ValidationError as exc:
            shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
            problems.append(f"{where}: [{name}] {key} = {shown} is invalid ({exc}); allowed: {_allowed(field.type)}")
    try:
        return cls(**good)
    except TypeError as exc:  # a required field of a nested table is missing
        problems.append(f"{where}: [{name}] {exc}")
        return None


def _check_relations(cfg: Config, where: str, problems: list[str]) -> None:
    if bool(cfg.balancer.tls_cert) != bool(cfg.balancer.tls_key):
        problems.append(f"{where}: [balancer] tls_cert and tls_key must be set together")
    if cfg.database.url and not cfg.database.url.startswith(("postgresql://", "postgres://")):
        problems.append(
            f"{where}: [database] url = {cfg.database.url.split('@')[-1]!r} is invalid; allowed: a postgresql:// URL or empty for SQLite"
        )
    if cfg.database.url and cfg.database.max_connections < cfg.queue.concurrency + 2:
        # each of a worker's task threads holds a connection, and its history writer and heartbeat need theirs
        problems.append(
            f"{where}: [database] max_connections = {cfg.database.max_connections} is too small for [queue] concurrency = "
            f"{cfg.queue.concurrency}; allowed: at least concurrency + 2 = {cfg.queue.concurrency + 2}"
        )
    if cfg.redis.url and not cfg.redis.url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"{where}: [redis] url is invalid; allowed: a redis:// URL or empty")
    for label, addr in (("listen", cfg.balancer.listen), ("redirect_listen", cfg.balancer.redirect_listen)):
        if addr and not _is_host_port(addr):
            problems.append(f"{where}: [balancer] {label} = {addr!r} is invalid; allowed: host:port, e.g. 127.0.0.1:8080")
    for label, port in (("[api] base_port", cfg.api.base_port), ("[monitor] port", cfg.monitor.port)):
        if 0 < port < 1024:
            problems.append(f"{where}: {label} = {port} is invalid; allowed: 0 (the kernel picks a free port) or 1024 and above")
    names = [z.name for z in cfg.rate_limits.zones]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: [rate_limits] zone name {dup!r} is used more than once; zone names must be unique")
    if cfg.balancer.auth_mode == "subrequest" and not cfg.balancer.auth_subrequest_url:
        problems.append(f"{where}: [balancer] auth_subrequest_url is required when auth_mode = 'subrequest'")
    if cfg.balancer.auth_mode == "callable" and ":" not in cfg.balancer.auth_callable:
        problems.append(f"{where}: [balancer] auth_callable must be 'module:function' when auth_mode = 'callable'")
    for entry in cfg.queue.callback_allow:
        if not _is_cidr(entry) and not _HOST_NAME_RE.fullmatch(entry):
            problems.append(
                f"{where}: [queue] callback_allow entry {entry!r} is invalid; allowed: a CIDR (10.0.0.0/8, fd00::/8) or a host name"
            )
    if cfg.monitor.alert_webhook and not _is_post_url(cfg.monitor.alert_webhook):
        problems.append(
            f"{where}: [monitor] alert_webhook = {cfg.monitor.alert_webhook!r} is invalid; "
            "allowed: an http:// or https:// URL with a host (no user:password@, no spaces) or empty"
        )


_HOST_NAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _is_cidr(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _is_post_url(url: str) -> bool:
    if len(url) > 2000 or not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.username is None and parts.password is None


def _is_host_port(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def load_config(path: str | os.PathLike[str] | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the config; raise ConfigError naming every problem."""
    env = os.environ if env is None else env
    cfg_path = Path(path) if path else default_config_path(env)
    where = str(cfg_path)
    problems: list[str] = []
    try:
        with open(cfg_path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{where}: no such file; create one with `appliance init` or pass --config FILE"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot be read: {exc.strerror}"]) from None
    for name in raw:
        if name not in SECTIONS or name == SECRETS_SECTION:
            problems.append(f"{where}: unknown section [{name}]; known sections: {', '.join(s for s in SECTIONS if s != SECRETS_SECTION)}")
    for section, values in _env_overrides(env, problems).items():
        merged = raw.setdefault(section, {})
        if isinstance(merged, dict):
            merged.update(values)
    sections: dict[str, Section] = {}
    for name, cls in SECTIONS.items():
        if name == SECRETS_SECTION:
            continue
        sec = _validate_section(where, name, cls, raw.get(name, {}), problems)
        if sec is not None:
            sections[name] = sec
    if problems:
        raise ConfigError(problems)
    cfg = Config(**sections, source=str(cfg_path.resolve()))
    data_dir = Path(cfg.server.data_dir) if cfg.server.data_dir else cfg_path.resolve().parent
    if not data_dir.is_absolute():
        data_dir = (cfg_path.resolve().parent / data_dir).resolve()
    cfg.server.data_dir = str(data_dir)
    cfg.secrets = _load_secrets(cfg, env, problems)
    _check_relations(cfg, where, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _load_secrets(cfg: Config, env: typing.Mapping[str, str], problems: list[str]) -> Secrets:
    path = cfg.path(cfg.auth.secrets_file)
    raw: dict[str, Any] = {}
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        pass
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{path}: secrets file cannot be read: {exc}")
    for name, value in env.items():
        if name.startswith(ENV_PREFIX + "SECRETS__"):
            raw[name[len(ENV_PREFIX + "SECRETS__") :].lower()] = value
    sec = _validate_section(str(path), SECRETS_SECTION, Secrets, raw, problems)
    secrets = sec if isinstance(sec, Secrets) else Secrets()
    if not problems:
        for key in ("jwt_secret", "identity_key", "callback_secret"):
            value = getattr(secrets, key)
            if not value:
                problems.append(f"{path}: secret '{key}' is missing; run `appliance init` (or `init --force`) to generate secrets")
            elif len(value) < 32:
                problems.append(f"{path}: secret '{key}' is too short ({len(value)} characters); at least 32 are required")
    return secrets


# --- generated documentation -------------------------------------------------------


def _describe(field: msgspec.structs.FieldInfo) -> tuple[str, Any]:
    meta = [m for m in getattr(field.type, "__metadata__", ()) if isinstance(m, Meta)]
    text = meta[0].description if meta and meta[0].description else ""
    if field.default is not msgspec.NODEFAULT:
        default = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        default = field.default_factory()
    else:
        default = None
    return text, msgspec.to_builtins(default)


def render_sample() -> str:
    """The documented appliance.toml: every key, its default and a one-line comment."""
    import tomli_w

    out = [
        "# Appliance configuration. Every key shows its default; every key can be",
        "# overridden by an environment variable APPLIANCE_<SECTION>__<KEY>,",
        "# e.g. APPLIANCE_API__WORKERS=3. Secrets live in secrets.toml (mode 0600).",
    ]
    for name, cls in SECTIONS.items():
        if name == SECRETS_SECTION:
            continue
        out.append("")
        out.append(f"[{name}]")
        for field in msgspec.structs.fields(cls):
            text, default = _describe(field)
            nested = _subsection(field)
            if nested is not None:
                out.append("")
                out.append(f"# {text}")
                out.append(f"[{name}.{field.name}]")
                for sub in msgspec.structs.fields(nested):
                    sub_text, sub_default = _describe(sub)
                    out.append(f"# {sub_text}")
                    out.append(tomli_w.dumps({sub.name: sub_default}).rstrip())
                continue
            if isinstance(default, list) and default and isinstance(default[0], dict):
                out.append(f"# {field.name}: {text}")
                for item in default:
                    out.append(f"[[{name}.{field.name}]]")
                    out.append(tomli_w.dumps(item).rstrip())
                continue
            out.append(f"# {text}")
            out.append(tomli_w.dumps({field.name: default}).rstrip())
    return "\n".join(out) + "\n"


def render_markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| key | default | what |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        if name == SECRETS_SECTION:
            continue
        for field in msgspec.structs.fields(cls):
            text, default = _describe(field)
            nested = _subsection(field)
            if nested is not None:
                for sub in msgspec.structs.fields(nested):
                    sub_text, sub_default = _describe(sub)
                    rows.append(f"| `{name}.{field.name}.{sub.name}` | `{msgspec.json.encode(sub_default).decode()}` | {sub_text} |")
                continue
            shown = (
                "see appliance.toml"
                if isinstance(default, list) and default and isinstance(default[0], dict)
                else msgspec.json.encode(default).decode()
            )
            rows.append(f"| `{name}.{field.name}` | `{shown}` | {text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # `python -m appliance.config [--markdown]` prints the generated docs
    import sys

    sys.stdout.write(render_markdown_table() if "--markdown" in sys.argv else render_sample())
