"""Three appliance hosts on one machine: network namespaces on a bridge, PostgreSQL and Redis in a fourth.

Layout (every name starts with PREFIX, so the leftovers of a run that was killed are found by name):
  bridge aplc-br     10.231.0.1/24 on the host side: the test process reaches every namespace through it
  namespace aplc-db  10.231.0.10: the harness's own PostgreSQL cluster (initdb in the state dir) and Redis
                     (a temporary config), both with generated passwords
  namespace aplc-a/b/c 10.231.0.11-13: one `appliance run` each from this source tree, node names host-a/b/c
Each namespace joins the bridge with a veth pair (host end aplc-v<x>, namespace end aplc-n<x>) and has a
loopback of its own, so every host's api workers use the same ports without clashing. The shared test
servers on 127.0.0.1 are never touched, and only addresses inside these namespaces are ever targets.

One run at a time owns the aplc names: `Cluster` takes an exclusive flock on LOCK_FILE, and whoever holds it
removes whatever an earlier run left (`sweep`: processes in aplc namespaces, the namespaces, aplc links, state
dirs). Teardown goes in the reverse order of setup and runs every step even when one fails: appliances
(SIGTERM, then SIGKILL of anything still in the namespace), PostgreSQL (fast shutdown) and Redis, namespaces,
links, the state dir.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.integration.supervised import Appliance
from tests.procs import appliance_cmd

PREFIX = "aplc-"
LOCK_FILE = Path("/run/aplc.lock") if Path("/run").is_dir() else Path("/tmp/aplc.lock")
STATE_ROOT = Path(tempfile.gettempdir())
SUBNET = "10.231.0"
BRIDGE = f"{PREFIX}br"
GATEWAY = f"{SUBNET}.1"  # the host side: where the test process talks from
DB_NS, DB_ADDR = f"{PREFIX}db", f"{SUBNET}.10"
HOSTS = {"a": f"{SUBNET}.11", "b": f"{SUBNET}.12", "c": f"{SUBNET}.13"}
PUBLIC_PORT = 8080
PG_PORT, REDIS_PORT = 5432, 6379
HEARTBEAT_TIMEOUT = 8.0  # [supervisor] heartbeat_timeout of every host: a host silent this long is down


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> list[str]:
    out = ip("-j", "link", "show", check=False).stdout or "[]"
    return [entry["ifname"] for entry in json.loads(out)]


def pids_in(ns: str) -> list[int]:
    """Every process whose network namespace is `ns` (ip netns pids)."""
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def kill_namespace(ns: str, grace: float = 10.0) -> None:
    """SIGTERM every process in `ns`, SIGKILL those still there after `grace` s, until none is left."""
    if grace > 0:
        for pid in pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids_in(ns) and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = pids_in(ns)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise RuntimeError(f"processes still in namespace {ns} after SIGKILL: {pids_in(ns)}")


def sweep() -> list[str]:
    """Remove whatever an earlier run left with our prefix; returns what was removed (call with the lock held)."""
    removed = []
    for ns in namespaces():
        if ns.startswith(PREFIX):
            kill_namespace(ns, grace=3.0)
            ip("netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    for name in links():
        if name.startswith(PREFIX):
            ip("link", "del", name, check=False)
            removed.append(f"link {name}")
    for path in STATE_ROOT.glob(f"{PREFIX}state-*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"dir {path}")
    return removed


def _subnet_in_use() -> str | None:
    """The interface (not ours) that already has an address in SUBNET, if any."""
    for entry in json.loads(ip("-j", "addr", "show", check=False).stdout or "[]"):
        for addr in entry.get("addr_info", []):
            if addr.get("local", "").startswith(SUBNET + ".") and not entry["ifname"].startswith(PREFIX):
                return entry["ifname"]
    return None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """The first truthy value of predicate() within `timeout` s (exceptions count as not yet), else AssertionError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the server is not up yet, a row is not there yet
            last, value = exc, None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout}s" + (f" (last error: {last!r})" if last else ""))


