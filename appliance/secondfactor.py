"""Second factors: TOTP codes (RFC 6238) and one-time recovery codes. Used by every login surface.

TOTP: 30 s steps, 6 digits, now ±1 step of clock skew; the last accepted step
is recorded per user with a conditional UPDATE, so a code works once (two
requests replaying one code at the same moment: only one wins).

Recovery codes: RECOVERY_CODES random codes made when MFA is enabled (or on
request), shown once, stored as HMAC-SHA256 under a key derived from the
server's jwt_secret (a database dump alone cannot be tried offline; rotating
jwt_secret voids them, as it voids every token). Each is spent by a
conditional UPDATE (used_at IS NULL), so it works once. Codes are 10 letters
and digits from an alphabet without look-alikes, written `xxxxx-xxxxx`; case,
spaces and dashes are ignored when one is typed back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import pyotp

from appliance.db.models import RecoveryCode, User, database
from appliance.times import utcnow

RECOVERY_CODES = 10
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud and typed back without doubt
_CODE_LENGTH = 10  # 31**10 ~ 2**49.5 per code, and a wrong guess counts toward the login lockout


# --- TOTP -------------------------------------------------------------------------------


def matching_step(secret: str | None, code: str | None, at: float | None = None) -> int | None:
    """The TOTP time step (now ±1) whose code is `code`, or None."""
    if not secret or not code:
        return None
    code = code.strip().replace(" ", "")
    if not (code.isascii() and code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now = time.time() if at is None else at
    step = int(now // totp.interval)
    found = None
    for candidate in (step - 1, step, step + 1):  # check all three: constant work whichever matches
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            found = candidate
    return found


def verify_code(secret: str | None, code: str | None, at: float | None = None) -> bool:
    """True when `code` is the TOTP of `secret` for now ±1 step (no replay check: see consume_code)."""
    return matching_step(secret, code, at) is not None


def consume_code(user: User, code: str | None, at: float | None = None) -> bool:
    """True when `code` is valid now and its time step was not used before by this user."""
    step = matching_step(user.mfa_secret, code, at)
    if step is None:
        return False
    fresh = (User.mfa_last_step.is_null()) | (User.mfa_last_step < step)
    if User.update(mfa_last_step=step).where((User.id == user.id) & fresh).execute() != 1:
        return False
    user.mfa_last_step = step
    return True


# --- recovery codes -----------------------------------------------------------------------


def _key(jwt_secret: str) -> bytes:
    return hmac.new(jwt_secret.encode("utf-8"), b"appliance mfa recovery codes v1", hashlib.sha256).digest()


def _normal(code: str) -> str:
    return code.strip().lower().replace("-", "").replace(" ", "")


def _hash(key: bytes, user_id: int, code: str) -> str:
    # the user id is part of the message: one code's hash says nothing about another account's
    return hmac.new(key, f"{user_id}:{_normal(code)}".encode(), hashlib.sha256).hexdigest()


def looks_like_recovery_code(code: str | None) -> bool:
    """True when `code` has the shape of a recovery code (not a 6-digit TOTP code)."""
    if not code:
        return False
    text = _normal(code)
    return len(text) == _CODE_LENGTH and all(ch in _ALPHABET for ch in text)


def new_recovery_codes(user: User, jwt_secret: str) -> list[str]:
    """Replace the user's recovery codes by RECOVERY_CODES fresh ones; return them (shown once)."""
    key = _key(jwt_secret)
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(_ALPHABET) for _ in range(_CODE_LENGTH))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    with database.atomic():
        RecoveryCode.delete().where(RecoveryCode.user == user.id).execute()
        RecoveryCode.insert_many([{"user": user.id, "code_hash": _hash(key, user.id, c)} for c in codes]).execute()
    return codes


def consume_recovery_code(user: User, code: str | None, jwt_secret: str) -> bool:
    """True when `code` is one of the user's unused recovery codes; it is spent by this call."""
    if not looks_like_recovery_code(code):
        return False
    digest = _hash(_key(jwt_secret), user.id, code or "")
    spent = (
        RecoveryCode.update(used_at=utcnow())
        .where((RecoveryCode.user == user.id) & (RecoveryCode.code_hash == digest) & (RecoveryCode.used_at.is_null()))
        .execute()
    )
    return spent == 1


def remaining_recovery_codes(user: User) -> int:
    """How many unused recovery codes the user has."""
    return RecoveryCode.select().where((RecoveryCode.user == user.id) & (RecoveryCode.used_at.is_null())).count()


def drop_recovery_codes(user: User) -> None:
    """Delete every recovery code of the user (MFA turned off)."""
    RecoveryCode.delete().where(RecoveryCode.user == user.id).execute()


def consume_second_factor(user: User, code: str | None, jwt_secret: str, at: float | None = None) -> str | None:
    """Spend `code` as a TOTP code or a recovery code of `user`: "totp", "recovery_code", or None when neither."""
    if consume_code(user, code, at):
        return "totp"
    if consume_recovery_code(user, code, jwt_secret):
        return "recovery_code"
    return None
