"""appliance/lean_import.py: libraries imported without optional dependencies we never use."""

from __future__ import annotations

import subprocess
import sys


def _probe(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_pyjwt_loads_without_cryptography_which_stays_importable():
    # tokens accept only HMAC algorithms, so pyjwt's RSA/EC code (and cryptography's native library) is not loaded
    _probe(
        "import sys\n"
        "from appliance import tokens\n"
        "assert 'cryptography.hazmat.bindings._rust' not in sys.modules, 'cryptography was loaded'\n"
        "assert tokens.jwt.algorithms.has_crypto is False\n"
        "s = tokens.TokenSettings(secret='x' * 64, algorithm='HS512')\n"
        "token, claims = tokens.issue_access(s, user_id=1, username='a', role='user', generation=1, family='f', now=2e9)\n"
        "assert tokens.verify(s, token, now=2e9 + 1) == claims\n"
        "import jwt\n"
        "assert jwt is tokens.jwt\n"
        "from cryptography import x509\n"  # where it is needed, it still imports
        "print('ok')\n"
    )


def test_every_role_preloaded_loads_neither_cryptography_nor_gevent():
    # what the template imports for every child; gevent is installed here (locust, a bench extra) and would load
    _probe(
        "import importlib.util, sys\n"
        "from appliance import template\n"
        "template.preload()\n"
        "assert 'cryptography.hazmat.bindings._rust' not in sys.modules\n"
        "assert importlib.util.find_spec('gevent') is None or 'gevent' not in sys.modules, 'gevent was loaded'\n"
        "import huey.consumer\n"
        "assert huey.consumer.Greenlet is None  # huey took gevent for absent: no greenlet workers\n"
        "print('ok')\n"
    )


def test_what_was_hidden_imports_normally_afterwards_and_a_loaded_module_is_returned_as_is():
    _probe(
        "import sys\n"
        "from appliance.lean_import import import_without\n"
        "import json\n"
        "assert import_without('json', 'decimal') is json\n"  # already loaded: nothing hidden, nothing reloaded
        "mod = import_without('http.cookies', 're')\n"  # re is loaded already: not hidden either
        "assert mod.SimpleCookie\n"
        "assert 'argparse' not in sys.modules\n"
        "try:\n"
        "    import_without('argparse', 'gettext')\n"  # argparse tolerates no missing gettext: the import fails...
        "except ImportError:\n"
        "    pass\n"
        "assert sys.modules.get('gettext', 0) is not None\n"  # ...and gettext is not left hidden
        "import gettext\n"
        "print('ok')\n"
    )
