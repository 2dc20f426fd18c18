"""`python -m bench stack [--quick] [--rounds 3] [--seconds 10] [--tasks 2000] [--no-sqlite]`: the whole table.

Starts the appliance (PostgreSQL + Redis) and the reference stack side by side,
runs every scenario against both in alternating order round by round (so a
slow spell of this shared machine hits both), then the appliance on SQLite for
the extra rows, and writes bench/results/latest.md (also printed). Values are
medians over rounds; a ratio is the median of the per-round ratios
appliance/reference (above 1 is better for rates, below 1 for latencies and memory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stack import report, scenarios
from bench.stack.ours import ApplianceStack
from bench.stack.reference import NGINX, ReferenceStack

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Table:
    """Rounds of one measurement per stack, and the rows they become."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, scenario: str, ours: str, theirs: str, ratio: str) -> None:
        self.rows.append((scenario, ours, theirs, ratio))
        print(f"  {scenario:<52} {ours:>28} {theirs:>28} {ratio:>8}", flush=True)


def alternate(stacks: list[Any], rounds: int, measure: Any) -> dict[str, list[Any]]:
    """measure(stack) per stack per round, the order reversed every other round."""
    out: dict[str, list[Any]] = {s.name: [] for s in stacks}
    for r in range(rounds):
        for stack in stacks if r % 2 == 0 else list(reversed(stacks)):
            out[stack.name].append(measure(stack))
    return out


def rate_row(table: Table, label: str, res: dict[str, list[dict]], ours: str, theirs: str, key: str = "rps", unit: str = "req/s") -> None:
    a, b = res[ours], res[theirs]
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]]
    p99 = [x["p99"] / y["p99"] for x, y in zip(a, b, strict=False) if y["p99"]]

    def cell(rs: list[dict]) -> str:
        errors = sum(int(r.get("errors", 0)) for r in rs)
        text = (
            f"{_med([r[key] for r in rs]):,.0f} {unit}, p50 {_med([r['p50'] for r in rs]):.1f} / p99 {_med([r['p99'] for r in rs]):.1f} ms"
        )
        if "cpu_ms" in rs[0]:
            text += f", {_med([r['cpu_ms'] for r in rs]):.2f} ms CPU each"
        return text + (f", {errors} errors" if errors else "")

    table.add(label, cell(a), cell(b), f"{_med(ratios):.2f}x (p99 {_med(p99):.2f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench stack", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs while developing: 3 s, 1 round, 64 connections, 300 tasks")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--no-sqlite", action="store_true", help="skip the appliance-on-SQLite rows")
    ap.add_argument("--out", default=str(RESULTS / "latest.md"), help="where the Markdown goes ('-' for stdout only)")
    ap.add_argument("--only", default="", help="comma list of scenarios: get (or just ping / protected), login, tasks, kill (default all)")
    args = ap.parse_args(argv)
    conns = [64, 256]
    if args.quick:
        args.rounds, args.seconds, args.tasks, conns = 1, 3, 300, [64]
    only = set(filter(None, args.only.split(","))) or {"get", "login", "tasks", "kill"}
    if not shutil.which("wrk") or not Path(NGINX).exists():
        print("bench stack: needs wrk and nginx (make bench installs them from Debian)", file=sys.stderr)
        return 2
    started, t0, load_at_start = dt.datetime.now(dt.UTC), time.monotonic(), report.load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    table = Table()
    notes: list[str] = []
    ours = theirs = None
    try:
        print(f"bench stack: starting both stacks in {tmp}", flush=True)
        theirs = ReferenceStack(tmp).start()
        ours = ApplianceStack(tmp, "postgresql").start()
        stacks = [ours, theirs]
        time.sleep(2 if args.quick else 5)
        idle = {s.name: scenarios.footprint(s) for s in stacks}
        tokens = {s.name: scenarios.login_token(s) for s in stacks}
        ref = _measure(table, stacks, tokens, args, conns, only)
        after = {s.name: scenarios.footprint(s) for s in stacks}
        a, b = ours.name, theirs.name
        table.add("total PSS idle", f"{idle[a]['pss']:.0f} MiB", f"{idle[b]['pss']:.0f} MiB", report.ratio(idle[a]["pss"], idle[b]["pss"]))
        table.add(
            "total PSS after the load",
            f"{after[a]['pss']:.0f} MiB",
            f"{after[b]['pss']:.0f} MiB",
            report.ratio(after[a]["pss"], after[b]["pss"]),
        )
        table.add("processes", f"{idle[a]['processes']} ({idle[a]['kinds']})", f"{idle[b]['processes']} ({idle[b]['kinds']})", "–")
        notes.append(f"PSS after the load by kind: appliance {after[a]['by_kind']}; reference {after[b]['by_kind']}.")
        if "kill" in only:
            _failures(table, stacks, tokens, args)
        ours.stop()
        ours = None
        if not args.no_sqlite:
            _sqlite(table, tmp, theirs.name, ref, tokens, args, only)
    finally:
        for stack in (ours, theirs):
            if stack is not None:
                stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    notes += NOTES
    doc = report.render(table.rows, notes, started, time.monotonic() - t0, " ".join(argv or []), load_at_start)
    print()
    print(doc)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(doc)
        print(f"written to {args.out}")
    return 0


