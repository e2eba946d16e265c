"""The web UI's pure parts: describing manifests, where a login may send the browser,
and the `ui` configuration section. (The pages themselves: test_ui_browser.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from registry_server import config
from registry_server.app import build_app
from registry_server.http import ui
from registry_server.protocol import manifests
from registry_server.services.browse import describe
from tests.support.clients import stalled_request


def test_an_image_its_config_and_layers() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + "a" * 64, "size": 100},
            "layers": [{"mediaType": "l", "digest": "sha256:" + "b" * 64, "size": 1000},
                       {"bogus": True}],
            "annotations": {"org.opencontainers.image.source": "https://example.com"},
        }
    ).encode()  # fmt: skip
    found = describe(body, manifests.OCI_MANIFEST)
    assert found.kind == "image" and found.size == 1100 and len(found.layers) == 1
    assert found.annotations == {"org.opencontainers.image.source": "https://example.com"}


def test_an_index_its_platforms_and_an_artifact() -> None:
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_INDEX,
            "manifests": [
                {"mediaType": manifests.OCI_MANIFEST, "digest": "sha256:" + "c" * 64, "size": 5,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": manifests.OCI_INDEX, "digest": "sha256:" + "d" * 64, "size": 6},
            ],
        }
    ).encode()  # fmt: skip
    found = describe(index, manifests.OCI_INDEX)
    assert found.kind == "index" and found.size is None
    assert [p.name for p in found.platforms] == ["linux/arm/v7", "index"]
    sbom = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": manifests.OCI_EMPTY_CONFIG,
                       "digest": "sha256:" + "e" * 64, "size": 2},
            "layers": [],
            "subject": {"mediaType": manifests.OCI_MANIFEST,
                        "digest": "sha256:" + "f" * 64, "size": 9},
        }
    ).encode()  # fmt: skip
    artifact = describe(sbom, manifests.OCI_MANIFEST)
    assert artifact.kind == "artifact" and artifact.artifact_type == "application/spdx+json"
    assert artifact.subject == "sha256:" + "f" * 64
    assert describe(b"not json", manifests.OCI_MANIFEST).kind == "image"


@pytest.mark.parametrize(
    ("given", "goes"),
    [
        (None, "/ui/"),
        ("/ui/repository?name=a", "/ui/repository?name=a"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/v2/", "/ui/"),
    ],
)
def test_a_login_only_ever_sends_the_browser_to_the_ui(given: str | None, goes: str) -> None:
    assert ui._next(given) == goes


def test_the_ui_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ui: {enabled: false}\n")
    assert config.load(path, env={}).ui.enabled is False
    assert config.load(None, env={}).ui.enabled is True
    path.write_text("ui: {enabled: 'no'}\n")
    with pytest.raises(config.ConfigError, match=r"ui\.enabled: expected true or false"):
        config.load(path, env={})


@pytest.mark.parametrize(
    ("host", "secure"), [("registry.example.com", True), ("localhost:5000", False)]
)
async def test_cookies_are_secure_behind_a_tls_proxy_at_the_external_url(
    tmp_path: Path, host: str, secure: bool
) -> None:
    """A TLS proxy not listed as trusted says nothing of HTTPS: an https external_url
    does, for requests to its host (found by review: the cookies went without Secure).
    Reached otherwise (a port-forward), the UI still works over plain HTTP."""
    settings = config.Config(
        storage=config.StorageConfig(root=tmp_path),
        http=config.HttpConfig(external_url="https://registry.example.com"),
    )
    async with TestClient(TestServer(build_app(settings))) as client:
        page = await client.get("/ui/login", headers={"Host": host})
        cookie = page.headers["Set-Cookie"]
        assert cookie.startswith("berth_csrf=")
        assert ("Secure" in cookie) is secure


async def test_a_page_over_http_may_not_post_to_the_ui_over_https(tmp_path: Path) -> None:
    """The Origin's scheme counts where the UI is served over HTTPS (here: at the host of
    an https external_url); an https page may post to a plain-HTTP UI (behind a TLS
    proxy the server was not told of)."""
    settings = config.Config(
        storage=config.StorageConfig(root=tmp_path),
        http=config.HttpConfig(external_url="https://registry.example.com"),
    )
    async with TestClient(TestServer(build_app(settings))) as client:
        for host, origin, allowed in (
            ("registry.example.com", "http://registry.example.com", False),
            ("registry.example.com", "https://registry.example.com", True),
            ("localhost:5000", "https://localhost:5000", True),
            ("localhost:5000", "http://localhost:5000", True),
        ):
            token = "t" * 43  # double submit: the field equals the cookie
            reply = await client.post(
                "/ui/login",
                data={"csrf": token, "username": "x", "password": "y"},
                headers={"Host": host, "Origin": origin, "Cookie": f"berth_csrf={token}"},
                allow_redirects=False,
            )
            assert (reply.status != 403) is allowed, (host, origin, reply.status)


async def test_a_form_gone_silent_is_refused(tmp_path: Path) -> None:
    """Forms are read like every other body: under the idle timeout, and bounded even
    when sent chunked (request.post() had neither)."""
    settings = config.Config(
        storage=config.StorageConfig(root=tmp_path),
        http=config.HttpConfig(body_idle_timeout_seconds=0.5),
    )
    async with TestClient(TestServer(build_app(settings))) as client:
        status, _ = await stalled_request(
            client.host,
            client.port,
            b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ncsrf=",
        )
        assert status == 400

        async def chunked() -> AsyncIterator[bytes]:  # 64 KiB, no length said
            for _ in range(64):
                yield b"x" * 1024

        big = await client.post(
            "/ui/login",
            data=chunked(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert big.status == 413
