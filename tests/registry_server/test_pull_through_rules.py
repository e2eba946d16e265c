"""The pull-through cache's pure rules and its configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry_server.config import ConfigError, load
from registry_server.protocol import upstreams
from registry_server.protocol.upstreams import Mirror, UpstreamFailure

HUB = Mirror("hub", "docker.io", ("docker.io", "registry-1.docker.io"), True)
QUAY = Mirror("quay", "quay.io", ("quay.io",), False)
MIRRORS = (HUB, QUAY)


def test_prefix_selects_the_upstream_and_library_is_mapped_as_docker_does() -> None:
    target = upstreams.resolve("docker.io/nginx", None, MIRRORS)
    assert target is not None and (target.mirror, target.local, target.remote) == (
        HUB,
        "docker.io/nginx",
        "library/nginx",
    )
    target = upstreams.resolve("docker.io/grafana/grafana", None, MIRRORS)
    assert target is not None and target.remote == "grafana/grafana"
    target = upstreams.resolve("quay.io/coreos/etcd", None, MIRRORS)
    assert target is not None and target.mirror is QUAY and target.remote == "coreos/etcd"
    target = upstreams.resolve("quay.io/etcd", None, MIRRORS)
    assert target is not None and target.remote == "etcd"  # no library mapping there
    assert upstreams.resolve("team-a/api", None, MIRRORS) is None
    assert upstreams.resolve("docker.io", None, MIRRORS) is None


def test_containerd_ns_selects_the_upstream_and_names_the_local_repository() -> None:
    target = upstreams.resolve("library/nginx", "docker.io", MIRRORS)
    assert target is not None and (target.local, target.remote) == (
        "docker.io/library/nginx",
        "library/nginx",
    )
    target = upstreams.resolve("coreos/etcd", "QUAY.IO", MIRRORS)
    assert target is not None and target.local == "quay.io/coreos/etcd"
    # An unknown host: an ordinary repository (or another prefix) as without ns.
    assert upstreams.resolve("team-a/api", "ghcr.io", MIRRORS) is None


def test_longest_prefix_wins() -> None:
    inner = Mirror("inner", "docker.io/team", (), False)
    target = upstreams.resolve("docker.io/team/app", None, (HUB, inner))
    assert target is not None and target.mirror is inner and target.remote == "app"


def test_revalidation_after_ttl() -> None:
    assert upstreams.needs_revalidation(None, 100.0, 300)
    assert not upstreams.needs_revalidation(90.0, 100.0, 300)
    assert upstreams.needs_revalidation(90.0, 390.0, 300)
    assert upstreams.needs_revalidation(90.0, 90.0, 0)


def test_stale_content_served_for_anything_but_not_found() -> None:
    for status in (None, 429, 500, 503, 401):
        assert upstreams.serves_stale(UpstreamFailure("hub", "x", status))
    assert not upstreams.serves_stale(UpstreamFailure("hub", "gone", 404))
    text = upstreams.warning(UpstreamFailure("hub", 'HTTP 429: "slow down"', 429))
    assert text.startswith('110 berth "') and text.endswith('"') and text.count('"') == 2


def test_a_warning_holds_nothing_a_header_may_not() -> None:
    """The reason quotes the upstream's reply: its line breaks, tabs, backslashes and
    non-ASCII go (aiohttp refuses to send CR or LF in a header)."""
    page = '<html>\r\n<body>"busy"\t\\ \u00e9 ' + "x" * 300 + "</body>\r\n</html>\r\n"
    text = upstreams.warning(UpstreamFailure("hub", f"HTTP 503: {page}", 503))
    assert text.startswith('110 berth "cached content served: upstream hub: HTTP 503: <html> ')
    assert all(" " <= c <= "~" for c in text) and "\\" not in text
    assert text.count('"') == 2 and text.endswith('"') and len(text) <= 212


def test_eviction_keeps_the_last_pulled_and_drops_the_idle() -> None:
    tags = [("a", 100.0), ("b", 300.0), ("c", 200.0)]
    assert upstreams.evicted(tags, 400.0, 0, 0) == []
    assert upstreams.evicted(tags, 400.0, 2, 0) == ["a"]
    assert sorted(upstreams.evicted(tags, 400.0, 0, 150)) == ["a", "c"]
    assert sorted(upstreams.evicted(tags, 400.0, 1, 250)) == ["a", "c"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_upstreams_config(tmp_path: Path) -> None:
    config = load(
        _write(
            tmp_path,
            """
upstreams:
  - name: hub
    url: https://registry-1.docker.io
    prefix: docker.io/
    username: me
    password_file: /run/secrets/hub
    tag_ttl_seconds: 60
    keep_last: 5
    max_idle_days: 30
    hosts: [Docker.io]
""",
        ),
        env={},
    )
    (hub,) = config.upstreams
    assert (hub.name, hub.prefix, hub.hosts, hub.keep_last) == (
        "hub",
        "docker.io",
        ("docker.io",),
        5,
    )
    assert hub.max_idle_days == 30.0 and hub.tag_ttl_seconds == 60.0
    peer = hub.as_peer()
    assert peer.kind == "oci" and peer.username == "me" and peer.url == hub.url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upstreams: {}", "expected a list"),
        ("upstreams: [{name: a, url: 'http://x'}]", "prefix is required"),
        ("upstreams: [{name: a, url: 'ftp://x', prefix: p}]", "must start with"),
        ("upstreams: [{name: a, url: 'http://x', prefix: p, keep_last: -1}]", "negative"),
        ("upstreams: [{name: a, url: 'http://x', prefix: p, bogus: 1}]", "unknown keys"),
        (
            "upstreams: [{name: a, url: 'http://x', prefix: p},"
            " {name: b, url: 'http://y', prefix: p}]",
            "prefix must be unique",
        ),
    ],
)
def test_bad_upstreams_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(_write(tmp_path, text), env={})
