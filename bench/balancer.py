"""Balancer throughput and latency against nginx, in one run (run by `make bench`, never by the tests).

    .venv/bin/python -m bench balancer   [--seconds 10] [--conns 64,256] [--workers 2] [--rounds 1] [--quick]
    .venv/bin/python -m bench balancer --processes 1,2   [--seconds 10] [--conns 64]

(--processes: the other benchmark, `processes_main` below: req/s of a real `appliance run` with
that many [balancer] processes in front of upstreams too cheap to be the bottleneck.)

Starts, in a temp data dir on loopback: the api workers (`appliance _child api`),
our balancer (uvloop, and the stdlib loop for comparison) and nginx
(least_conn, upstream keepalive, one worker process like our one balancer
process, and the proxy headers of the reference stack's nginx.conf: Host,
X-Real-IP, X-Forwarded-For, X-Forwarded-Proto) in front of the same workers. wrk runs for --seconds at each
connection count on /health/ping and on the authenticated /api/protected,
through the balancer, through nginx and straight to one worker. Prints req/s,
p50, p99, errors and the balancer/nginx ratios, and for our balancers the CPU time
their process spent per request (user + system, from /proc: on a machine shared
with other work this moves far less than req/s, so it is the figure to compare
between two versions of the balancer). Rate limits are off (they
would be the thing measured); the token hook is on (jwt).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import write_config  # noqa: E402
from tests.procs import free_port, start_child, stop, wait_port  # noqa: E402

WRK = shutil.which("wrk") or "/usr/bin/wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream api {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def wrk(url: str, conns: int, seconds: int, token: str | None) -> dict[str, float]:
    cmd = [WRK, "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) if "Requests/sec" in out else 0.0

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "errors": errors, "requests": int(m.group(1)) if m else 0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, port: int, path: str, conns: int, seconds: int, auth: str | None, pid: int | None) -> dict[str, float]:
    """One wrk run against one target (after a 1 s warm-up of its keep-alive pools), printed as a row."""
    url = f"http://127.0.0.1:{port}{path}"
    wrk(url, conns, 1, auth)
    before = cpu_seconds(pid) if pid else float("nan")
    r = wrk(url, conns, seconds, auth)
    r["cpu_us"] = (cpu_seconds(pid) - before) / r["requests"] * 1e6 if pid and r["requests"] else float("nan")
    shown = f"{r['cpu_us']:>12.0f}" if r["cpu_us"] == r["cpu_us"] else f"{'-':>12}"
    print(f"{path:<16}{conns:>6}  {name:<18}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['errors']:>8.0f}{shown}")
    return r


def summarise(ratios: list[tuple[float, float]], cpu: list[float]) -> None:
    """The medians over rounds: balancer/nginx ratios, and the balancer's CPU time per request."""
    if ratios:
        rps_ratio = statistics.median(r for r, _ in ratios)
        p99_ratio = statistics.median(p for _, p in ratios)
        over = f" (median of {len(ratios)})" if len(ratios) > 1 else ""
        print(f"{'':<24}ratio balancer/nginx{over}: throughput {rps_ratio:.2f}, p99 {p99_ratio:.2f}x")
    cpu = [c for c in cpu if c == c]  # NaN where /proc could not be read
    if cpu:
        print(f"{'':<24}balancer cpu per request (median of {len(cpu)}): {statistics.median(cpu):.0f} us")


def prepare(data: Path, workers: int, base: int, port: int) -> tuple[Path, str]:
    cfg_path = write_config(
        data,
        balancer={"listen": f"127.0.0.1:{port}", "access_log": False, "auth_mode": "jwt"},
        api={"workers": workers, "base_port": base},
        monitor={"enabled": False},
        rate_limits={"enabled": False},
        auth={"bcrypt_rounds": 10},
        logging={"level": "warning"},
    )
    from appliance import accounts, db, tokens
    from appliance.config import load_config

    cfg = load_config(cfg_path, env={})
    db.migrate(db.open_database(cfg))
    user = accounts.create_user("bench", "bench@example.com", "bench-password-1", role="user", rounds=10, min_length=8)
    token, _ = tokens.issue_access(
        tokens.TokenSettings.from_config(cfg),
        user_id=user.id,
        username="bench",
        role="user",
        generation=getattr(user, "token_generation", 0) or 0,
        family="bench",
    )
    return cfg_path, token


