"""The template process (zygote): imports what every role needs once, then forks children on request.

`appliance _template --fd N` is started by the supervisor (appliance/supervisor/template.py)
with one end of a SOCK_SEQPACKET socketpair as fd N. It
1. imports every role's module and what the roles import when they set up (supervisor/roles.preload_modules),
   opening no database, socket (but its own) or thread, then gc.collect() + gc.freeze(), so
   the children forked from it share those pages and their garbage collector never writes
   to them;
2. says {"ready": ...} and then answers each request {"role", "index", "log_format", "argv",
   "env"} (fds: the child's stdout pipe, then the listening sockets it gets) with {"pid": N}.

Each child is forked twice (template -> intermediate -> child; the intermediate exits at
once), so the child is orphaned and the kernel hands it to the supervisor, which is a child
subreaper (PR_SET_CHILD_SUBREAPER): it is the supervisor's own child, reaped with waitpid
and its exit status as real as that of a child it started with exec. The template is
nobody's parent: it can die (kill -9) and be restarted while every child keeps serving, and
a child's death never reaches it. The answer is sent only after the intermediate is reaped,
so the child has its new parent by then.

The child then becomes what `appliance _child ROLE` would be: its own process group, the
supervisor's environment for it (config included, so a SIGHUP's new config reaches every
child forked after it: the template itself reads no config), stdout/stderr on the pipe,
stdin on /dev/null, and supervisor/roles.run_child. Operators' app and task files are imported there,
after the fork, so a broken one fails only its role, naming the file.

The template stops when the supervisor closes its end (or dies: parent-death signal).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
M_ARENA_MAX = -8  # glibc mallopt parameter
MAX_REQUEST = 1 << 20
MAX_FDS = 16


class BecomeChild(Exception):  # not an error: how a forked child leaves the template's loop
    """Raised in a freshly forked child: unwinds the template's loop, then the child runs its role."""

    def __init__(self, request: dict[str, Any], fds: list[int], supervisor: int):
        super().__init__("child")
        self.request, self.fds, self.supervisor = request, fds, supervisor


_preloaded: tuple[int, list[str]] | None = None


def preload() -> tuple[int, list[str]]:
    """Import every role's modules; (how many modules are loaded, those that could not be imported). Once per process."""
    global _preloaded
    if _preloaded is not None:  # the supervisor did it before forking us: touching it all again would copy its pages
        return _preloaded
    from appliance.supervisor import roles

    failed = []
    for name in roles.preload_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:  # the role that needs it fails in its child, with its own message
            failed.append(f"{name}: {exc}")
    import mimetypes

    mimetypes.init()  # falcon's first Response reads the system's mime.types: once here, not in every child
    _limit_malloc_arenas()
    _preloaded = (len(sys.modules), failed)
    return _preloaded


def prepare() -> None:
    """Build what the roles can from the inherited config (supervisor/roles.PREPARE), then freeze it too."""
    from appliance.child_config import inherited_config
    from appliance.supervisor import roles

    cfg = inherited_config()
    if cfg is None:
        return
    for line in roles.prepare_in_template(cfg):
        log.warning("cannot prepare %s in the template; its children build their own", line)
    gc.freeze()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    # glibc gives each thread its own malloc arena (up to 8 per CPU), each holding freed memory of its
    # own; the roles' threads allocate little outside pymalloc, so two arenas cost no speed and save
    # megabytes in every threaded child (the setting is inherited by each fork).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def serve(fd: int, log_format: str) -> int:
    """The template's life: preload, then fork children on request until the supervisor closes its end."""
    from appliance.logs import setup_logging

    setup_logging("template", log_format, "info")
    supervisor = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    sock = socket.socket(fileno=fd)
    try:
        t0 = time.perf_counter()
        forked = _preloaded is not None
        loaded, failed = preload()
        if not forked:  # started with exec (a restart): our own imports, frozen here
            for line in failed:
                log.warning("cannot preload %s", line)
            gc.collect()
            gc.freeze()  # what we imported stays out of every child's collections: its pages stay shared
        else:  # forked by the supervisor, with its config: what the roles build from it, built once here
            prepare()
        seconds = time.perf_counter() - t0
        sys.stdout.flush()
        sock.send(json.dumps({"ready": True, "pid": os.getpid(), "modules": loaded, "seconds": round(seconds, 3)}).encode())
        log.info("template ready: %d modules preloaded in %.2fs", loaded, seconds)
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
            except InterruptedError:
                continue
            if not msg:
                return 0  # the supervisor closed its end or is gone
            reply = handle(msg, fds, supervisor)
            sock.send(json.dumps(reply).encode())
    except BecomeChild as raised:
        child = raised
    except OSError as exc:
        log.error("template stops: %s", exc)
        return 1
    # The role runs outside the except block: inside it every exception the child raises would
    # carry BecomeChild as its __context__, and httptools reports a callback's error only through
    # that context (the balancer then closed connections it should have answered with 400).
    sock.close()
    return become_child(child)


def handle(msg: bytes, fds: list[int], supervisor: int) -> dict[str, Any]:
    """One request: fork the child, then close our copies of its fds. Raises BecomeChild in the child."""
    try:
        return {"pid": fork_child(json.loads(msg), fds, supervisor)}
    except BecomeChild:
        raise
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if not _CHILD:  # a later child must not inherit an earlier one's pipe (its relay would never see EOF)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


_CHILD = False  # True in a forked child on its way out of the loop


def fork_child(request: dict[str, Any], fds: list[int], supervisor: int) -> int:
    """Fork twice; the grandchild raises BecomeChild, we return its pid once it is the supervisor's."""
    global _CHILD
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _CHILD = True
                raise BecomeChild(request, fds, supervisor)
            os.write(w, str(pid).encode())
        except BecomeChild:
            raise
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.close(w)
    try:
        _, status = os.waitpid(middle, 0)
        data = os.read(r, 32)
    finally:
        os.close(r)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise OSError("the intermediate process could not fork the child")
    return int(data)


def become_child(child: BecomeChild) -> int:
    """Turn this forked process into the child `appliance _child ROLE` would be, and run its role."""
    from appliance.contract import LISTEN_FDS_ENV
    from appliance.supervisor import roles

    req = child.request
    os.setpgid(0, 0)  # its own group, like an exec'd child: a terminal's Ctrl-C reaches the supervisor only
    deadline = time.monotonic() + 5.0
    while os.getppid() != child.supervisor and time.monotonic() < deadline:
        time.sleep(0.001)  # the intermediate is exiting; then the kernel makes the supervisor our parent
    out, listeners = child.fds[0], child.fds[1:]
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    env = dict(req["env"])
    for fd in listeners:
        os.set_inheritable(fd, True)
    if listeners:
        env[LISTEN_FDS_ENV] = ",".join(str(fd) for fd in listeners)
    os.environ.clear()
    os.environ.update(env)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = list(req.get("argv") or sys.argv)
    args = argparse.Namespace(role=req["role"], index=int(req["index"]), log_format=req.get("log_format"), config=None)
    return roles.run_child(args)


def register(sub: Any) -> None:
    """`appliance _template --fd N` (internal: how the supervisor starts the template)."""
    p = sub.add_parser("_template")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.set_defaults(func=lambda args: serve(args.fd, args.log_format))
