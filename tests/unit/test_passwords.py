"""bcrypt hashing and the password policy."""

from __future__ import annotations

import pytest

from appliance import passwords


def test_hash_and_verify() -> None:
    h = passwords.hash_password("correct horse 42", rounds=10)
    assert h.startswith("$2b$10$")
    assert passwords.verify_password("correct horse 42", h)
    assert not passwords.verify_password("correct horse 43", h)


def test_cost_below_ten_is_refused() -> None:
    with pytest.raises(ValueError, match="minimum"):
        passwords.hash_password("whatever-123", rounds=9)


def test_unknown_user_checks_a_dummy_hash_and_fails() -> None:
    assert passwords.verify_password("anything", None) is False


def test_the_dummy_hash_costs_what_a_default_hash_costs() -> None:
    # "unknown user" must take as long as "wrong password" for a user hashed at the default cost
    import inspect

    import bcrypt

    default_rounds = inspect.signature(passwords.hash_password).parameters["rounds"].default
    assert passwords._DUMMY_HASH.startswith(f"$2b${default_rounds:02d}$".encode())
    assert bcrypt.checkpw(b"anything", passwords._DUMMY_HASH) is False  # a well-formed hash: checking it does the work


def test_overlong_password_never_matches_by_truncation() -> None:
    h = passwords.hash_password("a1" * 36, rounds=10)  # exactly 72 bytes
    assert passwords.verify_password("a1" * 36, h)
    assert not passwords.verify_password("a1" * 36 + "extra", h)


@pytest.mark.parametrize("weak", ["short1", "aaaaaaaaaaaaaaa", "alllowercase", "alice-alice", "x" * 80])
def test_weak_passwords_are_refused(weak: str) -> None:
    with pytest.raises(passwords.PasswordPolicyError):
        passwords.check_policy(weak, 10, username="alice-alice")


def test_strong_password_passes() -> None:
    passwords.check_policy("Tr0ub4dor&3x", 10, username="alice")
