"""Which address a request's client has: forwarded-for headers, read only from trusted
proxies and from the right (the proxies append), never the client's own choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry_server import config
from registry_server.http.clients import ClientAddresses, forwarded_hops, parse_address

PROXIES = ClientAddresses(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("192.0.2.1:5678", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ('"[2001:db8::1]:4711"', "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("999.1.1.1", None),
        ("[2001:db8::1", None),
    ],
)
def test_parse_address(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == address


def test_forwarded_hops_of_both_headers() -> None:
    assert forwarded_hops("x-forwarded-for", ["1.1.1.1, 2.2.2.2", "3.3.3.3"]) == [
        "1.1.1.1",
        " 2.2.2.2",
        "3.3.3.3",
    ]
    forwarded = ['for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8::1]:4711"', "by=x"]
    assert forwarded_hops("forwarded", forwarded) == ["192.0.2.60", '"[2001:db8::1]:4711"', ""]


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        # Not from a trusted proxy: the peer, whatever the header says.
        ("192.0.2.7", ["198.51.100.1"], "192.0.2.7"),
        # From a proxy: the address it appended.
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        # What a client wrote itself stays left of what the proxy appended.
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        # Through two trusted proxies: skip both.
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1, 10.9.9.9"], "198.51.100.1"),
        # Only trusted hops (an in-cluster client through the Ingress): the first.
        ("10.0.0.5", ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        # A proxy that could not tell: the last address known.
        ("10.0.0.5", ["198.51.100.1, unknown"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1, garbage, 10.2.2.2"], "10.2.2.2"),
        # No header: the proxy itself.
        ("10.0.0.5", [], "10.0.0.5"),
        ("fd00::5", ["2001:db8::9"], "2001:db8::9"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        (None, ["198.51.100.1"], "unknown"),
    ],
)
def test_resolve(peer: str | None, header: list[str], client: str) -> None:
    assert PROXIES.resolve(peer, header) == client


def test_no_trusted_proxies_means_the_peer() -> None:
    assert ClientAddresses().resolve("127.0.0.1", ["198.51.100.1"]) == "127.0.0.1"


def test_forwarded_header_choice() -> None:
    rfc = ClientAddresses(["10.0.0.0/8"], "Forwarded")
    assert rfc.resolve("10.0.0.5", ['for="[2001:db8::1]:4711";proto=https']) == "2001:db8::1"
    assert rfc.resolve("10.0.0.5", ["for=198.51.100.1, for=10.3.3.3"]) == "198.51.100.1"


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "http:\n  trusted_proxies: [10.0.0.0/8, '::1']\n  forwarded_header: forwarded\n"
        "  metrics_addr: 0.0.0.0:9090\nauth:\n  client_failure_limit: 50\n"
    )
    loaded = config.load(path, env={})
    assert loaded.http.trusted_proxies == ("10.0.0.0/8", "::1")
    assert loaded.http.metrics_port == 9090 and loaded.http.metrics_host == "0.0.0.0"
    assert loaded.auth is not None and loaded.auth.client_failure_limit == 50
    assert config.load(path, env={"BERTH_METRICS_ADDR": "127.0.0.1:9"}).http.metrics_port == 9
    for bad, message in [
        ("http:\n  trusted_proxies: 10.0.0.0/8\n", "trusted_proxies: expected a list"),
        ("http:\n  trusted_proxies: [ingress]\n", "not an IP address or network"),
        ("http:\n  forwarded_header: x-real-ip\n", "forwarded_header"),
        ("http:\n  metrics_addr: '9090'\n", "metrics_addr must be host:port"),
        ("http:\n  metrics_addr: 'a:b'\n", "metrics_addr has an invalid port"),
        ("auth:\n  client_failure_limit: -1\n", "client_failure_limit"),
    ]:
        path.write_text(bad)
        with pytest.raises(config.ConfigError, match=message):
            config.load(path, env={})
