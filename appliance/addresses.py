"""Where an outbound POST (a task callback, an alert webhook) may go: vetting of destination addresses (the SSRF defence).

A callback URL comes from an ordinary user, while the worker that POSTs it sits
inside the operator's network. So a destination is refused unless every
address its host resolves to is a global unicast address: loopback, private,
link-local, shared (100.64/10), multicast, reserved, unspecified and
documentation ranges are refused, and so are the IPv6 forms that carry an IPv4
address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16 and NAT64 64:ff9b::/96
are judged by the IPv4 address inside; IPv4-compatible ::a.b.c.d,
IPv4-translated ::ffff:0:a.b.c.d, local-use NAT64 64:ff9b:1::/48 and Teredo
2001::/32 are refused outright). What is vetted is the resolver's answer, not
the URL's text: 2130706433, 0x7f.1 and 017700000001 are 127.0.0.1 here as they
are to the resolver. `[queue] callback_allow` lists CIDRs (an address inside
one is let through) and host names (trusted whatever they resolve to).

- `literal_refusal(host, policy)`: at submit, without DNS: why a host that is
  an address literal, or a localhost name, is refused; None otherwise.
- `resolve(host, port, policy)`: at send time: the vetted (family, sockaddr)
  pairs to connect to (callers connect to these and never resolve again, so a
  second DNS answer cannot swap in an internal address), or Refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_COMPAT = ipaddress.ip_network("::/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_LOW32 = 0xFFFFFFFF


class Refused(Exception):
    """A destination the policy does not let a POST reach; the message says which address and why."""


@dataclass(frozen=True)
class Policy:
    """What the operator allows beyond global addresses: networks and trusted host names."""

    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> Policy:
        """From [queue] callback_allow: CIDRs (or single addresses) and host names (validated by the config)."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                names.add(_normal_name(entry))
        return cls(tuple(networks), frozenset(names))

    def allows_name(self, host: str) -> bool:
        return _normal_name(host) in self.names

    def allows_address(self, ip: IPAddress) -> bool:
        candidates = [ip]
        inner = embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner[1])
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)


_policies: dict[tuple[str, ...], Policy] = {}


def policy_for(entries: Iterable[str]) -> Policy:
    """The Policy of a callback_allow list (built once per distinct list in this process)."""
    key = tuple(entries)
    policy = _policies.get(key)
    if policy is None:
        policy = _policies[key] = Policy.from_entries(key)
    return policy


def _normal_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def embedded_ipv4(ip: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """(form, IPv4 address) when an IPv6 address carries an IPv4 one, else None."""
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _TRANSLATED:
        return "IPv4-translated", ipaddress.IPv4Address(int(ip) & _LOW32)
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & _LOW32)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip in _COMPAT and int(ip) > 1:  # :: and ::1 are themselves, not IPv4-compatible forms
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & _LOW32)
    return None


# judged by the IPv4 address inside; the other forms are refused whatever they carry
_TRANSPARENT_FORMS = ("IPv4-mapped", "NAT64", "6to4")

_FLAGS = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_reserved", "a reserved address"),
    ("is_private", "a private address"),
)


def refusal(ip: IPAddress) -> str | None:
    """Why a callback may not go to this address (e.g. "a loopback address"), or None for a global unicast one."""
    for flag, why in _FLAGS[:2]:
        if getattr(ip, flag):
            return why
    inner = embedded_ipv4(ip)
    if inner is not None:
        form, v4 = inner
        if form not in _TRANSPARENT_FORMS:
            return f"an {form} address"
        why = refusal(v4)
        return f"the {form} form of {v4}, {why}" if why else None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        if ip.teredo is not None:
            return "a Teredo address"
        if ip.is_site_local:
            return "a site-local address"
    for flag, why in _FLAGS[2:]:
        if getattr(ip, flag):
            return why
    if ip.version == 4 and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if not ip.is_global:
        return "not a global address"
    return None


def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a scoped IPv6 address (fe80::1%eth0) is vetted without its scope


def parse_literal(host: str) -> IPAddress | None:
    """The address a host written as a literal stands for, in every form the resolver reads; None for a name.

    No DNS is asked (AI_NUMERICHOST): "2130706433", "0x7f.1", "0177.0.0.1" and "127.1" are 127.0.0.1.
    """
    text = host.strip().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return None
    try:
        infos = socket.getaddrinfo(text, None, flags=socket.AI_NUMERICHOST, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return _address(infos[0][4][0]) if infos else None


def literal_refusal(host: str, policy: Policy) -> str | None:
    """At submit: why `host` is refused when it is an address literal or a localhost name; None otherwise.

    A name is not resolved here (submit does not wait for DNS); send time vets what it resolves to.
    """
    if policy.allows_name(host):
        return None
    name = _normal_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return f"{host} is a loopback name"
    ip = parse_literal(host)
    if ip is None or policy.allows_address(ip):
        return None
    why = refusal(ip)
    return _said(host, ip, why, "is") if why else None


def _said(host: str, ip: IPAddress, why: str, verb: str) -> str:
    """ "127.0.0.1 is a loopback address", or "2130706433 is 127.0.0.1, a loopback address"."""
    try:
        plain = ipaddress.ip_address(host.strip("[]")) == ip
    except ValueError:
        plain = False
    return f"{host} is {why}" if plain else f"{host} {verb} {ip}, {why}"


Resolver = Callable[..., list[tuple[Any, ...]]]


def vet(host: str, infos: Iterable[tuple[Any, ...]], policy: Policy) -> list[tuple[int, tuple[Any, ...]]]:
    """The (family, sockaddr) pairs of getaddrinfo results that a callback to `host` may connect to.

    Refused when any address is refused: a name that resolves to both a public and an internal
    address is not one to trust. A host name in the policy is trusted whatever it resolves to.
    """
    trusted = policy.allows_name(host)
    out: list[tuple[int, tuple[Any, ...]]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if not trusted:
            ip = _address(sockaddr[0])
            if not policy.allows_address(ip):
                why = refusal(ip)
                if why:
                    raise Refused(_said(host, ip, why, "resolves to"))
        if (family, sockaddr) not in out:
            out.append((family, sockaddr))
    if not out:
        raise Refused(f"{host} has no IPv4 or IPv6 address")
    return out


def resolve(host: str, port: int, policy: Policy, resolver: Resolver = socket.getaddrinfo) -> list[tuple[int, tuple[Any, ...]]]:
    """Resolve once and vet (see `vet`); OSError when the name does not resolve (a transient failure)."""
    infos = resolver(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return vet(host, infos, policy)
