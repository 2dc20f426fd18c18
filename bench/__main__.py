"""`python -m bench [NAME ...] [--options]`: run the named benchmarks (default: `stack`, the whole table).

Each benchmark is a module bench/<name>.py (or package) with `main(argv) -> int`;
the names come first, every argument from the first option on goes to each of
them. `make bench` runs `stack`: the appliance against the reference stack
(bench/stack/), then `locust`: the reference design's locust load test
(bench/locust/). `python -m bench all` runs every benchmark there is.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNOWN = ("stack", "locust", "balancer", "tasks")  # in this order when present; others after them
DEFAULT = ["stack"]


def available() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_")]
    mains = [n for n in names if hasattr(importlib.import_module(f"bench.{n}"), "main")]
    return [n for n in KNOWN if n in mains] + sorted(n for n in mains if n not in KNOWN)


def run(argv: list[str]) -> int:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, rest = argv[:first_option], argv[first_option:]
    chosen = available() if names == ["all"] else names or DEFAULT
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
