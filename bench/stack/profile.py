"""`python -m bench.stack.profile [--path /api/protected] [--seconds 15] [--role api]`: a py-spy flame graph under load.

Starts the appliance the way the table does (PostgreSQL + Redis), logs in, runs
wrk at 64 connections on --path (or, for /tasks/submit, the table's task submissions) and records one process of --role with py-spy
into bench/results/profile-<role>.svg (and the collapsed stacks in .txt);
prints the top functions by own time. Needs root or ptrace rights for py-spy.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.stack import scenarios
from bench.stack.ours import ApplianceStack
from bench.stack.run import RESULTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.stack.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="/api/protected")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--role", default="api", choices=("api", "balancer", "worker"))
    ap.add_argument("--engine", default="postgresql", choices=("postgresql", "sqlite"))
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--gil", action="store_true", help="only the thread holding the GIL: where the CPU goes, not the waits")
    ap.add_argument("--tasks", type=int, default=3000, help="with --path /tasks/submit: how many to submit")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second (50 keeps up on a busy machine)")
    ap.add_argument("--name", default="", help="file name under bench/results without extension (default profile-<role>)")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    stack = ApplianceStack(tmp, args.engine).start()
    try:
        token = scenarios.login_token(stack)
        assert stack.app is not None
        pid = stack.app.pids(args.role)[0]
        name = args.name or f"profile-{args.role}"
        out = RESULTS / f"{name}.svg"
        raw = RESULTS / f"{name}.txt"  # collapsed stacks, for reading and for the closing note
        if args.path == "/tasks/submit":  # sample tasks from 8 client threads, as the table's task scenario
            load = threading.Thread(target=scenarios.tasks_run, args=(stack, token, args.tasks))
        else:
            load = threading.Thread(target=scenarios.get_load, args=(stack, args.path, args.conns, 2 * args.seconds + 2, token))
        load.start()
        for fmt, path in (("raw", raw), ("flamegraph", out)):  # one format per py-spy run
            cmd = [spy, "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate), "-f", fmt, "-o", str(path)]
            cmd += ["--nonblocking"]
            cmd += ["--gil"] if args.gil else []
            subprocess.run(cmd, check=False, capture_output=True)
        load.join()
        print(f"flame graph: {out}")
        _top(raw)
        _breakdown(raw)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _top(raw: Path, n: int = 25) -> None:
    """Own and total sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    if not raw.exists():
        return
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        k = int(count)
        samples += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            total[f] = total.get(f, 0) + k
    print(f"{samples} samples; top by total:")
    for f, k in sorted(total.items(), key=lambda x: -x[1])[:n]:
        print(f"{100 * k / samples:6.1f}% total {100 * own.get(f, 0) / samples:6.1f}% own  {f}")


# Where a sample's time goes: the innermost frame that is not the standard library decides (a socket send
# called by waitress is waitress's; a regex run by the middleware is the middleware's).
PARTS = (
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("appliance/api/instruments.py", "metrics (prometheus_client)"),
    ("appliance/api/middleware.py", "middleware"),
    ("appliance/logs", "logging"),
    ("logging/", "logging"),
    ("appliance/", "appliance (resources, context)"),
    ("falcon/", "falcon"),
    ("waitress/", "waitress"),
)


def part_of(frames: list[str]) -> str:
    """The part of the program one sample belongs to, from its frames (outermost first)."""
    for frame in reversed(frames):
        for needle, part in PARTS:
            if needle in frame:
                return part
    return "other (stdlib, idle)"


def _breakdown(raw: Path) -> None:
    """Share of samples per part of the program (PARTS)."""
    if not raw.exists():
        return
    shares: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            part = part_of(stack.split(";"))
            shares[part] = shares.get(part, 0) + int(count)
    samples = sum(shares.values()) or 1
    print("by part of the program:")
    for part, k in sorted(shares.items(), key=lambda x: -x[1]):
        print(f"{100 * k / samples:6.1f}%  {part}")


if __name__ == "__main__":
    raise SystemExit(main())
