"""The supervisor's own commands: `appliance status` and `appliance systemd-unit`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


def register(sub: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("status", help="show every process of the running appliance (exit 1 unhealthy, 3 not running)")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("systemd-unit", help="print a hardened systemd unit for this appliance")
    add_config(p)
    p.add_argument("--user", default="appliance", help="the dedicated user it runs as (default appliance)")
    p.add_argument("--exec", dest="executable", metavar="PATH", help="the appliance executable (default: this one)")
    p.set_defaults(func=cmd_systemd_unit)

    from appliance import template

    template.register(sub)


def _config(args: argparse.Namespace) -> Any:
    from appliance.config import ConfigError, load_config

    try:
        return load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from appliance.supervisor.unit import render

    cfg = _config(args)
    sys.stdout.write(render(cfg, user=args.user, executable=args.executable, config=Path(cfg.source)))
    return EXIT_OK


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def role_label(row: dict[str, Any]) -> str:
    """The role of a process row and the other roles' loops it runs: "monitor + scheduler"."""
    return " + ".join([row["role"], *(row.get("jobs") or ())])


def render_status(doc: dict[str, Any]) -> str:
    out = [f"appliance {doc.get('phase')} on {doc.get('url')} (supervisor pid {doc.get('pid')}, config {doc.get('config')})"]
    me = doc.get("supervisor") or {}
    rows = [{"role": "supervisor", "index": 0, "slot": 0, "pid": doc.get("pid"), "state": doc.get("phase"), "restarts": 0, **me}]
    if doc.get("started"):
        rows[0]["uptime"] = doc.get("now", 0) - doc["started"] if doc.get("now") else None
    rows += sorted(doc.get("processes", []), key=lambda r: (r["role"], r["slot"], r["index"]))
    width = max(10, *(len(role_label(r)) for r in rows))
    out.append(
        f"{'role':<{width}} {'index':>5} {'pid':>7} {'state':<9} {'restarts':>8} {'uptime':>8} {'cpu%':>6} {'memory':>8} {'pss':>8}  address"
    )
    for r in rows:
        cpu = "-" if r.get("cpu") is None else f"{r['cpu']:.1f}"
        out.append(
            f"{role_label(r):<{width}} {r['index']:>5} {r.get('pid') or '-':>7} {r['state']:<9} {r['restarts']:>8} "
            f"{_duration(r.get('uptime')):>8} {cpu:>6} {_size(r.get('rss')):>8} {_size(r.get('pss')):>8}  {r.get('address') or ''}"
        )
    total = [r["pss"] for r in rows if r.get("pss")]
    if total:  # rss counts the pages children share with the template in each of them; pss divides them
        out.append(f"memory: {_size(sum(total))} PSS in {len(total)} processes")
    ups = doc.get("upstreams")
    if ups:
        out.append("upstreams (as the balancer sees them):")
        for group, members in ups.items():
            for m in members:
                out.append(
                    f"  {group:<8} {m.get('address', '?'):<22} {m.get('state', '?'):<10} in flight {m.get('active', 0)}, "
                    f"requests {m.get('requests', 0)}, failures {m.get('failures', 0)}"
                )
    elif ups is None:
        out.append("upstreams: the balancer has not reported yet")
    queue = doc.get("queue")
    if isinstance(queue, dict) and "error" not in queue:
        out.append("queue: " + ", ".join(f"{k} {v}" for k, v in queue.items()))
    elif isinstance(queue, dict):
        out.append(f"queue: unknown ({queue['error']})")
    out.append("healthy" if doc.get("healthy") else "UNHEALTHY: some processes are not up")
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.supervisor.control import NotRunning, query, socket_path
    from appliance.supervisor.main import run_dir

    cfg = _config(args)
    path = socket_path(run_dir(cfg))
    try:
        doc = query(path)
    except NotRunning as exc:
        print(f"appliance: not running on {cfg.data_dir}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except OSError as exc:
        print(f"appliance: cannot ask the appliance on {path}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print(json.dumps(doc, indent=2, default=str) if args.json else render_status(doc))
    return EXIT_OK if doc.get("healthy") else EXIT_UNHEALTHY
