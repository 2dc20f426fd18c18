"""What the balancer adds on its own: its answers' headers and the signed client address line."""

from __future__ import annotations

import pytest

from appliance import identity
from appliance.balancer.framing import DROP
from appliance.balancer.proxy import PROXY_ROLES, Proxy
from appliance.balancer.writer import ERROR_LINES, SECURITY_LINES, error_head


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 413, 417, 429, 431, 500, 502, 503, 504, 418])
def test_every_error_the_balancer_makes_carries_the_security_headers(status: int) -> None:
    head = error_head(status, 2, b"rid", b"connection: close\r\n")
    for line in (
        b"x-content-type-options: nosniff\r\n",
        b"x-frame-options: DENY\r\n",
        b"referrer-policy: no-referrer\r\n",
        b"cache-control: no-store\r\n",
    ):
        assert line in head
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    assert ERROR_LINES.startswith(SECURITY_LINES)


def test_client_lines_are_signed_once_per_address_and_a_client_sent_one_is_dropped(make_config) -> None:
    cfg = make_config(balancer={"auth_mode": "off"})
    key = identity.key_bytes(cfg.secrets.identity_key)
    proxy = Proxy(cfg, upstreams=None)
    line = proxy.client_line("127.0.0.2", "127.0.0.2")
    name, _, value = line.rstrip(b"\r\n").partition(b": ")
    assert name == identity.CLIENT_HEADER_LOWER.encode()
    assert identity.verify_client(value.decode(), key) == "127.0.0.2"
    assert proxy.client_line("127.0.0.2", "127.0.0.2") is line  # cached: no HMAC per request
    assert identity.verify_client(proxy.client_line("::ffff:7f00:2", "127.0.0.9").split(b": ")[1].strip().decode(), key) == "::ffff:7f00:2"
    # A hop that is no IP address (made up by whoever a trusted proxy passed on) is never signed.
    made_up = proxy.client_line("evil.example", "127.0.0.9")
    assert identity.verify_client(made_up.split(b": ")[1].strip().decode(), key) == "127.0.0.9"
    assert PROXY_ROLES[identity.CLIENT_HEADER_LOWER.encode()] == DROP
