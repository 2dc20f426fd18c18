"""Route prefixes as the balancer matches them (rate-limit zones and public routes).

A prefix ending in "/" matches its subtree; any other prefix matches that exact
path or a path below it ("/auth/login" matches "/auth/login" and "/auth/login/x",
never "/auth/loginx"). `prefix_matcher` turns a list into what one
`path in exact or path.startswith(subtrees)` test needs, computed once at start.
"""

from __future__ import annotations

from collections.abc import Sequence


def prefix_matcher(prefixes: Sequence[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Precompute (exact paths, subtree prefixes) for `path in exact or path.startswith(subtrees)`."""
    exact: set[str] = set()
    subtrees: list[str] = []
    for p in prefixes:
        if p.endswith("/"):
            subtrees.append(p)
        else:
            exact.add(p)
            subtrees.append(p + "/")
    return frozenset(exact), tuple(subtrees)
