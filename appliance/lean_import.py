"""Import a library with optional dependencies it would load for features we never use hidden.

pyjwt imports cryptography for its RSA, EC and EdDSA algorithms (tokens here are HMAC only:
[auth] jwt_algorithm), and huey's consumer imports gevent, when installed, for greenlet
workers ([queue] worker_type is thread or process). Each import maps and touches megabytes
of native code and modules in whichever process imports the library first: the template,
and so every child's parent. Hidden (None in sys.modules makes `import x` raise
ModuleNotFoundError, which both libraries treat as "not installed"), they load only where
something really uses them, e.g. cryptography for the balancer's self-signed certificate.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def import_without(name: str, *hidden: str) -> Any:
    """Import module `name` with each of `hidden` looking absent, unless something loaded it already."""
    if name in sys.modules:
        return sys.modules[name]
    masked = [h for h in hidden if h not in sys.modules]
    for h in masked:
        sys.modules[h] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    finally:
        for h in masked:
            if h in sys.modules and sys.modules[h] is None:
                del sys.modules[h]
