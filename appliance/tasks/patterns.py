"""Regular expressions written by users (bulk_import's validation_rules), run by RE2.

Python's re backtracks: `(a+)+$` against "a" * 40 + "b" takes longer than the universe.
RE2 (google-re2, a wheel with the engine built in) matches in time linear in the input and
refuses the constructs that need backtracking (backreferences, lookaround) when the pattern
is compiled, so a bad pattern is a 400 at submit, not a stuck worker. Patterns are capped at
MAX_PATTERN characters and each compiled program at MAX_MEM bytes; compiled patterns are
cached per process.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

MAX_PATTERN = 1000
MAX_MEM = 8 << 20

_options = re2.Options()
_options.log_errors = False  # RE2 would print every refused pattern on stderr
_options.max_mem = MAX_MEM


class PatternError(ValueError):
    """A pattern RE2 cannot (or will not) compile."""


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern; PatternError naming the problem."""
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"patterns are at most {MAX_PATTERN} characters")
    try:
        return re2.compile(pattern, _options)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(f"not a supported regular expression ({reason}); backreferences and lookaround are not supported") from None


def fullmatch(pattern: str, value: str) -> bool:
    """Whether the whole of `value` matches `pattern`."""
    return compile_pattern(pattern).fullmatch(value) is not None
