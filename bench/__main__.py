"""`python -m bench [NAME ...]`: run the named benchmarks (default: every bench module that exists).

Each benchmark is a module bench/<name>.py with `main(argv) -> int`; arguments
after the names go to each of them. `make bench` runs them all.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNOWN = ("balancer", "tasks")  # in this order when present; others after them


def available() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_")]
    mains = [n for n in names if hasattr(importlib.import_module(f"bench.{n}"), "main")]
    return [n for n in KNOWN if n in mains] + sorted(n for n in mains if n not in KNOWN)


def run(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    rest = [a for a in argv if a.startswith("-")]
    chosen = names or available()
    status = 0
    for name in chosen:
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"bench/{name}.py", *rest]
        takes_argv = bool(inspect.signature(module.main).parameters)
        status = max(status, int((module.main(rest) if takes_argv else module.main()) or 0))
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(run(sys.argv[1:]))
