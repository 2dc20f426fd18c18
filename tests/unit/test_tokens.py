"""JWT issue/verify with a pinned algorithm and time as a parameter."""

from __future__ import annotations

import jwt
import pytest

from appliance import tokens
from appliance.tokens import TokenError, TokenSettings

S = TokenSettings(secret="k" * 64, access_ttl=900, refresh_ttl=86400, leeway=10)
NOW = 1_800_000_000.0


def _access(now: float = NOW, settings: TokenSettings = S) -> tuple[str, dict]:
    return tokens.issue_access(settings, user_id=7, username="alice", role="user", generation=2, family="fam1", now=now)


def test_access_token_round_trip_has_all_claims() -> None:
    token, claims = _access()
    got = tokens.verify(S, token, now=NOW + 1)
    assert got == claims
    for key in ("exp", "iat", "nbf", "iss", "aud", "jti", "sub", "typ", "gen", "fam", "usr", "role"):
        assert key in got
    assert got["exp"] - got["iat"] == 900


def test_expiry_honours_leeway() -> None:
    token, _ = _access()
    tokens.verify(S, token, now=NOW + 900 + 9)
    with pytest.raises(TokenError) as exc:
        tokens.verify(S, token, now=NOW + 900 + 11)
    assert exc.value.code == "token_expired"


def test_not_yet_valid_is_refused() -> None:
    token, _ = _access(now=NOW + 100)
    with pytest.raises(TokenError, match="not valid yet"):
        tokens.verify(S, token, now=NOW)


def test_refresh_token_is_not_an_access_token() -> None:
    token, _ = tokens.issue_refresh(S, user_id=7, generation=0, family="f", now=NOW)
    with pytest.raises(TokenError, match="access token is required"):
        tokens.verify(S, token, now=NOW)
    assert tokens.verify(S, token, expected_type="refresh", now=NOW)["typ"] == "refresh"


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda c: jwt.encode(c, None, algorithm="none"), id="alg-none"),
        pytest.param(lambda c: jwt.encode(c, "k" * 64, algorithm="HS512"), id="other-alg"),
        pytest.param(lambda c: jwt.encode(c, "x" * 64, algorithm="HS256"), id="wrong-key"),
        pytest.param(lambda c: jwt.encode({**c, "aud": "other"}, "k" * 64, algorithm="HS256"), id="wrong-aud"),
        pytest.param(lambda c: jwt.encode({**c, "iss": "evil"}, "k" * 64, algorithm="HS256"), id="wrong-iss"),
        pytest.param(lambda c: jwt.encode({k: v for k, v in c.items() if k != "jti"}, "k" * 64, algorithm="HS256"), id="no-jti"),
        pytest.param(lambda c: "not.a.token", id="garbage"),
        pytest.param(lambda c: "", id="empty"),
    ],
)
def test_forged_tokens_are_refused(forge) -> None:
    _, claims = _access()
    with pytest.raises(TokenError) as exc:
        tokens.verify(S, forge(claims), now=NOW)
    assert exc.value.code == "invalid_token"


def test_bearer_header_parsing() -> None:
    assert tokens.bearer("Bearer abc") == "abc"
    assert tokens.bearer("bearer   abc ") == "abc"
    assert tokens.bearer("Basic abc") is None
    assert tokens.bearer("Bearer ") is None
    assert tokens.bearer(None) is None
