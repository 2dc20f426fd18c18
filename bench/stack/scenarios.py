"""The measurements of `python -m bench stack`, each run the same way against any stack (bounded, loopback).

A stack offers `port`, `credentials`, `roots()`, `api_worker_pid()`,
`task_worker_pid()` and `task_outcomes(ids)` (bench/stack/ours.py and
reference.py). GET load is wrk (bench/balancer.py's runner); logins and task
submissions come from client threads with keep-alive connections on plain
sockets (Client: cheap enough that the client is not what a stack waits for).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import threading
import time
from typing import Any

from bench.balancer import wrk
from bench.stack import procs
from bench.tasks import pct


class ClientError(Exception):
    """The server's answer could not be read as the HTTP/1.1 this client speaks (Content-Length framing)."""


class Client:
    """One keep-alive HTTP/1.1 connection on a plain socket; reconnects after an error.

    The submissions' load generator runs on the same 2 cores as both stacks: http.client's
    header parsing cost about as much CPU per call as a stack's whole submit path, so this
    client frames requests and reads Content-Length answers itself (both stacks send them).
    """

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}"
        self.sock: socket.socket | None = None
        self.buf = b""

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else b""
        request = f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.buf = b""
                self.sock.sendall(request)
                status, close, raw = self._response()
                if close:
                    self.close()
                return status, json.loads(raw) if raw else {}
            except (OSError, ClientError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _recv(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ClientError("the server closed the connection before a whole answer")
        self.buf += chunk

    def _response(self) -> tuple[int, bool, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ClientError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" not in fields:
            raise ClientError(f"answer without Content-Length ({fields.get('transfer-encoding', 'no framing')})")
        length = int(fields["content-length"])
        while len(self.buf) < length:
            self._recv()
        raw, self.buf = self.buf[:length], self.buf[length:]
        return int(parts[1]), fields.get("connection", "").lower() == "close", raw

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def login_token(stack: Any) -> str:
    status, body = Client(stack.port).call("POST", "/auth/login", stack.credentials)
    if status != 200:
        raise RuntimeError(f"{stack.name}: login answered {status}: {body}")
    return body["data"]["access_token"]


# --- 1. GET load ------------------------------------------------------------------------------------


def get_load(stack: Any, path: str, conns: int, seconds: int, token: str | None) -> dict[str, float]:
    """wrk on `path`: req/s, p50, p99 (ms), errors (non-2xx and socket errors); 1 s of warm-up first."""
    url = f"http://127.0.0.1:{stack.port}{path}"
    wrk(url, conns, 1, token)
    cpu = procs.cpu_seconds(stack.roots())
    r = wrk(url, conns, seconds, token)
    r["cpu_ms"] = (procs.cpu_seconds(stack.roots()) - cpu) * 1000 / max(r["rps"] * seconds, 1)  # per request, whole stack
    return r


# --- 2. logins --------------------------------------------------------------------------------------


def login_load(stack: Any, conns: int, seconds: float) -> dict[str, float]:
    """`conns` clients logging in back to back for `seconds`: logins/s, p50, p99 (ms), errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run() -> None:
        client = Client(stack.port)
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                status, _ = client.call("POST", "/auth/login", stack.credentials)
            except (OSError, ClientError):
                status = 0
            with lock:
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors[0] += 1
        client.close()

    cpu = procs.cpu_seconds(stack.roots())
    started = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    cpu_ms = (procs.cpu_seconds(stack.roots()) - cpu) * 1000 / max(len(latencies), 1)
    if not latencies:
        return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": errors[0], "cpu_ms": cpu_ms}
    return {"rps": len(latencies) / elapsed, "p50": pct(latencies, 50), "p99": pct(latencies, 99), "errors": errors[0], "cpu_ms": cpu_ms}


# --- 3. tasks ---------------------------------------------------------------------------------------


def submit_body(stack: Any, i: int) -> dict[str, Any]:
    data = {"message": "bench", "n": i}
    if stack.name.startswith("appliance"):
        return {"task_type": "sample", "data": data, "retry_config": {"max_retries": 3}}
    return {"task_type": "sample", "data": data}  # the reference's task carries max_retries=3 itself


def tasks_run(stack: Any, token: str, n: int, clients: int = 16, kill_after: float | None = None, settle: float = 90.0) -> dict[str, Any]:
    """Submit `n` sample tasks over HTTP from `clients` threads and wait until each is done (or `settle` s after the last submit).

    With kill_after, one task worker process is killed (SIGKILL) that many seconds after the first
    submission. Returned: tasks/s (n / (last done - first submit)), submit-to-done p50/p99 (ms),
    and the tasks that failed (lost) or were not done by the deadline (stuck).
    """
    submitted: dict[str, float] = {}
    lock = threading.Lock()
    refused = [0]
    counter = iter(range(n))

    def run() -> None:
        client = Client(stack.port, token)
        for i in counter:
            t0 = time.time()
            status, body = client.call("POST", "/tasks/submit", submit_body(stack, i))
            with lock:
                if status in (200, 201, 202):
                    submitted[body["data"]["task_id"]] = t0
                else:
                    refused[0] += 1
        client.close()

    killer = None
    if kill_after is not None:
        victim = stack.task_worker_pid()
        killer = threading.Timer(kill_after, lambda: os.kill(victim, signal.SIGKILL))
    cpu = procs.cpu_seconds(stack.roots())
    first = time.time()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    if killer is not None:
        killer.start()
    for t in threads:
        t.join()
    submit_s = time.time() - first
    ids = list(submitted)
    deadline = time.monotonic() + settle
    outcomes: dict[str, tuple[str, float | None]] = {}
    while time.monotonic() < deadline:
        try:
            outcomes = stack.task_outcomes(ids)
        except Exception as exc:  # the shared database or Redis said no for a moment (connections): ask again
            print(f"  ({stack.name}: reading task outcomes failed: {type(exc).__name__}: {str(exc)[:200]})", flush=True)
            time.sleep(1)
            continue
        if sum(1 for s, _ in outcomes.values() if s in ("succeeded", "failed", "failure")) >= len(ids):
            break
        time.sleep(0.25)
    cpu = procs.cpu_seconds(stack.roots()) - cpu
    done = {i: f for i, (s, f) in outcomes.items() if s == "succeeded" and f is not None}
    lost = sum(1 for s, _ in outcomes.values() if s in ("failed", "failure"))
    stuck = len(ids) - len(done) - lost
    latency = [(done[i] - submitted[i]) * 1000 for i in done]
    history = None
    if hasattr(stack, "history_rows"):
        time.sleep(0.5)  # the workers' history buffers flush every 0.1 s
        history = stack.history_rows(ids)
    last = max(done.values()) if done else first
    return {
        "tasks_per_s": len(done) / max(last - first, 1e-9),
        "submits_per_s": len(ids) / max(submit_s, 1e-9),
        "p50": pct(latency, 50) if latency else float("nan"),
        "p99": pct(latency, 99) if latency else float("nan"),
        "done": len(done),
        "lost": lost,
        "stuck": stuck,
        "refused": refused[0],
        "history": history,
        "cpu_ms": cpu * 1000 / max(len(done), 1),  # per task, whole stack, submit to done
    }


# --- 4. footprint -----------------------------------------------------------------------------------


def footprint(stack: Any) -> dict[str, Any]:
    names = stack.names() if hasattr(stack, "names") else None
    count, kinds = procs.counts(stack.roots(), names)
    return {"pss": procs.pss_mib(stack.roots()), "processes": count, "kinds": kinds, "by_kind": procs.pss_by_kind(stack.roots(), names)}


# --- 5. an api worker killed under load ---------------------------------------------------------------


def kill_api_worker(stack: Any, path: str, conns: int, slices: int, kill_at: int, token: str | None) -> dict[str, Any]:
    """wrk in 1 s slices on `path`; one api worker is SIGKILLed 0.3 s into slice `kill_at`.

    Errors: all non-2xx answers and socket errors of every slice. Replaced: seconds from the kill until
    a new worker process stands in the victim's place (stack.api_worker_pids(), polled every 50 ms).
    Recovery: seconds from the kill to the end of the first later slice at 90 % or more of the median
    rate before the kill (1 s resolution; on a shared machine a slice's rate is noisy).
    """
    url = f"http://127.0.0.1:{stack.port}{path}"
    wrk(url, conns, 1, token)
    rates: list[float] = []
    errors = 0
    replaced: list[float] = []
    killed_at = None
    recovered = None
    for i in range(slices):
        if i == kill_at:
            victim = stack.api_worker_pid()
            timer = threading.Timer(0.3, lambda v=victim: os.kill(v, signal.SIGKILL))
            timer.start()
            killed_at = time.monotonic() + 0.3
            watcher = threading.Thread(target=_watch_replacement, args=(stack, victim, killed_at, replaced), daemon=True)
            watcher.start()
        r = wrk(url, conns, 1, token)
        rates.append(r["rps"])
        errors += int(r["errors"])
        if killed_at is not None and recovered is None and r["rps"] >= 0.9 * statistics.median(rates[:kill_at] or [r["rps"]]):
            recovered = time.monotonic() - killed_at
    return {"errors": errors, "recovery_s": recovered, "replaced_s": replaced[0] if replaced else None, "rates": rates}


def _watch_replacement(stack: Any, victim: int, killed_at: float, out: list[float], timeout: float = 30.0) -> None:
    count = len(stack.api_worker_pids())
    while time.monotonic() < killed_at + timeout:
        try:
            pids = stack.api_worker_pids()
        except Exception:  # the supervisor's control socket is busy a moment: ask again
            pids = set()
        if time.monotonic() > killed_at and victim not in pids and len(pids) >= count:
            out.append(time.monotonic() - killed_at)
            return
        time.sleep(0.05)
