"""The supervisor's side of the template process (appliance/template.py): start it, ask it for children, restart it.

- `Template.start()` runs `appliance _template --fd N` with one end of a SOCK_SEQPACKET
  socketpair; it is "up" once it sent its ready message (it has imported every role's code).
- `launch(command, env, fds)` asks it to fork the child `command` names (`... _child ROLE
  --index N --log-format F`), handing over a fresh stdout pipe and the fds the child needs
  (socket.send_fds); the answer is the child's pid. The child is ours, not the template's:
  forked twice and re-parented to us, a child subreaper (subreaper() below), so
  ForkedProcess reaps it with waitpid like subprocess.Popen would. When the template is not
  up, or cannot answer, launch returns None and the arbiter starts the child with exec as
  before: nothing waits for the template.
- `tick(now)` notices the template's death (kill -9, a crash) and restarts it with the
  children's backoff and crash-loop rule (policy.py); children keep serving meanwhile. Given
  up, it stays off and every child is started with exec.
- Orphans: being a subreaper, we also inherit any process a child leaves behind; Orphans.sweep()
  reaps those that exited, so none stays a zombie, and stops those that live on untracked.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.supervisor.child import describe_exit, indent
from appliance.supervisor.policy import RestartPolicy, RestartTracker
from appliance.supervisor.relay import Relay

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
ANSWER_TIMEOUT = 5.0
START_TIMEOUT = 30.0  # a template that has not said it is ready by then is killed (and restarted with backoff)


def subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux); True when that worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_request(command: list[str]) -> dict[str, Any] | None:
    """role, index and log format from `... _child ROLE --index N --log-format F`; None for any other command."""
    if "_child" not in command:
        return None
    rest = command[command.index("_child") + 1 :]
    if not rest:
        return None
    req: dict[str, Any] = {"role": rest[0], "index": 0, "log_format": None}
    for flag, key in (("--index", "index"), ("--log-format", "log_format")):
        if flag in rest[:-1]:
            req[key] = rest[rest.index(flag) + 1]
    req["index"] = int(req["index"])
    return req


class ForkedProcess:
    """A child the template forked for us: the part of subprocess.Popen the arbiter uses."""

    def __init__(self, pid: int, stdout: Any):
        self.pid, self.stdout = pid, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours after all (cannot happen with a subreaper): count it dead
                self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Template:
    """The template process and its restart history; the arbiter's loop is the only caller."""

    def __init__(self, command: Callable[[int], list[str]], env: dict[str, str], log_format: str, policy: RestartPolicy):
        self.command = command
        self.env = env
        self.log_format = log_format
        self.tracker = RestartTracker(policy)
        self.policy = policy
        self.proc: Any = None  # subprocess.Popen (started with exec) or ForkedProcess (forked from us)
        self.sock: socket.socket | None = None
        self.relay: Relay | None = None
        self.state = "new"  # starting, up, backoff, failed, stopped
        self.started_at = 0.0
        self.started_wall = 0.0
        self.next_start = 0.0
        self.restarts = 0
        self.forked = 0
        self.exit_status: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                self.command(theirs.fileno()),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            log.error("cannot start the template: %s; children are started with exec", exc)
            self.state = "failed"
            return
        finally:
            theirs.close()
        self.sock = ours
        self.state, self.exit_status = "starting", None
        self.started_at, self.started_wall = now, time.time()
        assert self.proc.stdout is not None
        self.relay = Relay(self.proc.stdout, "template", self.proc.pid, self.log_format)
        log.info("started the template (pid %d)", self.proc.pid)

    def fork_first(self) -> int | None:
        """Start the first template by forking this process; None here, the exit status to return with in the fork.

        Call it before this process has a thread, a socket or an open database, right after it
        imported every role's code (preload() + gc.freeze()): the template and every child it forks
        then share those pages with the supervisor itself. A template that dies later is started
        with exec (start()): by then the supervisor has threads, and forking it would not be safe.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            from appliance import template

            ours.close()
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.close(w)
            os.setpgid(0, 0)
            self.sock = None
            return template.serve(theirs.detach(), self.log_format)  # in each child it forks: the role's exit status
        theirs.close()
        os.close(w)
        self.proc = ForkedProcess(pid, os.fdopen(r, "rb"))
        self.sock = ours
        self.state, self.exit_status = "starting", None
        self.started_at, self.started_wall = time.monotonic(), time.time()
        self.relay = Relay(self.proc.stdout, "template", pid, self.log_format)
        log.info("started the template (pid %d, forked from the supervisor)", pid)
        return None

    def settled(self) -> bool:
        """Up, or not coming (failed, stopped): whether startup should wait for it."""
        return self.state in ("up", "failed", "stopped")

    def tick(self, now: float) -> None:
        """Notice a ready message or a death; restart after backoff."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self._on_exit(code, now)
            elif self.state == "starting" and self.sock is not None:
                self._read_ready()
                if self.state == "starting" and now - self.started_at > START_TIMEOUT:
                    log.error("the template (pid %s) is not ready after %.0fs: killing it", self.pid, START_TIMEOUT)
                    self.kill()
        if self.state == "backoff" and now >= self.next_start:
            self.start(now)

    def _read_ready(self) -> None:
        assert self.sock is not None
        with contextlib.suppress(OSError):
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return
            msg = json.loads(self.sock.recv(4096) or b"{}")
            if msg.get("ready"):
                self.state = "up"
                log.info("the template (pid %s) is ready after %.1fs", self.pid, time.monotonic() - self.started_at)
                return
        self.kill()  # anything but its ready message: it is broken; the next tick restarts it

    def _on_exit(self, code: int, now: float) -> None:
        pid = self.pid
        self.proc, self.exit_status = None, code
        self._close_sock()
        if self.state == "stopped":
            return
        tail = self.relay.last_lines(5) if self.relay else []
        decision = self.tracker.on_exit(now, self.started_at)
        if decision.give_up:
            self.state = "failed"
            log.error(
                "the template %s and crashed %d times within %.0fs: giving up on it; children are started with exec. Its last lines:\n%s",
                describe_exit(code),
                decision.deaths_in_window,
                self.policy.window,
                indent(tail),
            )
            return
        self.state, self.next_start = "backoff", now + decision.delay
        self.restarts += 1
        log.warning(
            "the template (pid %s) %s; children keep serving; restarting it in %.0fs. Its last lines:\n%s",
            pid,
            describe_exit(code),
            decision.delay,
            indent(tail),
        )

    def launch(self, command: list[str], env: dict[str, str], fds: tuple[int, ...]) -> ForkedProcess | None:
        """Fork the child `command` names from the template; None when the template cannot (start it with exec)."""
        req = child_request(command)
        if req is None or self.state != "up" or self.sock is None:
            return None
        req["argv"] = command
        req["env"] = env
        r, w = os.pipe()
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], [w, *fds])
            self.sock.settimeout(ANSWER_TIMEOUT)
            answer = json.loads(self.sock.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            os.close(r)
            log.error("the template did not answer (%s): killing it; %s is started with exec", exc, req["role"])
            self.kill()
            return None
        finally:
            os.close(w)
            if self.sock is not None:
                self.sock.settimeout(None)
        if "pid" not in answer:
            os.close(r)
            log.error("the template could not fork %s: %s; it is started with exec", req["role"], answer.get("error"))
            return None
        self.forked += 1
        return ForkedProcess(int(answer["pid"]), os.fdopen(r, "rb"))

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """On the way out: close our end (it exits on EOF), SIGKILL at the deadline."""
        self.state = "stopped"
        self._close_sock()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc = None

    def _close_sock(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def row(self) -> dict[str, Any]:
        """Its line in the status snapshot's processes."""
        return {
            "role": "template",
            "index": 0,
            "slot": 0,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "started": self.started_wall if self.proc is not None else None,
            "address": None,
            "exit_status": self.exit_status,
            "via": "exec",
        }


class Orphans:
    """Processes left to us as the subreaper that we do not track: the exited are reaped, the live are stopped.

    Such a process is a descendant whose parent died: the task process of a killed task worker
    (which would run its task a second time next to the retry), or a child the template forked
    just as it was killed, whose pid we never learnt (it would hold its role's port). One that is
    still alive and unknown at two sweeps in a row (ORPHAN_GRACE apart at least) gets SIGKILL.
    """

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def sweep(self, known: set[int], now: float) -> tuple[list[int], list[int]]:
        """(reaped, killed) pids."""
        reaped, killed, alive = [], [], {}
        for pid in _children():
            if pid in known:
                continue
            if _zombie(pid):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        reaped.append(pid)
                continue
            first = alive[pid] = self.seen.get(pid, now)
            if now - first >= ORPHAN_GRACE:
                log.warning("pid %d (%s) was left to the supervisor by a process that died: stopping it", pid, _command(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        self.seen = alive
        return reaped, killed


ORPHAN_GRACE = 1.0


def _children() -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out += map(int, (task / "children").read_text().split())
    return out


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False