def _measure(table: Table, stacks: list[Any], tokens: dict[str, str], args: Any, conns: list[int], only: set[str]) -> dict[str, Any]:
    a, b = stacks[0].name, stacks[1].name
    kept: dict[str, Any] = {}
    for path, auth in _get_paths(only):
        for c in conns:
            res = alternate(
                stacks,
                args.rounds,
                lambda s, p=path, c=c, t=auth: scenarios.get_load(s, p, c, args.seconds, tokens[s.name] if t else None),
            )
            kept[f"{path} {c}"] = res[b]
            rate_row(table, f"GET {path}, {c} connections", res, a, b)
    if "login" in only:
        res = alternate(stacks, args.rounds, lambda s: scenarios.login_load(s, 16, max(args.seconds, 6)))  # bcrypt: a few per second
        rate_row(table, "POST /auth/login (bcrypt 12), 16 connections", res, a, b, unit="logins/s")
    if "tasks" in only:
        res = alternate(stacks, args.rounds, lambda s: scenarios.tasks_run(s, tokens[s.name], args.tasks))
        kept["tasks"] = res[b]
        _task_rows(table, res, a, b, args.tasks)
    return kept


def _get_paths(only: set[str]) -> list[tuple[str, bool]]:
    """The GET scenarios chosen: (path, needs a token); "get" means both, "ping" or "protected" one."""
    return [(p, auth) for key, p, auth in (("ping", "/health/ping", False), ("protected", "/api/protected", True)) if {"get", key} & only]


def _task_rows(table: Table, res: dict[str, list[dict]], a: str, b: str, n: int) -> None:
    def cell(rs: list[dict]) -> str:
        short = sum(n - r["done"] for r in rs)
        text = f"{_med([r['tasks_per_s'] for r in rs]):,.0f} tasks/s, {_med([r['cpu_ms'] for r in rs]):.1f} ms CPU each"
        text += f", {short} not done" if short else ""
        if rs and rs[0].get("history") is not None:
            text += f", {sum(r['history'] for r in rs):,} of {3 * n * len(rs):,} history rows durable"
        return text

    ratios = [x["tasks_per_s"] / y["tasks_per_s"] for x, y in zip(res[a], res[b], strict=False) if y["tasks_per_s"]]
    table.add(f"{n} sample tasks over HTTP, end to end", cell(res[a]), cell(res[b]), f"{_med(ratios):.2f}x")
    # a stack that keeps up finishes about as fast as the client submits: its tasks/s is then the
    # client's pace (16 threads of one Python process beside it), a floor of what the stack can do
    x, y = _med([r["submits_per_s"] for r in res[a]]), _med([r["submits_per_s"] for r in res[b]])
    table.add("  submitted (accepted over HTTP)", f"{x:,.0f} tasks/s", f"{y:,.0f} tasks/s", f"{x / y:.2f}x" if y else "–")
    for key in ("p50", "p99"):
        x, y = _med([r[key] for r in res[a]]), _med([r[key] for r in res[b]])
        table.add(f"  submit-to-done {key}", f"{x:,.0f} ms", f"{y:,.0f} ms", report.ratio(x, y))


