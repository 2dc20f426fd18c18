"""schemathesis hooks for test_api_schemathesis (loaded through SCHEMATHESIS_HOOKS).

A schema-valid request that the server refuses is a failure, except when the
operation's document names the refusal: /openapi.json lists the rules a schema
cannot state under `x-unexpressed-rules` (error code, rule) and describes them.
Only such a 400 naming that field and code is dropped; every other failure counts.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

import schemathesis


def _declares(case: Any, field: str, code: str) -> bool:
    """Whether the operation lists this refusal: its field (tasks[2].x matches tasks[].x, * any rest) and code (a|b)."""
    raw = getattr(case.operation.definition, "raw", None) or {}
    field = re.sub(r"\[\d+\]", "[]", field or "")
    for rule in raw.get("x-unexpressed-rules", []):
        pattern = str(rule.get("field", "")).replace("[]", "[[][]]")
        if fnmatch.fnmatchcase(field, pattern) and code in str(rule.get("code", "")).split("|"):
            return True
    return False


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
        field, code = (error.get("details") or {}).get("field"), error["code"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return not _declares(case, field, code)
