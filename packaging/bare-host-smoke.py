"""The one-file binary on a host without Python: init, run, use, back up, stop, restore.

    python packaging/bare-host-smoke.py [dist/appliance]      (root; `make test-e2e` runs it)

A Debian bookworm root file system of the minbase variant (no python3 in it) is made with
debootstrap once and cached as a tarball in $APPLIANCE_CI_CACHE (default
/var/cache/appliance-ci), then unpacked afresh for each run. The binary is copied in and run
in a chroot inside `unshare --mount --pid --fork` with its own /proc (and the host's /dev);
it shares the host's network, so this script talks to it over loopback from outside:
log in as the admin that `appliance init` printed, call /api/protected, submit a `sample`
task and see it succeed, open /status, run `appliance backup` while it runs, stop it with
SIGTERM (exit status 0), restore the archive into a fresh data dir, start that one, and find
the user and the task again. Prints one line per step; exits non-zero naming the step that failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rootfs

ROOT = Path(__file__).resolve().parent.parent
ROOTFS = rootfs.CACHE / "bookworm-minbase.tar.gz"
INSIDE = "/usr/local/bin/appliance"


def step(message: str) -> None:
    print(f"bare-host: {message}", flush=True)


def fail(message: str) -> None:
    print(f"bare-host: FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def ensure_rootfs() -> Path:
    """The cached root file system tarball, made with debootstrap when it is missing (packaging/rootfs.py)."""
    try:
        return rootfs.ensure_rootfs(ROOTFS, step=step)
    except rootfs.RootfsError as exc:
        fail(str(exc))
        raise


class Host:
    """A fresh unpacked root with the binary in it; commands run in a chroot with their own pid namespace and /proc."""

    def __init__(self, binary: Path, work: Path):
        self.root = work / "root"
        self.root.mkdir()
        rootfs.unpack(ensure_rootfs(), self.root)
        pythons = [p.name for p in (self.root / "usr" / "bin").glob("python*")]
        if pythons:
            fail(f"the root file system has {pythons}: it is not a host without Python")
        shutil.copy2(binary, self.root / INSIDE.lstrip("/"))
        base = free_port_block(8)
        self.port = base
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "APPLIANCE_BALANCER__LISTEN": f"127.0.0.1:{base}",
            "APPLIANCE_API__WORKERS": "2",
            "APPLIANCE_QUEUE__WORKERS": "1",
        }

    def command(self, *args: str) -> list[str]:
        script = 'mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"'
        return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={self.root / 'proc'}", "sh", "-c", script, str(self.root), *args]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(INSIDE, *args), capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self, config: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(INSIDE, "run", "--config", config), stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=self.env
        )


def free_port_block(n: int) -> int:
    for base in range(23000 + os.getpid() % 2000 * 4, 40000, 16):
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


def wait_up(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "appliance is up" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            fail(f"the appliance exited with {proc.returncode} before it was up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    fail(f"the appliance was not up within {timeout}s:\n{log.read_text()[-3000:]}")


def bootloader_pid(unshare: subprocess.Popen) -> int:
    """The binary's own process (pid 1 of the namespace): the child of unshare."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
    if not children:
        fail("unshare has no child")
    return int(children[0])


def stop(unshare: subprocess.Popen) -> int:
    os.kill(bootloader_pid(unshare), signal.SIGTERM)
    try:
        return unshare.wait(90)
    except subprocess.TimeoutExpired:
        unshare.kill()
        fail("the appliance did not stop within 90 s of SIGTERM")
        return -1


def http(port: int, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None
    )
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    return status, doc if isinstance(doc, dict) else {}, raw


def login(port: int, password: str) -> str:
    status, doc, raw = http(port, "POST", "/auth/login", {"username": "admin", "password": password})
    if status != 200:
        fail(f"login as admin answered {status}: {raw[:300]!r}")
    return doc["data"]["access_token"]


def wait_task(port: int, token: str, task_id: str) -> dict:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status, doc, raw = http(port, "GET", f"/tasks/status/{task_id}", token=token)
        if status == 200 and doc["data"]["status"] in ("succeeded", "failed", "cancelled"):
            return doc["data"]
        time.sleep(0.3)
    fail(f"task {task_id} did not finish within 90 s")
    return {}


def main(argv: list[str]) -> int:
    binary = Path(argv[0] if argv else ROOT / "dist" / "appliance").resolve()
    if not binary.is_file():
        fail(f"{binary} is missing; build it with `make binary`")
    if os.geteuid() != 0:
        fail("needs root (chroot, unshare, mount)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="appliance-bare-host-") as tmp:
        work = Path(tmp)
        host = Host(binary, work)
        step(f"root file system without python3 ready in {host.root}; the binary is {INSIDE}")
        result = host.run("init", "--data-dir", "/var/lib/appliance")
        if result.returncode != 0:
            fail(f"appliance init exited {result.returncode}: {result.stderr[-2000:]}")
        password = re.search(r"with password: (\S+)", result.stdout).group(1)
        step("appliance init: config, secrets, database and the admin user written")

        log = work / "run.log"
        proc = host.start("/var/lib/appliance/appliance.toml", log)
        wait_up(proc, log)
        step(f"appliance run is up on 127.0.0.1:{host.port}")
        token = login(host.port, password)
        status, doc, raw = http(host.port, "GET", "/api/protected", token=token)
        if status != 200:
            fail(f"/api/protected answered {status}: {raw[:300]!r}")
        status, doc, raw = http(host.port, "POST", "/tasks/submit", {"task_type": "sample", "data": {"hello": "bare host"}}, token)
        if status not in (200, 201, 202):
            fail(f"/tasks/submit answered {status}: {raw[:300]!r}")
        task_id = doc["data"]["task_id"]
        task = wait_task(host.port, token, task_id)
        if task["status"] != "succeeded":
            fail(f"the sample task ended {task['status']}: {task}")
        step(f"logged in, /api/protected 200, sample task {task_id} succeeded")
        status, _doc, raw = http(host.port, "GET", "/status")
        if status >= 500 or not raw:
            fail(f"/status answered {status}: {raw[:300]!r}")
        step(f"/status answered {status} through the balancer")

        result = host.run("backup", "/var/backups/appliance.tar.gz", "--config", "/var/lib/appliance/appliance.toml")
        if result.returncode != 0:
            fail(f"appliance backup exited {result.returncode}: {result.stderr[-2000:]}")
        step("appliance backup written while it runs")
        code = stop(proc)
        if code != 0:
            fail(f"appliance run exited {code} after SIGTERM:\n{log.read_text()[-3000:]}")
        left = list((host.root / "tmp").glob("_MEI*"))
        if left:
            fail(f"unpacked dirs left in /tmp after SIGTERM: {left}")
        step("SIGTERM: exit status 0, no unpacked dir left")

        result = host.run("restore", "/var/backups/appliance.tar.gz", "--data-dir", "/var/lib/restored")
        if result.returncode != 0:
            fail(f"appliance restore exited {result.returncode}: {result.stderr[-2000:]}")
        log2 = work / "run2.log"
        proc = host.start("/var/lib/restored/appliance.toml", log2)
        try:
            wait_up(proc, log2)
            token = login(host.port, password)
            status, doc, raw = http(host.port, "GET", f"/tasks/status/{task_id}", token=token)
            if status != 200 or doc["data"]["status"] != "succeeded":
                fail(f"the restored appliance does not know task {task_id}: {status} {raw[:300]!r}")
        finally:
            code = stop(proc)
        if code != 0:
            fail(f"the restored appliance exited {code} after SIGTERM")
        step("restored into a fresh data dir: the admin logs in and the task is there")
    step(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
