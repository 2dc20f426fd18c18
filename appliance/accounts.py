"""User accounts: creation, passwords, roles, disabling. Used by the CLI and the API.

Errors are AccountError (an AppError) with a snake_case code, the field at
fault and the HTTP status they deserve, so the API renders them like any other.

User names are unique ignoring case (`Admin` cannot be registered beside
`admin`; a unique index on lower(username) holds it under races) and are
looked up ignoring case (`find_user`), so whatever case a user types at login
names the one account. Every privilege change (role, enabled/disabled) bumps
the user's token generation inside the same call, so no caller (API route, CLI,
an operator's script) can change a privilege and leave old tokens alive.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import peewee as pw

from appliance import passwords, revocation
from appliance.db.errors import ConstraintConflict, translated
from appliance.db.models import User, database
from appliance.errors import AppError
from appliance.times import utcnow

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,64}$")
# The local part refuses '@', controls and every space, spelled out: the pattern is published in
# /openapi.json, and `\s` means another set in JSON Schema's ECMA-262 regexes than in Python's.
_NOT_LOCAL = r"@\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
EMAIL_RE = re.compile(rf"^[^{_NOT_LOCAL}]{{1,64}}@[A-Za-z0-9.-]{{1,253}}\.[A-Za-z]{{2,63}}$")
ROLES = ("admin", "user")


class AccountError(AppError):
    """An account operation refused: code, message, the field at fault (also in details) and the status."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400):
        super().__init__(message, code=code, status=status, details={"field": field} if field else None)
        self.field = field


def validate_username(username: str) -> str:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise AccountError("invalid_username", "username must be 3-64 letters, digits, '.', '_' or '-'", "username")
    return username


def validate_email(email: str) -> str:
    if not isinstance(email, str) or len(email) > 254 or not EMAIL_RE.match(email):
        raise AccountError("invalid_email", "email address is not valid", "email")
    return email.lower()


def validate_password(password: str, min_length: int, username: str = "", field: str = "password") -> None:
    try:
        passwords.check_policy(password, min_length, username)
    except passwords.PasswordPolicyError as exc:
        raise AccountError("weak_password", str(exc), field) from None


def create_user(
    username: str, email: str | None, password: str, *, role: str = "user", rounds: int = 12, min_length: int = 10, full_name: str = ""
) -> User:
    validate_username(username)
    email = validate_email(email) if email else f"{username.lower()}@localhost.localdomain"
    if role not in ROLES:
        raise AccountError("invalid_role", f"role must be one of {', '.join(ROLES)}", "role")
    validate_password(password, min_length, username)
    hashed = passwords.hash_password(password, rounds)
    if User.select().where(pw.fn.LOWER(User.username) == username.lower()).exists():
        raise AccountError("username_taken", "username is already taken", "username", 409)
    if User.select().where(User.email == email).exists():
        raise AccountError("email_taken", "email is already registered", "email", 409)
    try:
        with translated(), database.atomic():
            return User.create(username=username, email=email, password_hash=hashed, role=role, full_name=full_name)
    except ConstraintConflict:
        raise AccountError("username_taken", "username or email is already taken", "username", 409) from None


def find_user(name: str) -> User | None:
    """The user with this name (ignoring case), or with this email address when `name` holds an @."""
    if "@" in name:
        return User.get_or_none(User.email == name.lower())
    return User.get_or_none(pw.fn.LOWER(User.username) == name.lower())


def get_user(username: str) -> User:
    """The user named `username` (ignoring case), or AccountError user_not_found (404)."""
    user = find_user(username) if "@" not in username else None
    if user is None:
        raise AccountError("user_not_found", f"no user named {username!r}", "username", 404)
    return user


def _far_future() -> _dt.datetime:
    return utcnow() + _dt.timedelta(days=400)


def bump_generation(user: User, reason: str) -> int:
    """Invalidate every token issued to `user` so far (logout-all, password change)."""
    with database.atomic():
        User.update(token_generation=User.token_generation + 1, updated_at=utcnow()).where(User.id == user.id).execute()
        gen = User.select(User.token_generation).where(User.id == user.id).scalar()
        revocation.revoke_generation(user.id, gen, _far_future(), reason)
    user.token_generation = gen
    return gen


def set_password(user: User, password: str, *, rounds: int = 12, min_length: int = 10) -> None:
    validate_password(password, min_length, user.username)
    hashed = passwords.hash_password(password, rounds)
    with database.atomic():
        User.update(password_hash=hashed, updated_at=utcnow(), failed_logins=0, locked_until=None).where(User.id == user.id).execute()
        bump_generation(user, "password_changed")
    user.password_hash = hashed


def set_role(user: User, role: str) -> bool:
    """Give `user` the role; a change revokes every token they hold (tokens carry the role claim).

    Returns whether the role changed (setting the role a user has is a no-op).
    """
    if role not in ROLES:
        raise AccountError("invalid_role", f"role must be one of {', '.join(ROLES)}", "role")
    with database.atomic():
        changed = User.update(role=role, updated_at=utcnow()).where((User.id == user.id) & (User.role != role)).execute()
        if changed:
            bump_generation(user, "role_changed")
    user.role = role
    return bool(changed)


def set_active(user: User, active: bool) -> bool:
    """Enable or disable `user`; a change revokes every token they hold. Returns whether it changed."""
    with database.atomic():
        changed = User.update(is_active=active, updated_at=utcnow()).where((User.id == user.id) & (User.is_active != active)).execute()
        if changed:
            bump_generation(user, "account_disabled" if not active else "account_enabled")
    user.is_active = active
    return bool(changed)


def public_view(user: User) -> dict[str, Any]:
    """The user fields clients may see (never hashes or MFA secrets)."""
    from appliance.times import iso

    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "role": user.role,
        "is_active": user.is_active,
        "full_name": user.full_name,
        "department": user.department,
        "mfa_enabled": user.mfa_enabled,
        "login_count": user.login_count,
        "last_login": iso(user.last_login),
        "created_at": iso(user.created_at),
    }
