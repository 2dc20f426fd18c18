"""schemathesis hooks for test_api_schemathesis (loaded through SCHEMATHESIS_HOOKS).

A schema-valid request that the server refuses is a failure, except when the
operation's document names the refusal: /openapi.json lists the rules a schema
cannot state under `x-unexpressed-rules` (error code, rule) and describes them.
Only such a 400 naming that field and code is dropped; every other failure counts.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


def _declared(case: Any) -> set[tuple[str, str]]:
    raw = getattr(case.operation.definition, "raw", None) or {}
    return {(rule.get("field"), rule.get("code")) for rule in raw.get("x-unexpressed-rules", []) if isinstance(rule, dict)}


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = json.loads(response.content)["error"]
        said = ((error.get("details") or {}).get("field"), error["code"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return said not in _declared(case)
