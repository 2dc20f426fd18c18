"""Footprint: total PSS at idle and after a short load, process count, time to READY, child restart.

Run: `python -m bench footprint [--api-workers 2,4] [--load-seconds 5] [--settle 5] [--out FILE]`.

For each api worker count (default: the default config, then 4 api workers), in a fresh data
dir from `appliance init` on free loopback ports:
- READY: from exec of `appliance run` to the supervisor's "appliance is up" line;
- idle PSS: Pss from /proc/PID/smaps_rollup summed over the supervisor and every descendant,
  `--settle` seconds after READY, also per role (roles from `appliance status`; processes the
  status does not name, the template for one, are shown by their command line);
- after load: the same sum right after `--load-seconds` of GET /health/ping through the
  balancer from 4 client threads (bounded, loopback);
- child restart: kill -9 of api[0], time until its port answers /health/ping again
  (median of --restarts, 11 s apart so that each is a first death, restarted without backoff).
Python reads compiled bytecode as an installed appliance does (a pip install or the one-file
binary ship .pyc files): PYTHONDONTWRITEBYTECODE is dropped and the .pyc files go to
PYTHONPYCACHEPREFIX=--pycache (outside the source tree), written by one warm-up start; --no-pyc
measures with whatever the environment says.
The reference stack's total (nginx, 3 gunicorn/Flask, Celery worker and beat, Redis, a dashboard)
comes from bench/results/latest.md written by `python -m bench stack` when present, else it is
the 286 MiB measured for issue 13, marked as such.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATEST = ROOT / "bench" / "results" / "latest.md"
REFERENCE_FALLBACK_MIB = 286.0


def pss_kib(pid: int, field: str = "Pss") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


def reference_total() -> tuple[float, str]:
    """The reference stack's idle total PSS: measured by `bench stack` when its table exists, else the issue's figure."""
    with contextlib.suppress(OSError):
        for line in LATEST.read_text().splitlines():
            if line.strip("| ").startswith("total PSS idle"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                m = re.match(r"([\d.]+) MiB", cells[2]) if len(cells) > 2 else None
                if m:
                    return float(m.group(1)), f"measured by bench stack ({LATEST.relative_to(ROOT)})"
    return REFERENCE_FALLBACK_MIB, "not measured here: the figure of issue 13"


class Run:
    """One `appliance run` of a fresh `appliance init` data dir on free loopback ports."""

    def __init__(self, work: Path, api_workers: int | None, extra_env: dict[str, str], pycache: str = ""):
        sys.path.insert(0, str(ROOT))
        from tests.procs import free_range

        n = (api_workers or os.cpu_count() or 1) + 4
        base = free_range(n)
        self.port, self.api_base = base, base + 2
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "_PYI_"))}
        self.env.update(
            PYTHONPATH=str(ROOT),
            APPLIANCE_BALANCER__LISTEN=f"127.0.0.1:{base}",
            APPLIANCE_MONITOR__PORT=str(base + 1),
            APPLIANCE_API__BASE_PORT=str(base + 2),
            **extra_env,
        )
        if api_workers:
            self.env["APPLIANCE_API__WORKERS"] = str(api_workers)
        if pycache:
            self.env.pop("PYTHONDONTWRITEBYTECODE", None)
            self.env["PYTHONPYCACHEPREFIX"] = pycache
        self.data = work / "data"
        self.log = work / "run.log"
        cmd = [sys.executable, "-m", "appliance"]
        subprocess.run([*cmd, "init", "--data-dir", str(self.data)], env=self.env, capture_output=True, check=True)
        self.config = self.data / "appliance.toml"
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        self.log.write_bytes(b"")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [*self.cmd, "run", "--config", str(self.config)], stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=self.env
        )
        while b"appliance is up" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise SystemExit(f"appliance run exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > 120:
                raise SystemExit("not up within 120 s")
            time.sleep(0.005)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def status(self) -> dict:
        from appliance.supervisor.control import query

        return query(self.data / "run" / "control.sock")

    def pss(self) -> tuple[float, int, dict[str, list[float]]]:
        """Total PSS (MiB), process count, PSS per role (MiB, one entry per process); self.anon: the Pss_Anon part."""
        assert self.proc is not None
        names = {r["pid"]: r["role"] for r in self.status()["processes"] if r["pid"]}
        names[self.proc.pid] = "supervisor"
        per: dict[str, list[float]] = {}
        pids = descendants(self.proc.pid)
        total = 0
        self.anon = sum(pss_kib(pid, "Pss_Anon") for pid in pids) / 1024
        for pid in pids:
            kib = pss_kib(pid)
            total += kib
            role = names.get(pid) or cmdline(pid).rpartition("appliance ")[2][:40] or "?"
            per.setdefault(role, []).append(kib / 1024)
        return total / 1024, len(pids), per

    def load(self, seconds: float, threads: int = 4) -> int:
        done = [0]
        stop_at = time.monotonic() + seconds
        lock = threading.Lock()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            while time.monotonic() < stop_at:
                try:
                    conn.request("GET", "/health/ping")
                    conn.getresponse().read()
                    with lock:
                        done[0] += 1
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.close()

        workers = [threading.Thread(target=client) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return done[0]

    def restart_time(self) -> float:
        """kill -9 of api[0], seconds until its port answers /health/ping from a new process."""
        old = next(r["pid"] for r in self.status()["processes"] if r["role"] == "api" and r["index"] == 0 and r["pid"])
        os.kill(old, signal.SIGKILL)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:
            conn = http.client.HTTPConnection("127.0.0.1", self.api_base, timeout=1)
            try:
                conn.request("GET", "/health/ping")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - t0
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.005)
        return float("nan")


def measure(api_workers: int | None, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        run = Run(Path(tmp), api_workers, dict(kv.split("=", 1) for kv in args.env), "" if args.no_pyc else args.pycache)
        if not args.no_pyc:  # the warm-up start writes the .pyc files an installed appliance would have
            run.start()
            run.stop()
        try:
            ready = [run.start()]
            time.sleep(args.settle)
            idle, count, per = run.pss()
            idle_anon = run.anon
            requests = run.load(args.load_seconds)
            after, _, _ = run.pss()
            restarts = []
            for _ in range(args.restarts):
                restarts.append(run.restart_time())
                # Past the supervisor's stable_after (10 s): the next death is a first one again, restarted at
                # once; sooner, it would measure the backoff (1 s, 2 s...) instead of the restart.
                time.sleep(11)
        finally:
            run.stop()
        for _ in range(args.starts - 1):
            ready.append(run.start())
            run.stop()
        return {
            "ready": statistics.median(ready),
            "ready_runs": ready,
            "idle": idle,
            "idle_anon": idle_anon,
            "after": after,
            "processes": count,
            "per": per,
            "requests": requests,
            "restart": statistics.median(restarts) if restarts else float("nan"),
            "restart_runs": restarts,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench footprint", description=__doc__.splitlines()[0])
    p.add_argument("--api-workers", default="0,4", help="comma-separated api worker counts; 0 is the default config (one per CPU)")
    p.add_argument("--load-seconds", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after READY before the idle figure")
    p.add_argument("--restarts", type=int, default=3, help="kill -9 of api[0] this many times")
    p.add_argument("--starts", type=int, default=3, help="starts to READY (median)")
    p.add_argument("--pycache", default="/tmp/appliance-bench-pycache", help="PYTHONPYCACHEPREFIX for the runs")
    p.add_argument("--no-pyc", action="store_true", help="leave PYTHONDONTWRITEBYTECODE / PYTHONPYCACHEPREFIX as they are")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for `appliance run` (e.g. a config override)")
    args = p.parse_args(argv)
    ref, ref_note = reference_total()
    results = {}
    for n in [int(x) for x in args.api_workers.split(",")]:
        label = "default config" if n == 0 else f"{n} api workers"
        print(f"bench footprint: {label} ...", flush=True)
        results[label] = r = measure(n or None, args)
        print(f"  processes {r['processes']}, idle PSS {r['idle']:.1f} MiB, after load {r['after']:.1f} MiB ({r['requests']} GETs)")
        # File-backed pages (libraries) count divided by every process on the host mapping them, other
        # programs' included: the anonymous part is what the appliance's own processes hold.
        print(f"  of the idle PSS, anonymous (Pss_Anon): {r['idle_anon']:.1f} MiB")
        print(f"  READY {r['ready']:.2f} s (runs {', '.join(f'{s:.2f}' for s in r['ready_runs'])})")
        print(f"  api[0] kill -9 -> serving again {r['restart']:.2f} s (runs {', '.join(f'{s:.2f}' for s in r['restart_runs'])})")
        for role, values in sorted(r["per"].items()):
            print(f"    {role:<12} {len(values)} x  {', '.join(f'{v:.1f}' for v in values)} MiB")
    print()
    print(f"| {'':<34} | {'idle PSS':>10} | {'after load':>10} | {'processes':>9} | {'READY':>7} | {'restart':>7} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
    for label, r in results.items():
        print(
            f"| appliance, {label:<23} | {r['idle']:>6.1f} MiB | {r['after']:>6.1f} MiB | {r['processes']:>9} "
            f"| {r['ready']:>5.2f} s | {r['restart']:>5.2f} s |"
        )
    print(f"| {'reference stack':<34} | {ref:>6.1f} MiB | {'':>10} | {'':>9} | {'':>7} | {'':>7} |")
    print(f"reference stack: {ref_note}")
    labels = list(results)
    if len(labels) == 2 and labels[0] == "default config":
        extra = int(labels[1].split()[0]) - (os.cpu_count() or 1)
        if extra > 0:
            per_worker = (results[labels[1]]["idle"] - results[labels[0]]["idle"]) / extra
            print(f"each extra api worker: {per_worker:.1f} MiB idle PSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
