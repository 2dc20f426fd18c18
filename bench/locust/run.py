"""`python -m bench locust [--seconds 60] [--users 5,20] [--spawn-rate 5] [--out PATH]`: the reference's locust test, headless.

For each user count: a fresh `appliance run` on the default config (only its
ports are picked free on loopback; SQLite, the default rate-limit zones, two
api workers on two cores), an admin with a random password (the reference logs
in as admin / admin123; the appliance has no default account), then locust
(bench/locust/locustfile.py) for `--seconds`, bounded by a timeout. The
summary goes into its own section of bench/results/latest.md (replacing an
earlier one, keeping the stack table that `python -m bench stack` writes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.locust import summary
from bench.stack import report

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
RESULTS = HERE.parent / "results"
ADMIN = "locust_admin"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench locust", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="run time of each locust run")
    ap.add_argument("--users", default="5,20", help="comma list of user counts, one run each")
    ap.add_argument("--spawn-rate", type=float, default=5.0, help="users started per second")
    ap.add_argument("--out", default=str(RESULTS / "latest.md"), help="the results file whose locust section is replaced ('-': print only)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (appliance and locust logs) and print where it is")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("locust") is None:
        print("bench locust: needs locust (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    users = [int(u) for u in args.users.split(",") if u.strip()]
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-locust-"))
    runs: list[summary.Run] = []
    try:
        for n in users:
            runs.append(_one_run(tmp / f"users-{n}", n, args.seconds, args.spawn_rate))
            r = runs[-1]
            print(f"  {n} users: {r.requests} requests, {r.failures} failures, {r.rps:.1f} req/s, p99 {r.p99:.0f} ms", flush=True)
    finally:
        if args.keep:
            print(f"bench locust: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - t0
    header = [
        f"date: {started:%Y-%m-%d %H:%M} UTC, {took / 60:.1f} min (`python -m bench locust {' '.join(argv or [])}`".rstrip() + ")",
        f"machine: {report.machine()}; load average at the end {report.load()}",
        f"locust {_version('locust')}, headless, {args.seconds} s per run, {args.spawn_rate:g} users started per second, "
        "the reference's locustfile (bench/locust/locustfile.py) against a fresh `appliance run` on the default config per run",
    ]
    section = summary.render(runs, header, NOTES)
    print()
    print(section)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary.splice(out.read_text() if out.exists() else "", section))
        print(f"written to {out}")
    return 0


def _one_run(tmp: Path, users: int, seconds: int, spawn_rate: float) -> summary.Run:
    from appliance.config import load_config
    from tests.conftest import write_config
    from tests.integration.supervised import Appliance
    from tests.procs import free_range

    # Nothing but ports is set. They are pinned to free ones (the default worker count, one per CPU, and its
    # rolling-restart spares; the monitor after them), so the monitor's /metrics is known and nothing collides.
    workers = os.cpu_count() or 1
    app = Appliance(tmp, api_workers=workers)
    base = free_range(2 * workers + 1)
    while base <= app.port <= base + 2 * workers:
        base = free_range(2 * workers + 1)
    monitor_port = base + 2 * workers
    app.sections = {
        "balancer": {"listen": f"127.0.0.1:{app.port}"},
        "api": {"base_port": base},
        "monitor": {"port": monitor_port},
    }
    app.config = write_config(app.data, **app.sections)
    app.start()
    try:
        password = "Lc-" + secrets.token_urlsafe(18)
        made = app.cli("user", "create", ADMIN, "--admin", "--password-stdin", stdin=password + "\n")
        if made.returncode != 0:
            raise RuntimeError(f"bench locust: could not create the admin: {made.stdout}{made.stderr}")
        prefix = tmp / "locust"
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
        cmd += ["-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{seconds}s", "--stop-timeout", "5"]
        cmd += ["--host", f"http://127.0.0.1:{app.port}", "--csv", str(prefix), "--loglevel", "WARNING"]
        env = {**os.environ, "LOCUST_USERNAME": ADMIN, "LOCUST_PASSWORD": password}
        with open(tmp / "locust.log", "wb") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=seconds + 90, cwd=tmp)
        if not Path(f"{prefix}_stats.csv").exists():
            raise RuntimeError(
                f"bench locust: locust exited with {done.returncode} and no stats:\n{(tmp / 'locust.log').read_text()[-3000:]}"
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/metrics", timeout=10) as resp:  # loopback: no token needed
            refused = summary.refused_counts(resp.read().decode())
        zones = load_config(app.config, env={}).rate_limits.zones
        return summary.read_run(prefix, users, zones, refused)
    finally:
        app.stop()


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"


NOTES = [
    "locust counts every answer of 400 or more as a failure. The columns keep them apart: a 429 of a rate-limit zone that "
    "matches the request is intended; a 401 of a user whose single login (the locustfile logs in once, on start) got that 429 "
    "follows from it; any other status is unexpected; a request with no HTTP answer (refused, reset, timed out) is locust's own.",
    "Every simulated user logs in as the same admin from 127.0.0.1: the default login zone (5/min per address, burst 5, "
    "against password guessing) lets the first logins of a run through and refuses the rest with 429 and Retry-After. "
    "The reference's locustfile does not retry, so those users call the protected routes without a token (401) and the "
    "public ones (/health/ping, /api/status) as before. The api zone (20/s per user, burst 60) is not reached at these rates.",
]
