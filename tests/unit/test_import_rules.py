"""Dependencies point one way: the import rules of DESIGN.md, checked on the source with ast.

Every import counts, also one inside a function (a lazy import still runs in the
process that calls it). Names loaded with importlib from strings (the role table,
appliance/supervisor/roles.py) are not seen. Every rule here holds; a rule the code does not
meet yet goes in as xfail(strict=True), which fails the run the day it starts to hold, so the
mark comes off with the work that made it true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "appliance"
ROLE_PACKAGES = ("appliance.balancer", "appliance.api", "appliance.queue", "appliance.monitor")
# appliance.revocation writes through peewee; the balancer reads with appliance.revocation_mirror.
BALANCER_FORBIDDEN = (
    "falcon",
    "peewee",
    "playhouse",
    "appliance.api",
    "appliance.queue",
    "appliance.monitor",
    "appliance.db",
    "appliance.revocation",
)
# Only the supervisor and the command line know every role.
CORE_EXEMPT = ("appliance.cli", "appliance.__main__")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module `module` imports (absolute names; `from a import b` gives a and, if b is a module, a.b)."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules())
    return frozenset(found)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def reached(starts: list[str]) -> set[str]:
    """The appliance modules that importing `starts` can load (packages' __init__ included)."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        for name in _with_parents(todo.pop()):
            if name in modules() and name not in seen:
                seen.add(name)
                todo.extend(imports_of(name))
    return seen


def in_package(prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules() if m.startswith(prefixes))


def violations(sources: list[str], forbidden: tuple[str, ...]) -> list[str]:
    def hit(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in forbidden)

    return sorted(f"{m} imports {t}" for m in sources for t in imports_of(m) if hit(t))


def test_the_module_walk_sees_lazy_and_relative_imports() -> None:
    assert "appliance.balancer.authhook" in imports_of("appliance.balancer.server")  # imported inside a method
    assert {"appliance.balancer.framing", "appliance.balancer.picker"} <= imports_of("appliance.balancer.pool")
    assert violations(["appliance.balancer.server"], ("appliance.balancer.authhook",))


def test_the_balancer_imports_no_falcon_peewee_db_or_other_role() -> None:
    assert violations(in_package(("appliance.balancer",)), BALANCER_FORBIDDEN) == []


def test_the_balancer_modules_load_without_peewee_or_falcon() -> None:
    names = in_package(("appliance.balancer",)) + ["appliance.heartbeat", "appliance.heartbeat_row", "appliance.child_config"]
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n" + (
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('peewee', 'playhouse', 'falcon')"
        " or n.startswith(('appliance.db', 'appliance.api', 'appliance.queue', 'appliance.monitor'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_nothing_the_balancer_reaches_through_the_core_imports_peewee_or_falcon() -> None:
    reach = sorted(reached(in_package(("appliance.balancer",))))
    assert violations(reach, BALANCER_FORBIDDEN) == []


def test_the_queue_imports_neither_the_api_nor_the_balancer() -> None:
    assert violations(sorted(reached(in_package(("appliance.queue",)))), ("appliance.api", "appliance.balancer")) == []


def test_the_api_imports_no_balancer() -> None:
    assert violations(sorted(reached(in_package(("appliance.api",)))), ("appliance.balancer",)) == []


def test_the_api_reaches_no_queue_role() -> None:
    """The API uses the task domain (appliance.tasks), never the worker's or the scheduler's code."""
    assert violations(sorted(reached(in_package(("appliance.api",)))), ("appliance.queue",)) == []


def test_the_core_imports_no_role_package() -> None:
    core = [m for m in modules() if m.count(".") == 1 and not m.startswith(ROLE_PACKAGES + ("appliance.supervisor", *CORE_EXEMPT))]
    core += in_package(("appliance.db", "appliance.tasks"))  # the task domain is core: the API and the roles share it
    assert violations(sorted(reached(core)), ROLE_PACKAGES) == []
