"""Which provider endpoints the registry accepts: the operator's allow-list.

Every gateway dials whatever endpoint a provider registers, with the caller's
discovery and execution requests. Without a list, anyone who can reach the
registry could point the mesh at any host (an internal admin port, a metadata
service): a server-side request forgery with the gateway's network position.

A pattern is ``HOST`` or ``HOST:PORT``:

- ``HOST`` is an IP network in CIDR notation (``10.0.0.0/8``, ``fd00::/8``), a
  single IP address (``::1``, ``[::1]``), or a case-insensitive host name glob
  (``localhost``, ``*.svc.cluster.local``, where ``*`` also spans dots).
  Networks match only endpoints whose host is an IP literal: names are never
  resolved here, because the gateway resolves them again later and may get
  another answer.
- ``PORT`` is a number, a range ``50000-50100`` or ``*``; no port means any port.
  A bare IPv6 address or network takes no port; bracket it to add one
  (``[::1]:50061``, ``[fd00::/8]:*``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_ALLOWED_ENDPOINTS = ("127.0.0.0/8", "::1", "localhost")
"""Loopback only: enough for ``actionmesh up`` and tests, nothing a network can reach."""

_HOST_GLOB = re.compile(r"^[A-Za-z0-9*?](?:[A-Za-z0-9.*?-]{0,251}[A-Za-z0-9*?])?$")
_PORT_RANGE = re.compile(r"^([0-9]{1,5})(?:-([0-9]{1,5}))?$")


@dataclass(frozen=True)
class EndpointPattern:
    """One entry of the allow-list, parsed."""

    text: str
    network: IPNetwork | None
    host_glob: str | None
    ports: tuple[int, int] | None
    """Inclusive port range; None means any port."""

    @classmethod
    def parse(cls, text: str) -> EndpointPattern:
        """Parse ``text``; ValueError says what is wrong with it."""
        pattern = text.strip()
        if not pattern:
            raise ValueError("an empty endpoint pattern")
        if pattern.startswith("["):
            host, closing, rest = pattern[1:].partition("]")
            if not closing:
                raise ValueError(f"endpoint pattern {text!r}: missing ']'")
            if rest and not rest.startswith(":"):
                raise ValueError(f"endpoint pattern {text!r}: expected ':PORT' after ']'")
            port = rest[1:] if rest else None
            network = _network(host)
            if network is None or network.version != 6:
                raise ValueError(f"endpoint pattern {text!r}: brackets hold an IPv6 address")
            return cls(pattern, network, None, _ports(port, text))
        if pattern.count(":") > 1:
            network = _network(pattern)
            if network is None:
                raise ValueError(
                    f"endpoint pattern {text!r}: not an IPv6 address or network "
                    "(bracket it to add a port: [::1]:50061)"
                )
            return cls(pattern, network, None, None)
        host, sep, port = pattern.partition(":")
        ports = _ports(port if sep else None, text)
        network = _network(host)
        if network is not None:
            return cls(pattern, network, None, ports)
        if not _HOST_GLOB.match(host):
            raise ValueError(
                f"endpoint pattern {text!r}: host must be an IP address, a CIDR network or a "
                "host name glob (letters, digits, '.', '-', '*', '?')"
            )
        return cls(pattern, None, host.lower(), ports)

    def matches(self, host: str, port: int) -> bool:
        if self.ports is not None and not self.ports[0] <= port <= self.ports[1]:
            return False
        address = _address(host)
        if self.network is not None:
            return address is not None and address in self.network
        assert self.host_glob is not None
        # A glob never matches an IP literal: 10.0.0.1 is no "host name" an operator listed.
        return address is None and fnmatch.fnmatchcase(host.lower(), self.host_glob)


def _network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _address(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    # ::ffff:10.0.0.1 reaches 10.0.0.1, so it is judged as that address.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ports(text: str | None, pattern: str) -> tuple[int, int] | None:
    if text is None or text == "*":
        return None
    found = _PORT_RANGE.match(text)
    if not found:
        raise ValueError(f"endpoint pattern {pattern!r}: port must be N, N-M or *")
    low = int(found.group(1))
    high = int(found.group(2) or low)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"endpoint pattern {pattern!r}: ports run from 1 to 65535, low to high")
    return low, high


class EndpointAllowList:
    """The endpoints providers may register; everything else is refused."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(EndpointPattern.parse(p) for p in patterns)

    def allows(self, endpoint: str) -> bool:
        """Whether ``endpoint`` (a valid ``host:port``, see registry.validation) is listed."""
        host, _, port = endpoint.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            return False
        return any(pattern.matches(host, number) for pattern in self.patterns)

    def describe(self) -> str:
        return ", ".join(p.text for p in self.patterns) or "(nothing)"
