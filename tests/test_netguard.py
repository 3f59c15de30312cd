"""The URL and address policy of the downloader (datakit/netguard.py). No traffic leaves the
machine: IP literals are judged without a connection, and the resolver tests use /etc/hosts
names (localhost) or a fixed inner resolver."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from datakit import netguard
from datakit.stages.download import Settings

DEFAULT = netguard.Policy.of()
PRIVATE_OK = netguard.Policy.of(allow_private=True)


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # shared address space (carrier NAT)
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata service
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 wrapping 169.254.169.254
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved or special-purpose"),
        ("192.0.2.10", "reserved or special-purpose"),  # documentation range
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_default_policy_names_the_kind_of_refused_address(address, kind):
    assert DEFAULT.problem(address) == kind


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "fd00::1"])
def test_allow_private_allows_loopback_and_private_networks(address):
    assert PRIVATE_OK.problem(address) is None


@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0", "192.0.2.10"])
def test_allow_private_still_refuses_link_local_multicast_and_reserved(address):
    assert PRIVATE_OK.problem(address) is not None


def test_allowed_networks_allow_exactly_those_networks():
    policy = netguard.Policy.of(False, ["10.1.2.0/24", "127.0.0.1/32"])
    assert policy.problem("10.1.2.3") is None
    assert policy.problem("127.0.0.1") is None
    assert policy.problem("10.1.3.1") == "private"
    assert policy.problem("127.0.0.2") == "loopback"


def test_a_bad_allowed_network_is_a_settings_error_naming_it():
    with pytest.raises(ValidationError, match="not-a-network"):
        Settings(allowed_networks=["not-a-network"])


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://example.com/",
                                 "javascript:alert(1)", "data:image/png;base64,AAAA", "FTP://EXAMPLE.COM/x"])
def test_only_http_and_https(url):
    with pytest.raises(netguard.Refused) as e:
        netguard.check_url(url, DEFAULT)
    assert e.value.reason == "unsupported_scheme"


@pytest.mark.parametrize(
    "url",
    ["", "   ", "not a url", "www.example.com/a.jpg", "http://", "http:///a.jpg", "http://a:99999/x",
     "http://[::1", "http://exa mple.com/a.jpg", "http://bad_host!/x",
     # legacy numeric IPv4 forms that resolvers would map onto 127.0.0.1
     "http://127.1/x", "http://0x7f000001/x", "http://2130706433/x", "http://0177.0.0.1/x"],
)
def test_malformed_urls_are_invalid(url):
    with pytest.raises(netguard.Refused) as e:
        netguard.check_url(url, DEFAULT)
    assert e.value.reason == "invalid_url", e.value.detail


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:8080/",
                                 "https://127.0.0.1/a.jpg", "http://[::ffff:a9fe:a9fe]/"])
def test_forbidden_ip_literals_are_refused_without_a_connection(url):
    with pytest.raises(netguard.Refused) as e:
        netguard.check_url(url, DEFAULT)
    assert e.value.reason == "refused_address"
    assert "address" in e.value.detail


def test_a_good_url_is_parsed_once_with_its_ascii_host():
    target = netguard.check_url("HTTPS://Bücher.Example/Ä.jpg?x=1", DEFAULT)
    assert target.url.scheme == "https"
    assert target.host == "xn--bcher-kva.example"
    assert target.ip is None
    assert netguard.check_url("http://8.8.8.8/a.jpg", DEFAULT).ip is not None


def test_resolver_refuses_a_name_that_resolves_to_loopback():
    async def resolve(policy):
        resolver = netguard.GuardedResolver(policy)
        try:
            return await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()

    with pytest.raises(netguard.AddressRefused, match="localhost resolves to 127.0.0.1, a loopback address"):
        asyncio.run(resolve(DEFAULT))
    assert "127.0.0.1" in [r["host"] for r in asyncio.run(resolve(PRIVATE_OK))]


class _FixedResolver:
    """An inner resolver that answers a fixed list, as a DNS server could (e.g. rebinding)."""

    def __init__(self, addresses):
        self.addresses = addresses

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": a, "port": port, "family": 0, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self):
        pass


def test_resolver_refuses_a_host_if_any_of_its_addresses_is_forbidden():
    resolver = netguard.GuardedResolver(DEFAULT, _FixedResolver(["93.184.216.34", "10.0.0.7"]))
    with pytest.raises(netguard.AddressRefused, match="10.0.0.7, a private address"):
        asyncio.run(resolver.resolve("mixed.example", 80))
    public = netguard.GuardedResolver(DEFAULT, _FixedResolver(["93.184.216.34"]))
    assert [r["host"] for r in asyncio.run(public.resolve("public.example", 80))] == ["93.184.216.34"]
