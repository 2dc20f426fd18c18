"""Process trees of a running stack: every pid under its roots, their total PSS, counts by name."""

from __future__ import annotations

import contextlib
from collections import Counter

import psutil


def tree(roots: list[int]) -> list[psutil.Process]:
    """The root processes and all their descendants that are alive now."""
    out: dict[int, psutil.Process] = {}
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                out[p.pid] = p
    return list(out.values())


def pss_mib(roots: list[int]) -> float:
    """Total proportional set size of every process under `roots`, in MiB (shared pages counted once overall)."""
    total = 0
    for p in tree(roots):
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 1048576


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU time of every live process under `roots` (children reaped meanwhile are not in it)."""
    total = 0.0
    for p in tree(roots):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def pss_by_kind(roots: list[int], names: dict[int, str] | None = None) -> str:
    """Total PSS per kind of process, largest first, e.g. "3 api 132 MiB, 1 balancer 36 MiB" (`names`: pid -> kind, when known)."""
    n: Counter[str] = Counter()
    mib: Counter[str] = Counter()
    for p in tree(roots):
        with contextlib.suppress(psutil.Error):
            kind = (names or {}).get(p.pid) or _kind(p)
            mib[kind] += p.memory_full_info().pss / 1048576
            n[kind] += 1
    return ", ".join(f"{n[k]} {k} {v:.0f} MiB" for k, v in mib.most_common())


def counts(roots: list[int], names: dict[int, str] | None = None) -> tuple[int, str]:
    """How many processes run under `roots`, and a short breakdown by kind (`names`: pid -> kind, when known)."""
    kinds: Counter[str] = Counter()
    procs = tree(roots)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            kinds[(names or {}).get(p.pid) or _kind(p)] += 1
    return len(procs), ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def _kind(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    for needle, kind in (("nginx", "nginx"), ("gunicorn", "gunicorn"), (" beat", "celery beat"), ("celery", "celery")):
        if needle in cmd:
            return kind
    if "_child" in cmd:
        parts = cmd.split()
        return parts[parts.index("_child") + 1] if parts.index("_child") + 1 < len(parts) else "child"
    if "appliance" in cmd and " run" in cmd:
        return "supervisor"
    return p.name()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (empty when it is gone)."""
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []
