"""/api/protected keeps its answer for a second per (user, token generation): it stays right under role change,
disable, logout and a generation bump the revocation mirror has not seen yet. Both engines, in-process."""

from __future__ import annotations

import pytest

from appliance.api.profilecache import ProfileCache
from appliance.db.models import User
from tests.api_support import AUTH, bearer, client_for, login, register, user_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_config(engine, make_config, request):
    auth = {**AUTH, "login_address_max_failures": 50}
    if engine == "postgresql":
        return make_config(auth=auth, database={"url": request.getfixturevalue("pg_url"), "max_connections": 8})
    return make_config(auth=auth)


@pytest.fixture
def client(db, db_config):
    return client_for(db_config)


@pytest.fixture
def clock(client) -> Clock:
    """The protected resource's cache, on a clock the test moves."""
    resource = client.app._router.find("/api/protected")[0]
    fake = Clock()
    resource.cache = ProfileCache(clock=fake)
    return fake


def _get(client, token: str):
    return client.simulate_get("/api/protected", headers=bearer(token))


def test_role_change_and_disable_are_seen_at_once_despite_the_cache(client, clock):
    admin = user_token(client, "boss", role="admin")
    uid = register(client, "cara")["id"]
    old = login(client, "cara")["access_token"]
    assert _get(client, old).json["data"]["user"]["role"] == "user"  # now cached
    assert client.simulate_patch(f"/api/users/{uid}", headers=bearer(admin), json={"role": "admin"}).status_code == 200
    assert _get(client, old).status_code == 401  # the old token carries the old role: revoked
    new = login(client, "cara")["access_token"]
    r = _get(client, new)  # same user, within the second: the new generation reads the row again
    assert r.status_code == 200 and r.json["data"]["user"]["role"] == "admin"
    assert client.simulate_patch(f"/api/users/{uid}", headers=bearer(admin), json={"is_active": False}).status_code == 200
    assert _get(client, new).status_code == 401


def test_logout_of_one_session_is_seen_at_once_while_another_stays_cached(client, clock):
    register(client, "dina")
    s1, s2 = login(client, "dina"), login(client, "dina")
    assert _get(client, s1["access_token"]).status_code == 200 and _get(client, s2["access_token"]).status_code == 200
    assert client.simulate_post("/auth/logout", headers=bearer(s1["access_token"])).status_code == 200
    assert _get(client, s1["access_token"]).status_code == 401
    assert _get(client, s2["access_token"]).status_code == 200


def test_a_generation_bump_the_revocation_check_has_not_seen_refuses_the_token_once_the_entry_expires(client, clock):
    uid = register(client, "eli")["id"]
    token = login(client, "eli")["access_token"]
    assert _get(client, token).status_code == 200
    # another worker bumped the generation; this one's revocation check does not know yet (no revocation row)
    User.update(token_generation=User.token_generation + 1).where(User.id == uid).execute()
    clock.now += 1.5  # past the entry's second
    r = _get(client, token)
    assert r.status_code == 401 and r.json["error"]["code"] == "token_revoked"


def test_profile_edits_show_after_the_second():
    fake = Clock()
    cache = ProfileCache(ttl=1.0, max_entries=2, clock=fake)
    cache.put((1, 0), "a")
    assert cache.get((1, 0)) == "a" and cache.get((1, 1)) is None
    fake.now += 1.0
    assert cache.get((1, 0)) is None
    cache.put((1, 0), "a")
    cache.put((2, 0), "b")
    cache.put((3, 0), "c")  # full: emptied first, so it never grows past max_entries
    assert cache.get((1, 0)) is None and cache.get((3, 0)) == "c"
