"""Login sessions: token pairs, refresh rotation with reuse detection, logout.

A login starts a family (TokenFamily row) whose id is the `fam` claim of every
token it issues. Only the family's `current_jti` refresh token may be used:
refreshing swaps it for a new one with a compare-and-swap UPDATE, so of two
concurrent uses of one token only one wins. Presenting any other (spent)
refresh token of the family is theft: the whole family is revoked (its access
tokens die with it, since they carry the same `fam`) and an audit event is written.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

import falcon
import msgspec

from appliance import revocation, tokens
from appliance.api import audit, instruments
from appliance.api.context import ApiContext, Identity
from appliance.api.schemas import UserOut, user_out
from appliance.db.models import TokenFamily, User, database
from appliance.errors import Unauthorized
from appliance.times import from_timestamp, utcnow


class TokenPair(msgspec.Struct, kw_only=True):
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    refresh_expires_in: int
    user: UserOut


def _pair(ctx: ApiContext, user: User, family: str, refresh_jti: str, now: float) -> TokenPair:
    access, _ = tokens.issue_access(
        ctx.tokens, user_id=user.id, username=user.username, role=user.role, generation=user.token_generation, family=family, now=now
    )
    refresh, _ = _refresh(ctx, user, family, refresh_jti, now)
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        token_type="bearer",
        expires_in=ctx.tokens.access_ttl,
        refresh_expires_in=ctx.tokens.refresh_ttl,
        user=user_out(user),
    )


def _refresh(ctx: ApiContext, user: User, family: str, jti: str, now: float) -> tuple[str, dict[str, Any]]:
    # tokens.issue_refresh makes its own jti; the family row must know it, so set it through the claims.
    claims = {"sub": str(user.id), "typ": "refresh", "gen": user.token_generation, "fam": family, "jti": jti}
    return tokens._issue(ctx.tokens, claims, ctx.tokens.refresh_ttl, now)


def start(ctx: ApiContext, user: User, req: falcon.Request, now: float | None = None) -> TokenPair:
    """A new family and its first token pair."""
    from appliance.api.operations import client_address

    now = time.time() if now is None else now
    family, jti = tokens.new_id(), tokens.new_id()
    TokenFamily.create(
        id=family,
        user=user.id,
        current_jti=jti,
        expires_at=from_timestamp(now + ctx.tokens.refresh_ttl),
        user_agent=(req.user_agent or "")[:256],
        address=client_address(req)[:64],
    )
    return _pair(ctx, user, family, jti, now)


def _revoke_family(ctx: ApiContext, fam: TokenFamily, reason: str) -> None:
    with database.atomic():
        TokenFamily.update(revoked_at=utcnow(), revoked_reason=reason).where(TokenFamily.id == fam.id).execute()
        revocation.revoke_family(fam.id, fam.user_id, fam.expires_at, reason)
    ctx.revocations_changed()


def rotate(ctx: ApiContext, token: str, req: falcon.Request, now: float | None = None) -> TokenPair:
    """Swap a refresh token for a new pair, or refuse it (401); a spent token revokes its family."""
    now = time.time() if now is None else now
    claims = tokens.verify(ctx.tokens, token, expected_type="refresh", now=now)
    if ctx.revoked(claims):
        instruments.auth_event("revoked_token")
        raise Unauthorized("refresh token has been revoked", code="token_revoked")
    fam = TokenFamily.get_or_none(TokenFamily.id == claims["fam"])
    if fam is None or str(fam.user_id) != str(claims["sub"]) or fam.revoked_at is not None:
        raise Unauthorized("refresh token has been revoked", code="token_revoked")
    new_jti = tokens.new_id()
    swapped = (
        TokenFamily.update(current_jti=new_jti, last_used_at=utcnow())
        .where((TokenFamily.id == fam.id) & (TokenFamily.current_jti == claims["jti"]))
        .execute()
    )
    if not swapped:
        _revoke_family(ctx, fam, "refresh_reuse")
        instruments.auth_event("refresh_reuse")
        audit.record("refresh_token_reuse", req, user_id=fam.user_id, family=fam.id)
        raise Unauthorized("refresh token was already used; every session of this login has been revoked", code="token_reused")
    user = User.get_or_none(User.id == fam.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("the account is not active", code="account_disabled")
    return _pair(ctx, user, fam.id, new_jti, now)


def logout(ctx: ApiContext, who: Identity, req: falcon.Request) -> None:
    """Revoke the presented access token and its whole family."""
    expires = from_timestamp(who.expires) if who.expires else utcnow() + _dt.timedelta(seconds=ctx.tokens.access_ttl)
    with database.atomic():
        revocation.revoke_token(who.jti, who.user_id, expires, "logout")
        fam = TokenFamily.get_or_none(TokenFamily.id == who.family)
        if fam is not None:
            TokenFamily.update(revoked_at=utcnow(), revoked_reason="logout").where(TokenFamily.id == fam.id).execute()
            revocation.revoke_family(fam.id, who.user_id, fam.expires_at, "logout")
    ctx.revocations_changed()
    audit.record("logout", req, user_id=who.user_id, username=who.username)


def logout_all(ctx: ApiContext, user: User, req: falcon.Request, reason: str = "logout_all", bump: bool = True) -> None:
    """Every token of the user, on every device, dies (generation bump + family rows marked)."""
    from appliance import accounts

    if bump:
        accounts.bump_generation(user, reason)
    TokenFamily.update(revoked_at=utcnow(), revoked_reason=reason).where(
        (TokenFamily.user == user.id) & (TokenFamily.revoked_at.is_null())
    ).execute()
    ctx.revocations_changed()
