"""Which URLs and addresses the downloader may talk to.

Two checks, both before any byte is sent:

* ``check_url`` parses a URL once (with yarl, the parser aiohttp itself uses, so the URL we judge
  is the URL we fetch) and refuses anything that is not http(s), has no usable host, or names an
  address the policy forbids (IP literals never reach a resolver, so they are judged here).
* ``GuardedResolver`` is the resolver the HTTP connector uses: it resolves a host name and
  refuses the whole host if any of its addresses is forbidden. The connector then connects only
  to the addresses that were checked, so a name cannot resolve to a public address for the check
  and a private one for the connection (DNS rebinding).

The downloader runs ``check_url`` on the first URL and on every redirect target.

Policy: loopback (127.0.0.0/8, ::1) and private networks (10/8, 172.16/12, 192.168/16, the
shared 100.64/10, fc00::/7) are refused unless ``allow_private`` is set. Link-local addresses
(169.254/16 holds the cloud metadata service, fe80::/10), multicast, unspecified, reserved and
other special-purpose ranges are refused always, unless a recipe names a network in
``allowed_networks`` (then exactly that network is allowed).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

ALLOWED_SCHEMES = ("http", "https")

_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]
# Host names: letters, digits, hyphens and (seen in the wild) underscores, dot-separated.
_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")
_CANONICAL_IPV4 = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")


class Refused(Exception):
    """A URL or address the policy does not allow. ``reason`` is a datakit.schema.REASONS code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class AddressRefused(OSError):
    """Raised by GuardedResolver; an OSError so that aiohttp wraps it like any resolver failure."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Target:
    url: yarl.URL  # the parsed URL, to be passed to aiohttp as is
    host: str  # ASCII host (IDNA-encoded), no brackets
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # set when the host is an IP literal


@dataclass(frozen=True)
class Policy:
    """What the downloader may connect to. ``allowed_networks`` are CIDR blocks allowed whatever
    their kind (say, an internal mirror's 10.1.2.0/24), for recipes that need exactly that."""

    allow_private: bool = False
    allowed_networks: tuple = ()

    @classmethod
    def of(cls, allow_private: bool = False, allowed_networks=()) -> Policy:
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        except ValueError as e:
            raise ValueError(f"allowed_networks: {e}") from e
        return cls(bool(allow_private), nets)

    def problem(self, address) -> str | None:
        """None if connecting to ``address`` is allowed, else the kind of address it is."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        ip = _embedded_ipv4(ip) or ip
        if any(ip.version == net.version and ip in net for net in self.allowed_networks):
            return None
        return address_problem(ip, self.allow_private)


def address_problem(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
                    allow_private: bool) -> str | None:
    """None if the default policy allows connecting to ``address``, else the kind of address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    ip = _embedded_ipv4(ip) or ip
    if any(ip in net for net in _LOOPBACK):
        return None if allow_private else "loopback"
    if any(ip in net for net in _PRIVATE):
        return None if allow_private else "private"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_reserved or not ip.is_global:
        return "reserved or special-purpose"
    return None


def _embedded_ipv4(ip) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or 6to4 IPv6 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour
    return None


def check_url(url: str | yarl.URL, policy: Policy) -> Target:
    """Parse and judge a URL; raise Refused with reason invalid_url, unsupported_scheme or
    refused_address."""
    if isinstance(url, yarl.URL):
        parsed = url
    else:
        if not isinstance(url, str) or not url.strip():
            raise Refused("invalid_url", "empty URL")
        try:
            parsed = yarl.URL(url.strip())
        except (ValueError, TypeError) as e:
            raise Refused("invalid_url", f"cannot parse URL {url!r}: {e}") from e
    scheme = parsed.scheme.lower()
    if not scheme:
        raise Refused("invalid_url", f"no scheme in {str(url)!r} (expected http:// or https://)")
    if scheme not in ALLOWED_SCHEMES:
        raise Refused("unsupported_scheme", f"scheme {scheme!r} is not http or https: {str(url)!r}")
    host = parsed.raw_host
    if not host:
        raise Refused("invalid_url", f"no host in {str(url)!r}")
    try:
        parsed.port  # noqa: B018 - yarl validates the port lazily
    except ValueError as e:
        raise Refused("invalid_url", f"bad port in {str(url)!r}: {e}") from e
    ip = _ip_literal(host, url)
    if ip is not None:
        problem = policy.problem(ip)
        if problem:
            raise Refused("refused_address", f"{host} is a {problem} address ({str(url)!r})")
    elif not _HOSTNAME.match(host):
        raise Refused("invalid_url", f"host {host!r} is not a valid host name ({str(url)!r})")
    return Target(url=parsed, host=host, ip=ip)


def _ip_literal(host: str, url) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if ":" in host:  # only IPv6 literals contain a colon
        try:
            return ipaddress.ip_address(unquote(host))
        except ValueError as e:
            raise Refused("invalid_url", f"bad IPv6 address {host!r} in {str(url)!r}") from e
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    if last_label.isdigit() or last_label.lower().startswith("0x"):
        # A host ending in a number is an IPv4 address to resolvers and browsers; legacy forms
        # such as 127.1, 0x7f.1 or 2130706433 would bypass a check of the written text.
        if not _CANONICAL_IPV4.match(host):
            raise Refused("invalid_url", f"host {host!r} is not a canonical IPv4 address ({str(url)!r})")
        return ipaddress.ip_address(host)
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then refuses hosts with a forbidden address."""

    def __init__(self, policy: Policy, resolver: AbstractResolver | None = None):
        self.policy = policy
        self._resolver = resolver or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family=family)
        for result in results:
            problem = self.policy.problem(result["host"].split("%", 1)[0])
            if problem:
                raise AddressRefused(f"{host} resolves to {result['host']}, a {problem} address")
        return results

    async def close(self) -> None:
        await self._resolver.close()
