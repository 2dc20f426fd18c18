"""The one-file binary as a Type=notify service under a booted systemd.

    python packaging/systemd-smoke.py [dist/appliance]      (root; `make test-systemd` runs it)

A Debian bookworm minbase root with systemd, systemd-sysv and dbus (debootstrap once, cached as a
zstd tarball by packaging/rootfs.py, rebuilt when missing) is unpacked afresh and booted with
systemd as PID 1 under `systemd-nspawn -b --keep-unit --register=no --console=pipe`, sharing the
host's network, so this script talks to the appliance over loopback. It is driven with `nsenter -t
<container pid 1> -a ...` (there is no host systemd or machined to go through). Inside, the README's
"Run as a service" steps: install the file, `useradd --system appliance`, `appliance init`, the unit
that `appliance systemd-unit` prints, `systemctl enable --now appliance`. Then, each step printed
with its timing: start returns after READY=1; ActiveState, MainPID and StatusText; the admin logs
in, /api/protected, a sample task; `systemctl reload` during a stream of GETs; the journal's
structured lines and no secrets; SIGKILL of the main process; the watchdog (SIGSTOP of the
supervisor); `systemctl stop` during GETs and a running task; the sandbox; `systemd-analyze
security`. Exits non-zero naming the step that failed (also when it cannot run at all).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rootfs

ROOT = Path(__file__).resolve().parent.parent
TARBALL = rootfs.CACHE / "bookworm-systemd.tar.zst"
INCLUDE = ("systemd", "systemd-sysv", "dbus")
INSIDE = "/usr/local/bin/appliance"
DATA = "/var/lib/appliance"
CONFIG = f"{DATA}/appliance.toml"
MAX_EXPOSURE = 2.0
STARTED = time.monotonic()


def step(message: str, since: float | None = None) -> None:
    took = f" ({time.monotonic() - since:.2f} s)" if since is not None else ""
    print(f"systemd: [{time.monotonic() - STARTED:6.1f} s] {message}{took}", flush=True)


class Failed(Exception):
    pass


def fail(message: str) -> None:
    raise Failed(message)


# ---- talking to the appliance from the host, over loopback --------------------------------------------


def http(port: int, method: str, path: str, body: object = None, token: str | None = None, timeout: float = 20):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
    )
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    return status, doc if isinstance(doc, dict) else {}, raw


def serves(port: int) -> bool:
    with contextlib.suppress(OSError):
        return http(port, "GET", "/health/ping", timeout=3)[0] == 200
    return False


def free_port_block(n: int) -> int:
    # below the ephemeral range (32768-60999), where outgoing connections could take a port between check and use
    bases = list(range(12000, 20000, 16))
    start = os.getpid() % len(bases)
    for base in bases[start:] + bases[:start]:
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    fail("no free loopback ports")
    return 0


class GetStream:
    """GETs from the host in a thread, one new connection each, until stopped (bounded by count and time);
    `pace` spaces them (an authenticated path stays under the api zone's rate limit, 20/s).

    Each result is (started, finished, outcome) with outcome "ok", "refused" (no connection: the socket
    was closed) or a description of the failure."""

    def __init__(self, port: int, token: str | None, path: str, pace: float = 0.0, max_count: int = 20000, max_seconds: float = 120):
        self.port, self.token, self.path, self.pace = port, token, path, pace
        self.max_count, self.max_seconds = max_count, max_seconds
        self.results: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GetStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and len(self.results) < self.max_count and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = http(self.port, "GET", self.path, token=self.token, timeout=30)[0]
                outcome = "ok" if status == 200 else f"HTTP {status}"
            except urllib.error.URLError as exc:
                outcome = "refused" if isinstance(exc.reason, ConnectionRefusedError) else f"error {exc.reason!r}"
            except OSError as exc:
                outcome = f"error {exc!r}"
            self.results.append((started, time.monotonic(), outcome))
            if outcome == "refused" or self.pace:
                time.sleep(max(0.02 if outcome == "refused" else 0.0, self.pace - (time.monotonic() - started)))

    def failures(self, before: float | None = None) -> list[str]:
        return [o for s, _e, o in self.results if o not in ("ok", "refused") and (before is None or s < before)]


class Load:
    """Two GET streams at once: /health/ping (an api worker answers, no rate limit) as fast as one client
    goes, and /api/protected with the admin's token, paced at 10/s (the token check and a database read)."""

    def __init__(self, port: int, token: str):
        self.streams = [GetStream(port, None, "/health/ping"), GetStream(port, token, "/api/protected", pace=0.1)]

    def __enter__(self) -> Load:
        for s in self.streams:
            s.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.streams:
            s.stop()

    @property
    def results(self) -> list[tuple[float, float, str]]:
        return [r for s in self.streams for r in s.results]

    def failures(self) -> list[str]:
        return [f for s in self.streams for f in s.failures()]

    def counts(self) -> str:
        return " + ".join(f"{len(s.results)} GET {s.path}" for s in self.streams)


# ---- the booted container -----------------------------------------------------------------------------


class Container:
    """A fresh root with systemd booted as its PID 1 (systemd-nspawn), driven through nsenter."""

    def __init__(self, work: Path, binary: Path):
        self.root = work / "root"
        self.root.mkdir()
        self.log = work / "nspawn.log"
        rootfs.unpack(rootfs.ensure_rootfs(TARBALL, include=INCLUDE, step=step, strip_apt=True), self.root)
        if not (self.root / "lib" / "systemd" / "systemd").exists():
            fail(f"{TARBALL} has no systemd in it; delete it to have it rebuilt")
        shutil.copy2(binary, self.root / "root" / "appliance")
        self.name = f"appliance-ci-{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 60) -> str:
        cmd = ["systemd-nspawn", "-D", str(self.root), "-b", "--keep-unit", "--register=no", "--console=pipe", "-M", self.name]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None:
                fail(f"systemd-nspawn exited {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                fail("no systemd as the container's PID 1")
            self.pid1 = self._find_pid1()
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:
            # "offline" (or nothing) until PID 1 has its manager socket; --wait then waits for the boot's end
            state = self.run("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip()
            time.sleep(0.05)
        if state not in ("running", "degraded"):
            fail(f"the container's systemd is {state!r}")
        return state

    def _find_pid1(self) -> int:
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = re.search(r"^NSpid:\s*(.*)$", status, re.M)
                # PID 1 of the new namespace, once it has become systemd (before that it is nspawn's inner child)
                if pid != self.proc.pid and nspid and nspid.group(1).split()[-1] == "1":
                    return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" else 0
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return 0

    def run(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """A shell script inside the container (all its namespaces, as root)."""
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "/bin/sh", "-c", script]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "HOME": "/root", "SYSTEMD_PAGER": ""}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            fail(f"`{script}` exited {result.returncode}: {(result.stderr or result.stdout)[-2000:]}")
        return result

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl show appliance " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def procs(self) -> dict[int, tuple[int, str]]:
        """Every process in the container that runs the appliance's file: pid -> (ppid, command line)."""
        script = (
            'for p in /proc/[0-9]*; do [ "$(readlink $p/exe 2>/dev/null)" = ' + INSIDE + " ] || continue; "
            "read -r pid _ _ ppid _ < $p/stat; echo \"$pid $ppid $(tr '\\0' ' ' < $p/cmdline)\"; done"
        )
        found = {}
        for line in self.run(script).stdout.splitlines():
            pid, ppid, cmdline = line.split(" ", 2)
            found[int(pid)] = (int(ppid), cmdline.strip())
        return found

    def journal(self, *args: str) -> str:
        return self.run("journalctl --no-pager -u appliance " + " ".join(args), timeout=60).stdout

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run("systemctl poweroff --no-block", check=False, timeout=20)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    fail(f"{what}: not within {timeout:.0f} s")


def service_tree(c: Container) -> tuple[int, int, dict[int, str]]:
    """(MainPID, the supervisor, its children by role), checked: MainPID is the file's bootloader, a child of
    PID 1, whose one child is the supervisor (`appliance run`, the process that speaks sd_notify)."""
    main = int(c.show("MainPID")["MainPID"])
    procs = c.procs()
    if main not in procs or procs[main][0] != 1:
        fail(f"MainPID {main} is not the appliance file started by systemd: {procs}")
    kids = [p for p, (pp, _cmd) in procs.items() if pp == main]
    if len(kids) != 1 or " run " not in procs[kids[0]][1] + " ":
        fail(f"MainPID {main} should have one child, the supervisor: {procs}")
    sup = kids[0]
    # Roles as the supervisor reports them (`appliance status`): a child forked from the template process
    # keeps the template's command line, so /proc does not say which role it is.
    out = c.run(f"runuser -u appliance -- {INSIDE} status --json --config {CONFIG}", check=False).stdout
    try:
        doc = json.loads(out)
    except ValueError:
        fail(f"`appliance status --json` answered {out[:300]!r}")
    if doc.get("pid") != sup:
        fail(f"`appliance status` names supervisor pid {doc.get('pid')}, MainPID's child is {sup}")
    children = {r["pid"]: r["role"] for r in doc.get("processes", []) if r.get("pid")}
    strangers = set(children) - set(procs) - set(c.procs())  # again: a reload may have started one meanwhile
    if strangers:
        fail(f"processes the supervisor reports that do not run the file: {strangers}")
    return main, sup, children


def login(port: int, password: str) -> str:
    status, doc, raw = http(port, "POST", "/auth/login", {"username": "admin", "password": password})
    if status != 200:
        fail(f"login as admin answered {status}: {raw[:300]!r}")
    return doc["data"]["access_token"]


def task_status(port: int, token: str, task_id: str) -> dict:
    status, doc, raw = http(port, "GET", f"/tasks/status/{task_id}", token=token)
    if status != 200:
        fail(f"/tasks/status/{task_id} answered {status}: {raw[:300]!r}")
    return doc["data"]


def submit(port: int, token: str, data: dict) -> str:
    status, doc, raw = http(port, "POST", "/tasks/submit", {"task_type": "sample", "data": data}, token)
    if status not in (200, 201, 202):
        fail(f"/tasks/submit answered {status}: {raw[:300]!r}")
    return doc["data"]["task_id"]


def configure(root: Path, base: int) -> None:
    """Ports nobody else uses on this host, a small process count, and a short watchdog (heartbeat_timeout
    10 s gives WatchdogSec=10) so the watchdog step stays short; edited in place (owner and mode kept)."""
    path = root / CONFIG.lstrip("/")
    text = path.read_text()
    section = ""
    out = []
    wanted = {
        ("balancer", "listen"): f'"127.0.0.1:{base}"',
        ("monitor", "port"): str(base + 1),
        ("api", "base_port"): str(base + 2),
        ("api", "workers"): "2",
        ("queue", "workers"): "1",
        ("supervisor", "heartbeat_timeout"): "10.0",
    }
    seen = set()
    for line in text.splitlines():
        header = re.match(r"^\[([\w.]+)\]", line)
        if header:
            section = header.group(1)
        key = re.match(r"^(\w+)\s*=", line)
        if key and (section, key.group(1)) in wanted:
            seen.add((section, key.group(1)))
            line = f"{key.group(1)} = {wanted[section, key.group(1)]}"
        out.append(line)
    if seen != set(wanted):
        fail(f"appliance.toml lacks {sorted(set(wanted) - seen)}")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


# ---- the steps ----------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    binary = Path(argv[0] if argv else ROOT / "dist" / "appliance").resolve()
    if not binary.is_file():
        fail(f"{binary} is missing; build it with `make binary`")
    if os.geteuid() != 0:
        fail("needs root (systemd-nspawn, nsenter)")
    rootfs.apt_install("systemd-container", commands=["systemd-nspawn"])
    with tempfile.TemporaryDirectory(prefix="appliance-systemd-", dir="/var/tmp") as tmp:
        t = time.monotonic()
        c = Container(Path(tmp), binary)
        step(f"root with systemd unpacked in {c.root}", t)
        try:
            run_steps(c)
        except Failed:
            if c.pid1:  # what the service said last, for whoever reads the CI log
                with contextlib.suppress(Exception):
                    print(c.run("journalctl --no-pager -n 60 -o short-monotonic -u appliance", check=False).stdout, file=sys.stderr)
            raise
        finally:
            t = time.monotonic()
            c.shutdown()
            step("container powered off", t)
    step(f"passed in {time.monotonic() - STARTED:.0f} s")
    return 0


def run_steps(c: Container) -> None:
    t = time.monotonic()
    state = c.boot()
    step(f"booted: systemd is PID 1 (host pid {c.pid1}), system {state}", t)
    if state == "degraded":
        step("failed units: " + c.run("systemctl --failed --no-legend --plain", check=False).stdout.strip().replace("\n", "; "))

    # The README's "Run as a service" steps, inside.
    t = time.monotonic()
    c.run(
        f"install -m 0755 /root/appliance {INSIDE} && rm /root/appliance"
        f" && useradd --system --home-dir {DATA} --shell /usr/sbin/nologin appliance"
        f" && install -d -o appliance -g appliance -m 0700 {DATA}"
    )
    init = c.run(f"runuser -u appliance -- appliance init --data-dir {DATA}")
    password = re.search(r"with password: (\S+)", init.stdout).group(1)
    port = free_port_block(8)
    configure(c.root, port)
    c.run(f"runuser -u appliance -- appliance check --config {CONFIG}")
    c.run(f"appliance systemd-unit --config {CONFIG} > /etc/systemd/system/appliance.service && systemctl daemon-reload")
    step(f"installed: {INSIDE}, user appliance, `appliance init` in {DATA}, the unit from `appliance systemd-unit`", t)
    c.run("systemd-analyze verify /etc/systemd/system/appliance.service")

    token = start_and_use(c, port, password)
    reload_under_load(c, port, token)
    check_journal(c, password, token)
    sigkill_main(c, port)
    watchdog(c, port)
    token = stop_under_load(c, port, password)
    check_sandbox(c, port, token)
    security(c)


def start_and_use(c: Container, port: int, password: str) -> str:
    """systemctl start returns after READY=1; what systemd shows; the admin, /api/protected, a sample task."""
    # 1. start returns after READY=1
    t = time.monotonic()
    c.run("systemctl enable --now appliance", timeout=150)
    took = time.monotonic() - t
    if not serves(port):
        fail("`systemctl enable --now` returned but the appliance does not answer /health/ping: it returned before READY=1")
    step(f"`systemctl enable --now appliance` returned after READY=1 in {took:.2f} s; /health/ping answers at once")

    # 2. what systemd knows
    props = c.show("ActiveState", "SubState", "MainPID", "StatusText", "NotifyAccess", "WatchdogUSec")
    main, sup, children = service_tree(c)
    if props["ActiveState"] != "active" or props["SubState"] != "running":
        fail(f"not active/running: {props}")
    if not all(part in props["StatusText"] for part in (f"127.0.0.1:{port}", "1 balancer", "2 api", "1 worker")):
        fail(f"StatusText does not say what runs (where it serves, how many of each role): {props['StatusText']!r}")
    step(
        f"ActiveState=active SubState=running MainPID={main} (the file; its child {sup} is the supervisor, which "
        f"notifies; NotifyAccess={props['NotifyAccess']}) StatusText={props['StatusText']!r} WatchdogUSec={props['WatchdogUSec']}"
    )
    step(f"children of the supervisor: {sorted(children.values())}")

    # 3. the admin, /api/protected, a sample task
    t = time.monotonic()
    token = login(port, password)
    status, _doc, raw = http(port, "GET", "/api/protected", token=token)
    if status != 200:
        fail(f"/api/protected answered {status}: {raw[:300]!r}")
    task_id = submit(port, token, {"hello": "systemd"})
    done = wait_for("the sample task", lambda: (d := task_status(port, token, task_id))["status"] in ("succeeded", "failed") and d, 90)
    if done["status"] != "succeeded":
        fail(f"the sample task ended {done['status']}: {done}")
    step(f"admin logged in over loopback, /api/protected 200, sample task {task_id} succeeded", t)
    return token


def reload_under_load(c: Container, port: int, token: str) -> None:
    """`systemctl reload` during GETs: none fails, systemd sees RELOADING=1 then READY=1, new api/worker pids."""
    _main, _sup, children = service_tree(c)
    before = {p for p, r in children.items() if r in ("api", "worker")}
    states: list[tuple[float, str]] = []
    polling = threading.Event()

    def poll_state() -> None:
        while not polling.is_set():
            with contextlib.suppress(Exception):
                s = c.show("ActiveState")["ActiveState"]
                if not states or states[-1][1] != s:
                    states.append((time.monotonic(), s))
            time.sleep(0.03)

    poller = threading.Thread(target=poll_state, daemon=True)
    with Load(port, token) as gets:
        time.sleep(1.0)
        poller.start()
        t = time.monotonic()
        c.run("systemctl reload appliance")
        returned = time.monotonic() - t

        def replaced():
            _m, _s, now = service_tree(c)
            fresh = {p for p, r in now.items() if r in ("api", "worker")}
            return not (fresh & before) and len(fresh) == len(before) and states and states[-1][1] == "active" and fresh

        fresh = wait_for("the rolling restart (new api/worker pids, active again)", replaced, 120, 0.3)
        reload_took = time.monotonic() - t
        time.sleep(1.0)
    polling.set()
    poller.join(5)
    seq = [s for _t, s in states]
    if "reloading" not in seq or seq[-1] != "active" or seq.index("reloading") > len(seq) - 2:
        fail(f"systemd did not see RELOADING=1 then READY=1: ActiveState went {seq}")
    reloading = [tt for tt, s in states if s == "reloading"][0]
    back = [tt for tt, s in states if s == "active" and tt > reloading][0]
    if gets.failures():
        fail(f"{len(gets.failures())} of {len(gets.results)} GETs failed during the reload: {gets.failures()[:5]}")
    n_refused = sum(1 for _s, _e, o in gets.results if o == "refused")
    if n_refused:
        fail(f"{n_refused} GETs were refused during the reload")
    step(
        f"`systemctl reload` (returned in {returned:.2f} s): ActiveState {' -> '.join(seq)}, reloading for "
        f"{back - reloading:.2f} s (RELOADING=1 .. READY=1); {gets.counts()}, 0 failed; "
        f"api/worker pids {sorted(before)} -> {sorted(fresh)} (seen {reload_took:.2f} s after the reload began); "
        f"the supervisor's log: {rollout_span(c)}"
    )


def rollout_span(c: Container) -> str:
    """How long the last rolling restart took by the supervisor's own log lines (SIGHUP .. reload done)."""
    begun = done = None
    for line in c.journal("-o", "cat").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            doc = json.loads(line)
            if doc.get("message", "").startswith("SIGHUP: reloading"):
                begun, done = doc, None
            elif doc.get("message", "").startswith("reload done") and begun:
                done = doc
    if not (begun and done):
        fail("the journal has no 'SIGHUP: reloading' .. 'reload done' pair from the supervisor")

    def stamp(d: dict) -> float:
        return datetime.datetime.fromisoformat(d["time"].replace("Z", "+00:00")).timestamp()

    return f"{done['message']} in {stamp(done) - stamp(begun):.2f} s"


def sigkill_main(c: Container, port: int) -> None:
    """SIGKILL of the main process: systemd restarts it (Restart=on-failure) and it serves again."""
    restarts = int(c.show("NRestarts")["NRestarts"])
    main, sup, children = service_tree(c)
    old = set(c.procs())  # the supervisor's children and the template process too
    t = time.monotonic()
    c.run("systemctl kill -s SIGKILL --kill-who=main appliance")
    wait_for("restart after SIGKILL", lambda: int(c.show("NRestarts")["NRestarts"]) > restarts and serves(port), 120, 0.2)
    took = time.monotonic() - t
    new_main = int(c.show("MainPID")["MainPID"])
    if "code=killed, status=9/KILL" not in c.journal():
        fail("the journal does not say the main process was killed by SIGKILL")
    left = set(c.procs()) & old
    if left:
        fail(f"processes of the killed instance still run: {left}")
    step(f"SIGKILL of MainPID {main}: restarted (MainPID {new_main}) and serving again in {took:.2f} s, nothing of the old one left")


def watchdog(c: Container, port: int) -> None:
    """SIGSTOP of the supervisor: result watchdog, killed and restarted, none of its processes lingers."""
    restarts = int(c.show("NRestarts")["NRestarts"])
    main, sup, children = service_tree(c)
    old = set(c.procs())
    t = time.monotonic()
    c.run(f"kill -STOP {sup}")
    wait_for("the watchdog", lambda: "Failed with result 'watchdog'" in c.journal(), 150, 0.5)
    fired = time.monotonic() - t
    wait_for("restart after the watchdog", lambda: int(c.show("NRestarts")["NRestarts"]) > restarts and serves(port), 120, 0.2)
    took = time.monotonic() - t
    left = set(c.procs()) & old
    if left:
        fail(f"processes of the frozen instance linger: {left}")
    step(
        f"SIGSTOP of the supervisor {sup}: result 'watchdog' after {fired:.1f} s, killed and restarted, serving again "
        f"after {took:.1f} s; none of its {len(old)} processes lingers"
    )


def stop_under_load(c: Container, port: int, password: str) -> str:
    """`systemctl stop` during GETs and a running task: in-flight ones finish, exit status 0, nothing left."""
    token = login(port, password)
    task_id = submit(port, token, {"duration": 5, "steps": 10})
    wait_for("the long task running", lambda: task_status(port, token, task_id)["status"] == "running", 60, 0.1)
    with Load(port, token) as gets:
        time.sleep(1.0)
        t = time.monotonic()
        c.run("systemctl stop appliance", timeout=120)
        stop_took = time.monotonic() - t
        time.sleep(0.5)
    props = c.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    if gets.failures():
        fail(f"GETs failed during the stop: {gets.failures()[:5]} ({len(gets.failures())} of {len(gets.results)})")
    before_stop = [o for s, _e, o in gets.results if s < t]
    after_stop = [o for s, _e, o in gets.results if s >= t]
    if props != {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}:
        fail(f"the stop did not end in exit status 0: {props}")
    left = c.procs()
    if left:
        fail(f"still running after the stop: {left}")
    c.run("systemctl start appliance", timeout=150)
    token = login(port, password)
    final = wait_for(
        "the long task after the stop", lambda: (d := task_status(port, token, task_id))["status"] in ("succeeded", "failed") and d, 90
    )
    if final["status"] != "succeeded":
        fail(f"the task running at the stop ended {final['status']}: {final}")
    attempt = (final.get("result") or {}).get("attempt")
    fate = "finished during the drain" if attempt == 1 else f"was requeued and finished after the restart (attempt {attempt})"
    step(
        f"`systemctl stop` during GETs and a running task returned in {stop_took:.2f} s: exit status 0, nothing left; "
        f"{gets.counts()}: {len(before_stop)} begun before it all ok, {after_stop.count('ok')} begun after ok, "
        f"{after_stop.count('refused')} refused (socket closed), 0 failed; the running task {fate}"
    )
    return token


def security(c: Container) -> None:
    """`systemd-analyze security appliance`, printed; its exposure at most MAX_EXPOSURE."""
    out = c.run("systemd-analyze security appliance --no-pager", check=False).stdout
    print(out, flush=True)
    match = re.search(r"Overall exposure level for appliance\.service:\s*([\d.]+)", out)
    if not match:
        fail("systemd-analyze security printed no exposure level")
    exposure = float(match.group(1))
    if exposure > MAX_EXPOSURE:
        fail(f"exposure {exposure} is above {MAX_EXPOSURE}")
    step(f"systemd-analyze security appliance: exposure {exposure} (at most {MAX_EXPOSURE})")


def check_journal(c: Container, password: str, token: str) -> None:
    raw = c.journal("-o", "json", "--output-fields=MESSAGE,_PID,SYSLOG_IDENTIFIER,_SYSTEMD_UNIT")
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    ours = [e for e in lines if e.get("SYSLOG_IDENTIFIER") == "appliance"]
    docs, not_json = [], []
    for entry in ours:
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives non-UTF-8 messages as bytes
            message = bytes(message).decode(errors="replace")
        try:
            doc = json.loads(message)
        except (TypeError, ValueError):
            not_json.append(message)
            continue
        docs.append(doc)
    if not docs:
        fail("no appliance lines in the journal")
    if not_json:
        fail(f"{len(not_json)} journal entries of the appliance are not one JSON object each: {not_json[:3]}")
    by_role: dict[str, int] = {}
    for doc in docs:
        by_role[doc.get("role", "?")] = by_role.get(doc.get("role", "?"), 0) + 1
    missing = [d for d in docs if not {"time", "level", "role", "pid", "message"} <= d.keys()]
    if missing:
        fail(f"journal lines without time/level/role/pid/message: {missing[:3]}")
    with_rid = [d for d in docs if d.get("request_id")]
    if not with_rid:
        fail("no journal line carries a request id")
    secrets = [password, token]
    toml = (c.root / DATA.lstrip("/") / "secrets.toml").read_text()
    secrets += [v for v in re.findall(r'=\s*"([^"]{12,})"', toml)]
    full = c.journal("-o", "json")
    leaked = [s[:4] + "..." for s in secrets if s and s in full]
    if leaked:
        fail(f"secrets in the journal: {leaked}")
    sample = next((d for d in with_rid if d.get("role") == "balancer"), with_rid[0])
    step(
        f"journalctl -u appliance -o json: {len(docs)} entries, each one JSON line with time/level/role/pid/message "
        f"(by role {by_role}); {len(with_rid)} with request_id, e.g. {json.dumps(sample)[:200]}; "
        f"none holds the admin password, the token or any of {len(secrets) - 2} secrets.toml values"
    )


def check_sandbox(c: Container, port: int, token: str) -> None:
    main, sup, _children = service_tree(c)
    status = c.run(f"cat /proc/{sup}/status").stdout
    fields = dict(re.findall(r"^(NoNewPrivs|Seccomp|CapEff|CapBnd|CapPrm|Uid):\s*(.*)$", status, re.M))
    if fields.get("NoNewPrivs") != "1" or fields.get("Seccomp") != "2" or int(fields.get("CapEff", "1"), 16) != 0:
        fail(f"the supervisor runs without its sandbox: {fields}")
    if int(fields.get("CapBnd", "1"), 16) != 0:
        fail(f"the supervisor's capability bounding set is not empty: {fields}")
    # Writes in the service's own mount namespace, as its user.
    # /tmp and /var/tmp are the service's own (PrivateTmp=yes): a file made there is not in the system's.
    probe = (
        "for d in / /etc /usr /usr/local/bin /var /var/lib /var/cache /var/log /root /home /opt /srv /run " + DATA + "; do "
        'if touch "$d/.sandbox-probe" 2>/dev/null; then echo "writable $d"; rm -f "$d/.sandbox-probe"; fi; done; '
        "touch /tmp/.sandbox-probe /var/tmp/.sandbox-probe"
    )
    out = c.run(f"nsenter -t {sup} -m -S $(id -u appliance) -G $(id -g appliance) /bin/sh -c '{probe}'").stdout.split()
    writable = [w for w in out if w != "writable"]
    if writable != [DATA]:
        fail(f"in the service's mount namespace, writable for its user: {writable} (only {DATA} should be)")
    shared = c.run("ls /tmp/.sandbox-probe /var/tmp/.sandbox-probe 2>/dev/null", check=False).stdout.split()
    if shared:
        fail(f"the service's /tmp or /var/tmp is the system's: {shared}")
    # Use it, stop it, then look for anything the appliance user owns outside the data dir.
    http(port, "GET", "/api/protected", token=token)
    http(port, "GET", "/status")
    c.run("systemctl stop appliance", timeout=120)
    owned = c.run(f"find / -xdev -user appliance -not -path '{DATA}' -not -path '{DATA}/*' 2>/dev/null", check=False).stdout.split()
    if owned:
        fail(f"the appliance wrote outside its data dir: {owned[:10]}")
    step(
        f"sandbox of the supervisor {sup}: NoNewPrivs=1 Seccomp=2 CapEff=0 CapBnd=0; in its mount namespace only "
        f"{DATA} is writable (/, /etc, /usr, /var, /var/lib, /var/cache, /var/log, /root, /home, /opt, /srv, /run are "
        "not; /tmp and /var/tmp are its private ones); after a run, "
        "no file outside it is owned by the appliance user"
    )


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except Failed as exc:
        print(f"systemd: FAILED: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except (subprocess.SubprocessError, OSError, rootfs.RootfsError) as exc:
        print(f"systemd: FAILED: {exc!r}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
