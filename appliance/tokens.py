"""JWT access and refresh tokens, usable without Falcon or peewee (the balancer imports this).

The algorithm is pinned by config: a token is accepted only with exactly that
algorithm, so "none" and algorithm confusion are refused. Time is a parameter
(`now`), so expiry is tested without sleeping; pyjwt checks signature, iss and
aud, and we check exp/nbf/iat against `now` with a small leeway.

Claims: sub (user id), typ (access|refresh), jti, fam (refresh family),
gen (the user's token generation when issued), iat, nbf, exp, iss, aud; access
tokens add usr (user name) and role.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from appliance.errors import Unauthorized
from appliance.lean_import import import_without

# HMAC only ([auth] jwt_algorithm): pyjwt's RSA/EC/EdDSA code and cryptography stay unloaded (appliance/lean_import.py).
jwt = import_without("jwt", "cryptography")

_REQUIRED = ["exp", "iat", "nbf", "iss", "aud", "jti", "sub", "typ"]


class TokenError(Unauthorized):
    """A token was refused (401); `code` is the snake_case error code for the envelope."""

    def __init__(self, code: str, message: str):
        challenge = f'Bearer realm="appliance", error="invalid_token", error_description="{message}"'
        super().__init__(message, code=code, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True)
class TokenSettings:
    secret: str
    algorithm: str = "HS256"
    issuer: str = "appliance"
    audience: str = "appliance-api"
    access_ttl: int = 900
    refresh_ttl: int = 30 * 86400
    leeway: int = 10

    @classmethod
    def from_config(cls, cfg: Any) -> TokenSettings:
        a = cfg.auth
        return cls(
            secret=cfg.secrets.jwt_secret,
            algorithm=a.jwt_algorithm,
            issuer=a.issuer,
            audience=a.audience,
            access_ttl=a.access_token_minutes * 60,
            refresh_ttl=a.refresh_token_days * 86400,
            leeway=a.leeway_seconds,
        )


def new_id() -> str:
    return uuid.uuid4().hex


def _issue(settings: TokenSettings, claims: dict[str, Any], ttl: int, now: float | None) -> tuple[str, dict[str, Any]]:
    now_i = int(time.time() if now is None else now)
    full = {
        **claims,
        "iat": now_i,
        "nbf": now_i,
        "exp": now_i + ttl,
        "iss": settings.issuer,
        "aud": settings.audience,
        "jti": claims.get("jti") or new_id(),
    }
    return jwt.encode(full, settings.secret, algorithm=settings.algorithm), full


def issue_access(
    settings: TokenSettings, *, user_id: int, username: str, role: str, generation: int, family: str, now: float | None = None
) -> tuple[str, dict[str, Any]]:
    """A signed access token and its claims."""
    claims = {"sub": str(user_id), "usr": username, "role": role, "typ": "access", "gen": generation, "fam": family}
    return _issue(settings, claims, settings.access_ttl, now)


def issue_refresh(
    settings: TokenSettings, *, user_id: int, generation: int, family: str, now: float | None = None
) -> tuple[str, dict[str, Any]]:
    """A signed refresh token (one member of `family`) and its claims."""
    claims = {"sub": str(user_id), "typ": "refresh", "gen": generation, "fam": family}
    return _issue(settings, claims, settings.refresh_ttl, now)


def verify(settings: TokenSettings, token: str, *, expected_type: str = "access", now: float | None = None) -> dict[str, Any]:
    """Return the claims of a valid token or raise TokenError (code: invalid_token / token_expired)."""
    if not token or len(token) > 8192:
        raise TokenError("invalid_token", "token is missing or too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("invalid_token", "token is malformed") from None
    if header.get("alg") != settings.algorithm:
        raise TokenError("invalid_token", "token algorithm is not accepted")
    try:
        claims = jwt.decode(
            token,
            settings.secret,
            algorithms=[settings.algorithm],
            audience=settings.audience,
            issuer=settings.issuer,
            options={"require": _REQUIRED, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidAudienceError:
        raise TokenError("invalid_token", "token audience is wrong") from None
    except jwt.InvalidIssuerError:
        raise TokenError("invalid_token", "token issuer is wrong") from None
    except jwt.InvalidSignatureError:
        raise TokenError("invalid_token", "token signature is invalid") from None
    except jwt.PyJWTError:
        raise TokenError("invalid_token", "token is invalid") from None
    t = time.time() if now is None else now
    try:
        exp, nbf, iat = float(claims["exp"]), float(claims["nbf"]), float(claims["iat"])
    except (TypeError, ValueError):
        raise TokenError("invalid_token", "token times are malformed") from None
    if t > exp + settings.leeway:
        raise TokenError("token_expired", "token has expired")
    if t + settings.leeway < nbf or t + settings.leeway < iat:
        raise TokenError("invalid_token", "token is not valid yet")
    if claims.get("typ") != expected_type:
        raise TokenError("invalid_token", f"an {expected_type} token is required")
    if not isinstance(claims.get("gen"), int) or not isinstance(claims.get("fam"), str):
        raise TokenError("invalid_token", "token claims are malformed")
    return claims


def bearer(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
