"""Which client sent a request: the peer's address, or, when the peer is a trusted proxy,
the address the proxies forwarded for (``X-Forwarded-For`` or RFC 7239 ``Forwarded``).

The failed-login limiter and the log lines key on this address, so it must not be a
client's own choice: the header is read only from peers in ``http.trusted_proxies``, and
from right to left (each proxy appends the address it saw), stopping at the first
address that is not itself a trusted proxy. Whatever a client wrote further left is never
reached.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from aiohttp import web

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# for=... in one Forwarded element: a token or a quoted string.
_FORWARDED_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)


def parse_address(text: str) -> Address | None:
    """An IP address from a forwarded hop: ``1.2.3.4``, ``1.2.3.4:5678``, ``[2001:db8::1]``,
    ``[2001:db8::1]:443`` or a bare IPv6 address; None for anything else (``unknown``,
    RFC 7239's obfuscated ``_names``, garbage). IPv4-mapped IPv6 is taken as IPv4."""
    text = text.strip().strip('"').replace('\\"', '"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_hops(header: str, values: Iterable[str]) -> list[str]:
    """The hops of all ``header`` lines, in order (client first, nearest proxy last)."""
    hops: list[str] = []
    for value in values:
        if header == "forwarded":
            for element in value.split(","):
                match = _FORWARDED_FOR.search(element)
                # An element without for= still is a hop, of an unknown address.
                hops.append(match.group(1) if match else "")
        else:
            hops.extend(value.split(","))
    return hops


class ClientAddresses:
    def __init__(self, trusted: Sequence[str] = (), header: str = "x-forwarded-for") -> None:
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(t.strip(), strict=False) for t in trusted
        )
        self._header = header.lower()

    def trusts(self, address: Address | None) -> bool:
        return address is not None and any(address in net for net in self._trusted)

    def resolve(self, peer: str | None, forwarded: Iterable[str]) -> str:
        """The client's address for a request from ``peer`` carrying ``forwarded`` lines."""
        address = parse_address(peer) if peer else None
        if not self.trusts(address):
            return str(address) if address is not None else (peer or "unknown")
        for hop in reversed(forwarded_hops(self._header, forwarded)):
            hop_address = parse_address(hop)
            if hop_address is None:
                break  # a proxy that could not tell: the last address known stands
            address = hop_address
            if not self.trusts(address):
                break
        return str(address)

    def of(self, request: web.Request) -> str:
        forwarded = request.headers.getall(self._header, []) if self._trusted else []
        return self.resolve(request.remote, forwarded)

    def forwarded_https(self, request: web.Request) -> bool:
        """Whether a trusted proxy (an Ingress terminating TLS) says the client used HTTPS."""
        peer = parse_address(request.remote) if request.remote else None
        if not self.trusts(peer):
            return False
        proto = request.headers.get("X-Forwarded-Proto", "")
        return proto.split(",")[0].strip().lower() == "https"
