"""Identity headers: only a holder of the identity key can make one a worker accepts."""

from __future__ import annotations

import pytest

from appliance import identity

KEY = b"i" * 48
CLAIMS = {"sub": "7", "usr": "alice", "role": "admin", "jti": "j", "fam": "f", "gen": 0, "exp": 2_000_000_000}


def test_signed_identity_round_trips() -> None:
    value = identity.sign(CLAIMS, KEY, now=1000.0)
    got = identity.verify(value, KEY, now=1001.0)
    assert got["usr"] == "alice" and got["role"] == "admin" and got["sub"] == "7"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda v: v.replace("v1.", "v2.", 1),
        lambda v: v[:-2] + ("AA" if not v.endswith("AA") else "BB"),
        lambda v: "v1.eyJzdWIiOiIxIiwicm9sZSI6ImFkbWluIn0.AAAA",
        lambda v: "admin",
        lambda v: "",
        lambda v: "v1..",
    ],
)
def test_forged_identity_is_refused(mangle) -> None:
    value = identity.sign(CLAIMS, KEY, now=1000.0)
    with pytest.raises(identity.IdentityError):
        identity.verify(mangle(value), KEY, now=1000.0)


def test_other_key_and_stale_header_are_refused() -> None:
    value = identity.sign(CLAIMS, KEY, now=1000.0)
    with pytest.raises(identity.IdentityError):
        identity.verify(value, b"o" * 48, now=1000.0)
    with pytest.raises(identity.IdentityError, match="stale"):
        identity.verify(value, KEY, now=1000.0 + identity.MAX_AGE + 1)
