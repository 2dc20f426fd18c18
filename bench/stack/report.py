"""The one Markdown table of `python -m bench stack`: scenario, appliance, reference, ratio; with date, machine, versions."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {model}, {mem:.0f} GiB RAM, Linux {platform.release()}"


def versions() -> str:
    def pkg(name: str) -> str:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} (not installed)"

    def tool(cmd: list[str], name: str) -> str:
        if not shutil.which(cmd[0]):
            return f"{name} (missing)"
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else name

    from appliance import __version__

    parts = [f"appliance {__version__}", f"Python {platform.python_version()}"]
    parts += [
        pkg(n)
        for n in ("falcon", "waitress", "peewee", "huey", "uvloop", "flask", "gunicorn", "celery", "psycopg2-binary", "PyJWT", "bcrypt")
    ]
    parts += [tool(["nginx", "-v"], "nginx"), tool(["wrk", "-v"], "wrk")]
    parts += [tool(["psql", "--version"], "psql"), tool(["redis-server", "--version"], "redis")]
    return ", ".join(parts)


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0 or ours != ours or theirs != theirs:
        return "–"
    return f"{ours / theirs:.2f}x"


def render(
    rows: list[tuple[str, str, str, str]], notes: list[str], started: dt.datetime, took: float, args: str, load_at_start: str
) -> str:
    """The Markdown document: a header, the table, notes."""
    out = [
        "# Appliance vs the reference stack",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {took / 60:.1f} min (`python -m bench stack {args}`)".rstrip(),
        f"- machine: {machine()}; load average (1, 5, 15 min) at start {load_at_start}, at the end {load()} "
        "(other work on the machine shows here: both stacks share it alike, round by round)",
        f"- versions: {versions()}",
        "",
        "| scenario | appliance | reference | ratio |",
        "|---|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)