CHEAP_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}
}}
"""
CHEAP_SERVER = '    server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 200 \'{{"status":"ok"}}\'; }} }}'


def processes_main(args: argparse.Namespace) -> int:
    """req/s through `appliance run` with [balancer] processes = each of args.processes, in front of nginx
    answering from memory (two upstreams of a route of their own, a few microseconds a request), so the
    balancer processes are what is measured. Token hook and rate limits off on that route."""
    from tests.integration.supervised import Appliance

    counts = [int(n) for n in args.processes.split(",")]
    conns = [int(c) for c in args.conns.split(",")]
    cpus = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-processes-"))
    ndir = tmp / "nginx"
    ndir.mkdir()
    ports = [free_port(), free_port()]
    servers = "\n".join(CHEAP_SERVER.format(port=p) for p in ports)
    (ndir / "nginx.conf").write_text(CHEAP_CONF.format(dir=ndir, servers=servers))
    nginx = subprocess.Popen([NGINX, "-c", str(ndir / "nginx.conf"), "-p", str(ndir), "-g", "daemon off;"], start_new_session=True)
    try:
        for p in ports:
            wait_port(p, proc=nginx)
        print(
            f"wrk {args.seconds}s per run (2 threads) -> appliance run -> 2 nginx upstreams answering from memory; "
            f"{cpus} CPUs shared by wrk, the balancers and nginx"
        )
        if cpus <= 2:
            print(
                f"  {cpus} CPUs: wrk, nginx and every balancer process share them, so this shows what they can here"
                " (a second process uses idle time of the cores, not a core of its own), not how a big server scales"
            )
        print(f"{'processes':>9}{'conns':>7}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'cpu us/req':>12}")
        for n in counts:
            app = Appliance(
                tmp / f"p{n}",
                api_workers=1,
                task_workers=1,
                balancer={
                    "processes": n,
                    "upstreams": [{"address": f"127.0.0.1:{p}", "group": "cheap"} for p in ports],
                    "routes": [{"prefix": "/cheap", "group": "cheap"}],
                    "public_prefixes": ["/health/", "/cheap"],
                    "health_interval": 2.0,
                },
                rate_limits={"enabled": False},
            )
            app.start()
            try:
                pids = list(app.pids("balancer").values())
                for c in conns:
                    url = f"http://127.0.0.1:{app.port}/cheap"
                    wrk(url, c, 1, None)
                    before = sum(cpu_seconds(pid) for pid in pids)
                    r = wrk(url, c, args.seconds, None)
                    cpu_us = (sum(cpu_seconds(pid) for pid in pids) - before) / r["requests"] * 1e6 if r["requests"] else float("nan")
                    print(f"{n:>9}{c:>7}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['errors']:>8.0f}{cpu_us:>12.0f}")
            finally:
                app.stop()
        return 0
    finally:
        stop(nginx, signal.SIGQUIT)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench balancer", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 s runs at 64 connections")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every target, interleaved; ratios are the median over rounds")
    ap.add_argument(
        "--processes",
        default="",
        help="e.g. 1,2: instead, req/s of `appliance run` with that many [balancer] processes in front of cheap upstreams",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.conns = 3, "64"
    if args.processes:
        if not os.path.exists(WRK) or not os.path.exists(NGINX):
            print(f"bench balancer: needs wrk ({WRK}) and nginx ({NGINX})", file=sys.stderr)
            return 2
        return processes_main(args)
    conns = [int(c) for c in args.conns.split(",")]
    if not os.path.exists(WRK) or not os.path.exists(NGINX):
        print(f"bench balancer: needs wrk ({WRK}) and nginx ({NGINX})", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    base = free_port()
    while any(not _free(base + i) for i in range(args.workers)):
        base = free_port()
    bal_port, std_port, nginx_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    nginx: subprocess.Popen | None = None
    try:
        cfg_path, token = prepare(tmp / "data", args.workers, base, bal_port)
        env = {"PYTHONPATH": str(ROOT)}
        for i in range(args.workers):
            procs.append(start_child("api", cfg_path, i, env=env, log=tmp / f"api{i}.log"))
        for i in range(args.workers):
            wait_port(base + i, timeout=60, proc=procs[i])
        procs.append(start_child("balancer", cfg_path, 0, env=env, log=tmp / "balancer.log"))
        wait_port(bal_port, proc=procs[-1])
        pids = {"balancer": procs[-1].pid}
        std_env = {**env, "APPLIANCE_BALANCER__USE_UVLOOP": "false", "APPLIANCE_BALANCER__LISTEN": f"127.0.0.1:{std_port}"}
        procs.append(start_child("balancer", cfg_path, 1, env=std_env, log=tmp / "balancer-std.log"))
        wait_port(std_port, proc=procs[-1])
        pids["balancer-asyncio"] = procs[-1].pid
        ndir = tmp / "nginx"
        ndir.mkdir()
        servers = "\n".join(f"        server 127.0.0.1:{base + i};" for i in range(args.workers))
        (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, servers=servers, port=nginx_port))
        nginx = subprocess.Popen([NGINX, "-c", str(ndir / "nginx.conf"), "-p", str(ndir), "-g", "daemon off;"], start_new_session=True)
        wait_port(nginx_port, proc=nginx)
        targets = [
            ("balancer", bal_port),
            ("balancer-asyncio", std_port),
            ("nginx", nginx_port),
            ("direct-1-worker", base),
        ]
        print(f"wrk {args.seconds}s per run; {args.workers} api workers (waitress); 2 cores shared; {args.rounds} round(s); tmp {tmp}")
        print(f"{'path':<16}{'conns':>6}  {'target':<18}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'cpu us/req':>12}")
        for path, auth in (("/health/ping", None), ("/api/protected", token)):
            for c in conns:
                ratios: list[tuple[float, float]] = []
                cpu: list[float] = []
                for _ in range(args.rounds):  # every target once per round: a slow spell of the machine hits all
                    results: dict[str, dict[str, float]] = {}
                    for name, port in targets:
                        results[name] = measure(name, port, path, c, args.seconds, auth, pids.get(name))
                    ours, peer = results["balancer"], results["nginx"]
                    cpu.append(ours["cpu_us"])
                    if peer["rps"] and peer["p99"]:
                        ratios.append((ours["rps"] / peer["rps"], ours["p99"] / peer["p99"]))
                summarise(ratios, cpu)
        return 0
    finally:
        if nginx is not None:
            stop(nginx, signal.SIGQUIT)
        for p in reversed(procs):
            stop(p)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    print(f"took {time.monotonic() - t0:.0f}s")
    raise SystemExit(code)
