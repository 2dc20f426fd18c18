"""Password hashing with bcrypt (cost 12 by default, never below 10).

bcrypt releases the GIL while hashing, so a waitress thread hashing a password
does not block the other threads of its worker.
"""

from __future__ import annotations

import bcrypt

MIN_ROUNDS = 10
_MAX_BYTES = 72  # bcrypt ignores bytes past 72; we pre-check length instead of silently truncating

# A real cost-12 hash of a random password nobody kept, checked when the user does not exist so
# that "unknown user" and "wrong password" take about the same time. A constant, not hashed at
# import: that took 0.3 s of every start (the template's preload, each CLI command).
_DUMMY_HASH = b"$2b$12$5LmrRI.iKVKqbx5eDJoCyu.K4J1pTZV55I9ywqfblIQ0HDZ3gyH/a"


class PasswordPolicyError(ValueError):
    """The password is unacceptable; the message says why (safe to show the user)."""


def hash_password(password: str, rounds: int = 12) -> str:
    if rounds < MIN_ROUNDS:
        raise ValueError(f"bcrypt cost {rounds} is below the minimum of {MIN_ROUNDS}")
    raw = password.encode("utf-8")
    if len(raw) > _MAX_BYTES:
        raise PasswordPolicyError(f"password is longer than {_MAX_BYTES} bytes")
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, hashed: str | None) -> bool:
    """True when `password` matches; with hashed=None a dummy hash is checked and False returned."""
    raw = password.encode("utf-8")
    if len(raw) > _MAX_BYTES:
        raw = raw[:_MAX_BYTES]
        truncated = True
    else:
        truncated = False
    if not hashed:
        bcrypt.checkpw(raw, _DUMMY_HASH)
        return False
    try:
        ok = bcrypt.checkpw(raw, hashed.encode("ascii"))
    except ValueError:
        return False
    return ok and not truncated


def check_policy(password: str, min_length: int = 10, username: str = "") -> None:
    """Raise PasswordPolicyError when `password` is too weak."""
    if len(password) < min_length:
        raise PasswordPolicyError(f"password must be at least {min_length} characters")
    if len(password.encode("utf-8")) > _MAX_BYTES:
        raise PasswordPolicyError(f"password must be at most {_MAX_BYTES} bytes")
    if username and password.lower() == username.lower():
        raise PasswordPolicyError("password must not be the user name")
    classes = sum(
        (
            any(c.islower() for c in password),
            any(c.isupper() for c in password),
            any(c.isdigit() for c in password),
            any(not c.isalnum() for c in password),
        )
    )
    if classes < 2 and len(password) < 16:
        raise PasswordPolicyError("password needs two of: lower case, upper case, digits, symbols (or 16+ characters)")
    if len(set(password)) < 4:
        raise PasswordPolicyError("password has too few distinct characters")
