"""Where a task callback may go (appliance.addresses, appliance.tasks.callbacks) and how it is signed (appliance.outbound).

Pure logic: no traffic is sent. Literals are parsed by the system resolver in numeric mode (no DNS),
"localhost" comes from /etc/hosts; every other resolver answer is a getaddrinfo-shaped list built here.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import addresses, outbound
from appliance.errors import ValidationFailed
from appliance.tasks import callbacks

DEFAULT = addresses.Policy()

REFUSED_LITERALS = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("2130706433", "127.0.0.1, a loopback"),  # decimal
    ("0x7f.1", "127.0.0.1, a loopback"),  # hex, short form
    ("0x7f000001", "127.0.0.1, a loopback"),
    ("017700000001", "127.0.0.1, a loopback"),  # octal
    ("0177.0.0.1", "127.0.0.1, a loopback"),
    ("127.1", "127.0.0.1, a loopback"),
    ("127.0.0.1.", "127.0.0.1, a loopback"),  # trailing dot
    ("localhost", "loopback name"),
    ("LOCALHOST.", "loopback name"),
    ("api.localhost", "loopback name"),
    ("0.0.0.0", "unspecified"),
    ("0", "unspecified"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("100.64.0.1", "shared"),
    ("224.0.0.251", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.10", "private"),  # documentation
    ("::1", "loopback"),
    ("[::1]", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("[::ffff:7f00:1]", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1, a private"),
    ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254, a link-local"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::8.8.8.8", "IPv4-compatible"),  # deprecated form: refused whatever it carries
    ("::ffff:0:127.0.0.1", "IPv4-translated"),
    ("2002:7f00:1::1", "6to4 form of 127.0.0.1, a loopback"),
    ("2002:a00:1::", "6to4 form of 10.0.0.1, a private"),
    ("64:ff9b::127.0.0.1", "NAT64 form of 127.0.0.1, a loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254, a link-local"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
]


@pytest.mark.parametrize(("host", "why"), REFUSED_LITERALS)
def test_internal_literals_are_refused_at_submit_in_every_form(host, why):
    reason = addresses.literal_refusal(host, DEFAULT)
    assert reason is not None and why in reason, reason
    with pytest.raises(ValidationFailed) as err:
        callbacks.check_url(f"http://{host if ':' not in host or host.startswith('[') else f'[{host}]'}/cb", "callbacks.completion_url")
    assert err.value.code == "callback_refused" and err.value.details["field"] == "callbacks.completion_url"


@pytest.mark.parametrize(
    "host",
    ["8.8.8.8", "134744072", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808", "example.com"],
)
def test_global_addresses_and_names_pass_the_submit_check(host):
    assert addresses.literal_refusal(host, DEFAULT) is None  # a name is only vetted at send time, after resolution


def test_numeric_forms_are_read_as_the_resolver_reads_them():
    for form in ("2130706433", "0x7f.1", "0x7F.0.0.1", "017700000001", "0177.0.0.01", "127.1", "127.0.1"):
        assert addresses.parse_literal(form) == ipaddress.ip_address("127.0.0.1"), form
    assert addresses.parse_literal("[::ffff:127.0.0.1]") == ipaddress.ip_address("::ffff:127.0.0.1")
    assert addresses.parse_literal("example.com") is None and addresses.parse_literal("") is None
    assert addresses.parse_literal("a\x00b") is None


_refused_v4 = st.one_of(
    st.integers(0x7F000000, 0x7FFFFFFF),  # 127/8
    st.integers(0x0A000000, 0x0AFFFFFF),  # 10/8
    st.integers(0xAC100000, 0xAC1FFFFF),  # 172.16/12
    st.integers(0xC0A80000, 0xC0A8FFFF),  # 192.168/16
    st.integers(0xA9FE0000, 0xA9FEFFFF),  # 169.254/16
    st.integers(0x64400000, 0x647FFFFF),  # 100.64/10
    st.integers(0xE0000000, 0xFFFFFFFF),  # multicast and reserved
    st.integers(0x00000000, 0x00FFFFFF),  # 0/8
).map(ipaddress.IPv4Address)


def _forms(v4: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    n = int(v4)
    return [
        ipaddress.IPv6Address(0xFFFF << 32 | n),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address(0x2002 << 112 | n << 80),  # 6to4 2002:aabb:ccdd::
        ipaddress.IPv6Address(0x64FF9B << 96 | n),  # NAT64 64:ff9b::a.b.c.d
    ]


@given(_refused_v4)
def test_internal_ipv4_is_refused_in_every_ipv6_disguise(v4):
    assert addresses.refusal(v4) is not None
    for v6 in _forms(v4):
        assert addresses.refusal(v6) is not None, v6
        assert addresses.literal_refusal(str(v6), DEFAULT) is not None, v6


@given(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))
def test_an_ipv6_disguise_is_judged_like_the_ipv4_inside(v4):
    verdict = addresses.refusal(v4) is None
    for v6 in _forms(v4):
        assert (addresses.refusal(v6) is None) == verdict, v6
    # the decimal and hex spellings of any address are that address
    assert addresses.parse_literal(str(int(v4))) == v4
    assert addresses.parse_literal(hex(int(v4))) == v4


@given(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
def test_only_global_unicast_ipv6_passes(ip):
    if addresses.refusal(ip) is None:
        assert not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved)
        assert addresses.embedded_ipv4(ip) is None or addresses.refusal(addresses.embedded_ipv4(ip)[1]) is None


def _infos(*ips: str, port: int = 80) -> list[tuple]:
    out = []
    for ip in ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sockaddr = (ip, port, 0, 0) if family == socket.AF_INET6 else (ip, port)
        out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
    return out


def test_send_time_vetting_judges_every_resolved_address():
    assert addresses.vet("hooks.example", _infos("93.184.216.34", "2606:2800:220:1::1"), DEFAULT) == [
        (socket.AF_INET, ("93.184.216.34", 80)),
        (socket.AF_INET6, ("2606:2800:220:1::1", 80, 0, 0)),
    ]
    # a name answering with one internal address among public ones (rebinding, split horizon) is refused whole
    with pytest.raises(addresses.Refused, match=r"rebind\.example resolves to 169\.254\.169\.254, a link-local address"):
        addresses.vet("rebind.example", _infos("93.184.216.34", "169.254.169.254"), DEFAULT)
    with pytest.raises(addresses.Refused, match="IPv4-mapped form of 127.0.0.1"):
        addresses.vet("mapped.example", _infos("::ffff:127.0.0.1"), DEFAULT)
    with pytest.raises(addresses.Refused, match="link-local"):
        addresses.vet("scoped.example", _infos("fe80::1%lo"), DEFAULT)
    with pytest.raises(addresses.Refused, match="no IPv4 or IPv6 address"):
        addresses.vet("none.example", [], DEFAULT)


def test_localhost_is_refused_after_real_resolution():
    with pytest.raises(addresses.Refused, match="localhost resolves to .*loopback"):
        addresses.resolve("localhost", 80, DEFAULT)
    with pytest.raises(addresses.Refused, match="2130706433 resolves to 127.0.0.1, a loopback address"):
        addresses.resolve("2130706433", 80, DEFAULT)
    with pytest.raises(addresses.Refused, match="0x7f.1 resolves to 127.0.0.1"):
        addresses.resolve("0x7f.1", 80, DEFAULT)


def test_callback_allow_lets_named_networks_and_hosts_through():
    policy = addresses.Policy.from_entries(["127.0.0.1/32", "10.20.0.0/16", "fd00::/8", "Hooks.Internal."])
    assert addresses.resolve("2130706433", 8080, policy) == [(socket.AF_INET, ("127.0.0.1", 8080))]
    assert addresses.literal_refusal("127.0.0.1", policy) is None
    assert addresses.literal_refusal("::ffff:127.0.0.1", policy) is None  # the mapped form of an allowed address
    assert addresses.literal_refusal("2130706433", policy) is None
    assert addresses.literal_refusal("127.0.0.2", policy) is not None  # only the /32
    assert addresses.literal_refusal("10.20.3.4", policy) is None and addresses.literal_refusal("10.21.0.1", policy) is not None
    assert addresses.vet("hooks.internal", _infos("192.168.7.7"), policy)  # a trusted name, whatever it resolves to
    with pytest.raises(addresses.Refused):
        addresses.vet("other.internal", _infos("192.168.7.7"), policy)
    assert addresses.policy_for(["127.0.0.1/32"]) is addresses.policy_for(["127.0.0.1/32"])


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/",
        "gopher://example.com:70/",
        "http://",
        "javascript:alert(1)",
        "http://example.com:99999/",
        "http://user:pw@example.com/",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://ex\u00e4mple.com/",
        "x" * 3000,
        17,
    ],
)
def test_bad_callback_urls_are_a_400_naming_the_field(url):
    with pytest.raises(ValidationFailed) as err:
        callbacks.check_callbacks({"error_url": url})
    assert err.value.status == 400 and err.value.details["field"] == "callbacks.error_url"


def test_good_callback_urls_pass():
    urls = {"completion_url": "https://hooks.example.com/cb?x=1", "error_url": "http://93.184.216.34:8080/e"}
    assert callbacks.check_callbacks(urls) == urls


def test_signature_binds_timestamp_url_and_body():
    secret, url, body = "s" * 32, "https://hooks.example.com/cb", b'{"a":1}'
    sig = outbound.sign(secret, "1700000000", url, body)
    assert sig.startswith("v1=") and len(sig) == 3 + 64
    assert outbound.verify(secret, url, body, "1700000000", sig, now=1700000100)
    assert not outbound.verify("t" * 32, url, body, "1700000000", sig, now=1700000100)
    assert not outbound.verify(secret, url + "x", body, "1700000000", sig, now=1700000100)  # sent elsewhere
    assert not outbound.verify(secret, url, body + b" ", "1700000000", sig, now=1700000100)
    assert not outbound.verify(secret, url, body, "1700000001", sig, now=1700000100)
    assert not outbound.verify(secret, url, body, "1700000000", sig, now=1700000000 + outbound.REPLAY_WINDOW + 1)  # a replay
    assert not outbound.verify(secret, url, body, "soon", sig) and not outbound.verify(secret, url, body, "1700000000", "")


def test_callback_allow_entries_are_checked_when_the_config_loads(make_config):
    from appliance.config import ConfigError

    cfg = make_config(queue={"callback_allow": ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8", "hooks.internal", "localhost"]})
    assert addresses.policy_for(cfg.queue.callback_allow).allows_name("HOOKS.internal")
    with pytest.raises(ConfigError) as err:
        make_config(queue={"callback_allow": ["10.0.0.0/33", "bad name!"]})
    assert len(err.value.problems) == 2 and all("[queue] callback_allow entry" in p for p in err.value.problems)