def _failures(table: Table, stacks: list[Any], tokens: dict[str, str], args: Any) -> None:
    a, b = stacks[0].name, stacks[1].name
    slices = 6 if args.quick else 10
    res = {s.name: scenarios.kill_api_worker(s, "/api/protected", 64, slices, 2, tokens[s.name]) for s in stacks}

    def rec(r: dict) -> str:
        up = f"{r['replaced_s']:.1f} s" if r["replaced_s"] is not None else "not seen"
        back = f"{r['recovery_s']:.1f} s" if r["recovery_s"] is not None else f"not within {slices - 2} s"
        return f"replacement up after {up}; rate ≥ 90 % of before after {back}"

    table.add("kill -9 one API worker, GET /api/protected 64 conns: client errors", str(res[a]["errors"]), str(res[b]["errors"]), "–")
    table.add("  time to recover", rec(res[a]), rec(res[b]), "–")
    time.sleep(3)  # let the restarted workers settle
    n = max(200, args.tasks // 2)
    res = {s.name: scenarios.tasks_run(s, tokens[s.name], n, kill_after=1.0, settle=60 if args.quick else 90) for s in stacks}
    table.add(
        f"kill -9 one task worker during {n} tasks: lost / stuck",
        f"{res[a]['lost']} / {res[a]['stuck']}",
        f"{res[b]['lost']} / {res[b]['stuck']}",
        "–",
    )


def _sqlite(table: Table, tmp: Path, ref_name: str, ref: dict[str, Any], tokens: dict[str, str], args: Any, only: set[str]) -> None:
    lite = ApplianceStack(tmp, "sqlite").start()
    try:
        time.sleep(2)
        token = scenarios.login_token(lite)
        for path, auth in _get_paths(only):
            runs = [scenarios.get_load(lite, path, 64, args.seconds, token if auth else None)]
            rate_row(table, f"GET {path}, 64 connections — appliance on SQLite", {"l": runs, "r": ref[f"{path} 64"]}, "l", "r")
        if "tasks" in only:
            runs = [scenarios.tasks_run(lite, token, args.tasks)]
            _task_rows(table, {"l": runs, "r": ref["tasks"]}, "l", "r", args.tasks)
            table.rows[-4] = (table.rows[-4][0] + " — appliance on SQLite", *table.rows[-4][1:])  # the task row, above submitted, p50, p99
        fp = scenarios.footprint(lite)
        table.add("total PSS after the load — appliance on SQLite", f"{fp['pss']:.0f} MiB", "", "–")
    finally:
        lite.stop()


NOTES = [
    "ratio = appliance / reference, the median of the per-round ratios: above 1 is better for rates, below 1 for latencies and memory.",
    "Both stacks run at once on loopback against the same PostgreSQL and Redis; each scenario alternates which goes first per round. "
    "SQLite rows compare the appliance on SQLite (queue too) with the reference on PostgreSQL from the same run.",
    "Reference: nginx (1 worker, least_conn, keepalive 64, limit_req on /auth/ and /api/, auth_request to /auth/validate) -> "
    "3 gunicorn gthread workers (8 threads) of bench/stack/refapp.py (JWT decode + Redis blocklist in every protected view, "
    "psycopg2 user lookup, bcrypt 12 login) -> Celery prefork worker (2 processes) + beat on Redis, results kept in Redis.",
    "Appliance: `appliance run` with 3 api workers (8 threads), 2 task workers (concurrency 4), the monitor (with the scheduler in its process); rate-limit zones that "
    "never reject; every task is a durable row with its history in the database; reference tasks keep only a Redis result.",
    "CPU each = user + system time of every process of the stack during the run / requests (or tasks) done: "
    "what one costs the machine, steadier than rates on a shared machine (the load generator is not counted).",
    "Tasks: 16 client threads of the benchmark's own process submit; submitted = tasks accepted / the time to submit them all: "
    "a stack whose tasks/s is about its submitted rate (and whose submit-to-done stays short) kept up with the client, so its "
    "tasks/s is the client's pace, a floor of what the stack can do. "
    "Submit-to-done = the task's recorded finish time - the client's submit time; kill -9 victims: one gunicorn worker "
    "(its master starts another) / one appliance api worker; one Celery prefork child / one appliance task worker; "
    "tasks are submitted with max_retries 3 on both. PSS counts every process of a stack (PostgreSQL and Redis are shared, not counted).",
]