class Network:
    """The bridge and the namespaces, each with its veth pair and loopback up."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def create(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        self.made.append(BRIDGE)
        ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for short, addr in {"db": DB_ADDR, **HOSTS}.items():
            ns, host_end, ns_end = f"{PREFIX}{short}", f"{PREFIX}v{short}", f"{PREFIX}n{short}"
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", ns)
            ip("link", "set", host_end, "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
            ip("-n", ns, "link", "set", ns_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        for name in reversed(self.made):
            if name == BRIDGE:
                ip("link", "del", name, check=False)
            else:
                kill_namespace(name, grace=3.0)
                ip("netns", "del", name, check=False)  # its veth end goes with it, and so the host end
        for name in links():
            if name.startswith(PREFIX):
                ip("link", "del", name, check=False)
        self.made.clear()


def _pg_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return versions[-1].parent


class Services:
    """PostgreSQL and Redis of the cluster, in the db namespace, each password-protected."""

    def __init__(self, state: Path):
        self.state = state
        self.pg_password = secrets.token_hex(16)  # the cluster superuser's
        self.app_password = secrets.token_hex(16)  # the appliances' role
        self.redis_password = secrets.token_hex(16)
        self.pg: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None

    @property
    def database_url(self) -> str:
        return f"postgresql://appliance:{self.app_password}@{DB_ADDR}:{PG_PORT}/appliance"

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{DB_ADDR}:{REDIS_PORT}/0"

    def start(self) -> None:
        self._start_postgres()
        self._start_redis()

    def _start_postgres(self) -> None:
        import psycopg2

        pg = self.state / "pg"
        pg.mkdir()
        shutil.chown(pg, "postgres", "postgres")
        pwfile = pg / "pw"
        pwfile.write_text(self.pg_password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        bindir = _pg_bin()
        data = pg / "data"
        as_postgres = ("setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--")
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8"]
        initdb += ["--auth-local=peer", "--auth-host=scram-sha-256", "--no-sync"]
        _run(*as_postgres, *initdb)
        with open(data / "pg_hba.conf", "a") as fh:
            fh.write(f"host all all {SUBNET}.0/24 scram-sha-256\n")
        settings = {
            "listen_addresses": DB_ADDR,
            "port": str(PG_PORT),
            "unix_socket_directories": str(pg),
            "max_connections": "300",
            "shared_buffers": "32MB",
            "dynamic_shared_memory_type": "mmap",  # in the data dir, removed with it (not /dev/shm)
            "fsync": "off",  # a throwaway cluster: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        self.pg = subprocess.Popen(
            ["ip", "netns", "exec", DB_NS, *as_postgres, str(bindir / "postgres"), "-D", str(data), *args],
            stdout=open(self.state / "postgres.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def connect() -> Any:
            return psycopg2.connect(
                host=DB_ADDR, port=PG_PORT, user="postgres", password=self.pg_password, dbname="postgres", connect_timeout=2
            )

        admin = wait_until(connect, 30, f"PostgreSQL on {DB_ADDR}:{PG_PORT} (log {self.state / 'postgres.log'})", step=0.2)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute(f"CREATE ROLE appliance LOGIN PASSWORD '{self.app_password}'")  # hex: nothing to escape
                cur.execute("CREATE DATABASE appliance OWNER appliance")
        finally:
            admin.close()

    def _start_redis(self) -> None:
        import redis

        conf = self.state / "redis.conf"
        rdir = self.state / "redis"
        rdir.mkdir()
        conf.write_text(
            f"bind {DB_ADDR}\nport {REDIS_PORT}\nrequirepass {self.redis_password}\nprotected-mode yes\n"
            f'save ""\nappendonly no\ndaemonize no\ndir {rdir}\nlogfile ""\n'
        )
        conf.chmod(0o600)
        self.redis = subprocess.Popen(
            ["ip", "netns", "exec", DB_NS, "redis-server", str(conf)],
            stdout=open(self.state / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            wait_until(client.ping, 20, f"Redis on {DB_ADDR}:{REDIS_PORT}")
        finally:
            client.close()

    def stop(self) -> None:
        for proc, sig in ((self.pg, signal.SIGINT), (self.redis, signal.SIGTERM)):  # SIGINT: PostgreSQL's fast shutdown
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
        for proc in (self.pg, self.redis):
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


class Host(Appliance):
    """One `appliance run` inside its namespace; supervised.Appliance's log and status helpers apply."""

    def __init__(self, short: str, state: Path, shared_secrets: dict[str, str], sections: dict[str, Any]):
        self.short, self.ns, self.address = short, f"{PREFIX}{short}", HOSTS[short]
        self.node = f"host-{short}"
        base = state / self.node
        (base / "data").mkdir(parents=True)
        from appliance import secretfile

        secretfile.write_secrets(base / "data" / "secrets.toml", shared_secrets)  # the same keys on every host
        super().__init__(base, api_workers=1, task_workers=1, monitor=False, **sections)
        self.url = f"http://{self.address}:{PUBLIC_PORT}"

    def start(self, wait: bool = True) -> Host:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *appliance_cmd("run", "--config", str(self.config))],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        if wait:
            self.wait_up()
        return self

    def wait_up(self, after: int = 0) -> None:
        self.wait_for("appliance is up", timeout=120, after=after)

    def stop(self) -> int | None:
        code = super().stop()
        kill_namespace(self.ns, grace=3.0)  # anything that outlived its supervisor
        return code

    def kill_all(self) -> list[int]:
        """SIGKILL every process of this host (everything in its namespace) at once; returns their pids."""
        killed = pids_in(self.ns)
        kill_namespace(self.ns, grace=0)
        if self.proc is not None:
            self.proc.wait(10)
        return killed

    def request(self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 15) -> tuple[int, dict]:
        """One request to this host's public listener: (status, decoded JSON body or {})."""
        conn = http.client.HTTPConnection(self.address, PUBLIC_PORT, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw else {}
            except ValueError:
                return resp.status, {"raw": raw[:500].decode(errors="replace")}
        finally:
            conn.close()

    def tail(self, n: int = 3000) -> str:
        try:
            return f"--- {self.node} log tail ---\n" + self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def host_sections(short: str, services: Services) -> dict[str, Any]:
    """The config of one host: the cluster's shared stores, its own node name and public address."""
    sections: dict[str, Any] = {
        "server": {"node_name": f"host-{short}"},
        "balancer": {"listen": f"{HOSTS[short]}:{PUBLIC_PORT}", "health_interval": 0.5, "access_log": False},
        "api": {"workers": 1, "threads": 4},
        "queue": {"workers": 1, "concurrency": 4, "reaper_interval": 1.0, "user_max_pending": 0, "user_max_running": 0},
        "database": {"url": services.database_url, "max_connections": 10},  # > [queue] concurrency + its own threads
        "redis": {"url": services.redis_url, "key_prefix": "appliance:"},
        "auth": {"bcrypt_rounds": 10},
        # one zone, on the route the limit test uses: 10/s per user, burst 5, across every host (Redis)
        "rate_limits": {"zones": [{"name": "api", "prefixes": ["/api/protected"], "key": "user", "rate": "10/s", "burst": 5}]},
        "supervisor": {"heartbeat_interval": 1.0, "heartbeat_timeout": HEARTBEAT_TIMEOUT, "grace_period": 5.0},
    }
    if short == "c":
        # host C forwards /health/ping to the other hosts' public listeners: a remote upstream group
        peers = [f"{HOSTS[s]}:{PUBLIC_PORT}" for s in ("a", "b")]
        sections["balancer"]["upstreams"] = [{"address": p, "group": "peers"} for p in peers]
        sections["balancer"]["routes"] = [{"prefix": "/health/ping", "group": "peers"}]
    return sections


class Cluster:
    """The whole cluster; use as a context manager (teardown runs whatever happens inside)."""

    def __init__(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix=f"{PREFIX}state-", dir=STATE_ROOT))
        self.state.chmod(0o711)  # the postgres user must reach its own subdirectory
        self.network = Network()
        self.services = Services(self.state)
        self.hosts: dict[str, Host] = {}
        self._lock_fd: int | None = None

    def __enter__(self) -> Cluster:
        self._lock()
        try:
            sweep_left = [r for r in sweep() if str(self.state) not in r]
            if sweep_left:
                print(f"cluster harness removed leftovers: {', '.join(sweep_left)}")
            self.state.mkdir(exist_ok=True)
            in_use = _subnet_in_use()
            if in_use:
                raise RuntimeError(f"{SUBNET}.0/24 is already used by interface {in_use}; the cluster harness needs it")
            self.network.create()
            self.services.start()
            shared = {"jwt_secret": secrets.token_urlsafe(48), "identity_key": secrets.token_urlsafe(48)}
            shared["callback_secret"] = secrets.token_urlsafe(48)
            for short in HOSTS:
                self.hosts[short] = Host(short, self.state, shared, host_sections(short, self.services))
            self.hosts["a"].start(wait=True)  # the first one migrates the schema; the others find it done
            for short in ("b", "c"):
                self.hosts[short].start(wait=False)
            for short in ("b", "c"):
                self.hosts[short].wait_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _lock(self) -> None:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another cluster run holds {LOCK_FILE}; one run at a time owns the {PREFIX}* names") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Tear everything down; every step runs even when an earlier one fails."""
        steps: list[Callable[[], Any]] = [
            self._stop_hosts,
            self.services.stop,
            self.network.destroy,
            self._keep_logs,
            lambda: shutil.rmtree(self.state, ignore_errors=True),
        ]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # go on: the rest must still be removed
                errors.append(repr(exc))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise RuntimeError("cluster teardown: " + "; ".join(errors))

    def _stop_hosts(self) -> None:
        """Stop every host at once (each drains for its grace period); the first failure is raised after all ended."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(HOSTS)) as pool:
            futures = [pool.submit(h.stop) for h in self.hosts.values()]
        for f in futures:
            f.result()

    def _keep_logs(self) -> None:
        """With CLUSTER_KEEP_LOGS=DIR, the hosts' and servers' logs are copied there before the state dir goes."""
        keep = os.environ.get("CLUSTER_KEEP_LOGS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for log in [*self.state.glob("*.log"), *self.state.glob("host-*/*.log")]:
                shutil.copy(log, Path(keep) / log.name.replace("appliance", log.parent.name))

    @contextlib.contextmanager
    def sql(self) -> Iterator[Any]:
        """A cursor on the cluster's database (autocommit), as the appliances' role."""
        import psycopg2

        conn = psycopg2.connect(self.services.database_url, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def tails(self) -> str:
        return "\n".join(h.tail() for h in self.hosts.values())
