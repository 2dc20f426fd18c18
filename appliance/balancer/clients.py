"""Who the client is: its address behind trusted proxies, and the signed line that tells the workers.

Every request sent upstream carries X-Appliance-Client: the client address (the
peer, or the rightmost X-Forwarded-For hop that is not a trusted proxy) signed with
the identity key (appliance.identity.sign_client), so a worker can trust it while
anyone could write X-Forwarded-For. One HMAC per address, then a dict lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from appliance import identity

CLIENT_LINES_MAX = 4096  # signed X-Appliance-Client lines kept, one per client address


class ClientAddresses:
    """The trusted-proxy networks and the signed client lines made so far."""

    def __init__(self, trusted_proxies: Sequence[str], key: bytes):
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
        self.key = key
        self._client_lines: dict[str, bytes] = {}

    def is_trusted(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client_address(self, peer: str, forwarded_for: bytes) -> str:
        """The client behind trusted proxies: the rightmost X-Forwarded-For entry that is not one."""
        for hop in reversed(forwarded_for.split(b",")):
            addr = hop.strip().decode("latin-1")
            if addr and not self.is_trusted(addr):
                return addr
        return peer

    def client_line(self, address: str, peer: str) -> bytes:
        """The signed X-Appliance-Client line for a client address: one HMAC per address, then a lookup.

        An X-Forwarded-For hop that is no IP address (a trusted proxy passed it on) is not
        signed: the line names the peer instead.
        """
        line = self._client_lines.get(address)
        if line is None:
            try:
                canonical = str(ipaddress.ip_address(address))
            except ValueError:
                if address != peer:
                    return self.client_line(peer, peer)
                canonical = address  # a unix socket peer
            line = b"%s: %s\r\n" % (identity.CLIENT_HEADER_LOWER.encode(), identity.sign_client(canonical, self.key).encode())
            if len(self._client_lines) >= CLIENT_LINES_MAX:
                self._client_lines.clear()  # many distinct addresses: start over rather than track ages
            self._client_lines[address] = line
        return line
