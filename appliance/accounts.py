"""User accounts: creation, passwords, roles, disabling. Used by the CLI and the API.

Errors are AccountError with a snake_case code, the field at fault and the
HTTP status they deserve, so the API renders them without translating.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from appliance import passwords, revocation
from appliance.db.errors import Conflict, translated
from appliance.db.models import User, database
from appliance.times import utcnow

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,64}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
ROLES = ("admin", "user")


class AccountError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400):
        self.code, self.message, self.field, self.status = code, message, field, status
        super().__init__(message)


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
    if User.select().where(User.username == username).exists():
        raise AccountError("username_taken", "username is already taken", "username", 409)
    if User.select().where(User.email == email).exists():
        raise AccountError("email_taken", "email is already registered", "email", 409)
    try:
        with translated(), database.atomic():
            return User.create(username=username, email=email, password_hash=hashed, role=role, full_name=full_name)
    except Conflict:
        raise AccountError("username_taken", "username or email is already taken", "username", 409) from None


def get_user(username: str) -> User:
    user = User.get_or_none(User.username == username)
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


def set_role(user: User, role: str) -> None:
    if role not in ROLES:
        raise AccountError("invalid_role", f"role must be one of {', '.join(ROLES)}", "role")
    User.update(role=role, updated_at=utcnow()).where(User.id == user.id).execute()
    user.role = role


def set_active(user: User, active: bool) -> None:
    with database.atomic():
        User.update(is_active=active, updated_at=utcnow()).where(User.id == user.id).execute()
        if not active:
            bump_generation(user, "account_disabled")
    user.is_active = active


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
