"""The one-file binary against the source install: size, cold start to READY, one child start, idle PSS.

Run: `python -m bench binary [--runs 5] [--no-drop-caches]` (after `make binary`; root for the cache drop).

For each of dist/appliance and `python -m appliance` from this checkout, in a fresh data dir
on free loopback ports (2 api workers, 1 task worker, monitor + scheduler, balancer):
- cold start: from exec of `appliance run` to the supervisor's "appliance is up" line; the
  first start after a page-cache drop (echo 3 > /proc/sys/vm/drop_caches) is printed apart,
  then the median of --runs starts with a warm cache;
- one child start: the same executable started the way the supervisor starts a child (with
  the running supervisor's environment, so the binary reuses its unpacked dir) up to the end
  of `appliance version`: the cost of exec, bootloader and imports that every child pays;
  also, from the log, how long the api workers took from spawn to ready;
- idle PSS: proportional set size of every process (bootloader, supervisor, children) summed,
  10 s after READY.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "appliance"


def free_base() -> int:
    sys.path.insert(0, str(ROOT))
    from tests.procs import free_range

    return free_range(6)


class Target:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str]):
        self.name, self.cmd, self.env = name, cmd, env


def targets() -> list[Target]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "_PYI_"))}
    out = []
    if BINARY.is_file():
        out.append(Target("binary", [str(BINARY)], env))
    else:
        print(f"{BINARY} is missing (make binary): only the source install is measured")
    out.append(Target("source", [sys.executable, "-m", "appliance"], {**env, "PYTHONPATH": str(ROOT)}))
    return out


def ports_env(base: int) -> dict[str, str]:
    return {
        "APPLIANCE_BALANCER__LISTEN": f"127.0.0.1:{base}",
        "APPLIANCE_MONITOR__PORT": str(base + 1),
        "APPLIANCE_API__BASE_PORT": str(base + 2),
        "APPLIANCE_API__WORKERS": "2",
        "APPLIANCE_QUEUE__WORKERS": "1",
    }


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
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


def start(target: Target, config: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float]:
    log.write_bytes(b"")
    t0 = time.perf_counter()
    proc = subprocess.Popen([*target.cmd, "run", "--config", str(config)], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    while b"appliance is up" not in log.read_bytes():
        if proc.poll() is not None:
            raise SystemExit(f"{target.name}: appliance run exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        if time.perf_counter() - t0 > 120:
            raise SystemExit(f"{target.name}: not up within 120 s")
        time.sleep(0.005)
    return proc, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def supervisor_env(proc: subprocess.Popen, frozen: bool) -> dict[str, str]:
    """The environment the supervisor gives its children (the bootloader's child, when frozen)."""
    pid = proc.pid
    if frozen:
        pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    if frozen:  # what the bootloader set for its child once Python runs (the file's exec-time env lacks the level)
        env["_PYI_PARENT_PROCESS_LEVEL"] = "1"
    return env


def child_start(target: Target, env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*target.cmd, "version"], env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def api_ready_times(log: Path) -> list[float]:
    return [float(m) for m in re.findall(r"api\[\d+\] \(pid \d+\) is ready after ([\d.]+)s", log.read_text(errors="replace"))]


def measure(target: Target, runs: int, drop: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"bench-binary-{target.name}-") as tmp:
        work = Path(tmp)
        env = {**target.env, **ports_env(free_base()), "TMPDIR": str(work)}
        subprocess.run([*target.cmd, "init", "--data-dir", str(work / "data")], env=env, capture_output=True, check=True)
        config = work / "data" / "appliance.toml"
        log = work / "run.log"
        result: dict[str, object] = {"size_mb": BINARY.stat().st_size / 1e6 if target.name == "binary" else None}
        if drop and drop_caches():
            proc, result["cold_after_drop_s"] = start(target, config, env, log)
            stop(proc)
        warm, api_ready = [], []
        for i in range(runs):
            proc, seconds = start(target, config, env, log)
            warm.append(seconds)
            api_ready += api_ready_times(log)
            if i == runs - 1:
                time.sleep(10)
                result["idle_pss_mb"] = sum(pss_kib(p) for p in descendants(proc.pid)) / 1024
                result["processes"] = len(descendants(proc.pid))
                child_env = supervisor_env(proc, target.name == "binary")
                result["child_start_s"] = child_start(target, child_env, runs)
                if target.name == "binary":  # what a child would pay without reusing the unpacked dir
                    fresh = {k: v for k, v in child_env.items() if not k.startswith("_PYI_")}
                    result["fresh_unpack_start_s"] = child_start(target, fresh, runs)
            stop(proc)
        result["ready_median_s"] = statistics.median(warm)
        result["ready_runs_s"] = [round(s, 2) for s in warm]
        result["api_ready_median_s"] = statistics.median(api_ready) if api_ready else None
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one-file binary vs source install")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before the first start")
    args = parser.parse_args(argv)
    rows = {t.name: measure(t, args.runs, not args.no_drop_caches) for t in targets()}
    keys = [
        ("size_mb", "file size (MB)"),
        ("cold_after_drop_s", "first start after a page-cache drop (s)"),
        ("ready_median_s", f"start to READY, median of {args.runs} (s)"),
        ("child_start_s", "one child process start: exec to `version` done (s)"),
        ("fresh_unpack_start_s", "the same without reusing the unpacked dir (s)"),
        ("api_ready_median_s", "api worker spawn to ready, from the log (s)"),
        ("idle_pss_mb", "idle PSS of all processes (MB)"),
        ("processes", "processes"),
    ]
    names = list(rows)
    print(f"{'':<55}" + "".join(f"{n:>12}" for n in names))
    for key, label in keys:
        cells = []
        for n in names:
            value = rows[n].get(key)
            cells.append(f"{value:>12.2f}" if isinstance(value, float) else f"{'-' if value is None else value:>12}")
        print(f"{label:<55}" + "".join(cells))
    for n in names:
        print(f"{n}: READY runs {rows[n]['ready_runs_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
