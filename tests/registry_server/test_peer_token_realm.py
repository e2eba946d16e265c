"""The replicator's credentials go only to the peer itself.

A fake peer (an aiohttp server in the test) answers 401 with a Bearer challenge whose
realm it chooses; a second server stands in for a foreign token service and records what
reaches it. The peer's credentials must reach a realm only at the peer's own origin, or
one the peer's config names, and never over http when the peer is https.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from registry_server import config
from registry_server.config import PeerConfig
from registry_server.events.peer_client import PeerClient, PeerError

DIGEST = "sha256:" + "a" * 64
BASIC = "Basic " + base64.b64encode(b"replicator:s3cret").decode()


class Recorder:
    """Every request a server saw: (path, Authorization header)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def credentials(self) -> list[str | None]:
        return [auth for _, auth in self.seen]


def token_service(recorder: Recorder) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        recorder.seen.append((request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != BASIC:
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"token": "the-token"})

    app = web.Application()
    app.router.add_get("/token", token)
    return app


def registry(recorder: Recorder, realm: Callable[[web.Request], str]) -> web.Application:
    """A registry whose challenge names `realm(request)`; it serves /token itself too."""

    async def blob(request: web.Request) -> web.Response:
        recorder.seen.append((request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != "Bearer the-token":
            challenge = f'Bearer realm="{realm(request)}",service="peer"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        return web.Response(status=200)

    app = token_service(recorder)
    app.router.add_route("HEAD", "/v2/{repo:.+}/blobs/{digest}", blob)
    return app


Serve = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def blob_exists(peer: PeerConfig) -> bool:
    async with aiohttp.ClientSession() as session:
        return await PeerClient(peer, session).blob_exists("a/b", DIGEST)


def peer_config(peer_url: str, **extra: object) -> PeerConfig:
    return PeerConfig(name="p", url=peer_url, username="replicator", password="s3cret", **extra)  # type: ignore[arg-type]


async def test_a_realm_at_the_peers_origin_gets_the_credentials(serve: Serve) -> None:
    seen = Recorder()
    peer = await serve(registry(seen, lambda r: f"http://{r.host}/token"))
    assert await blob_exists(peer_config(url(peer)))
    assert ("/token", BASIC) in seen.seen


async def test_a_relative_realm_is_the_peers_own(serve: Serve) -> None:
    seen = Recorder()
    peer = await serve(registry(seen, lambda r: "/token"))
    assert await blob_exists(peer_config(url(peer)))
    assert ("/token", BASIC) in seen.seen


async def test_a_foreign_realm_gets_nothing(serve: Serve) -> None:
    foreign = Recorder()
    elsewhere = await serve(token_service(foreign))
    seen = Recorder()
    peer = await serve(registry(seen, lambda r: f"{url(elsewhere)}/token"))
    with pytest.raises(PeerError, match=r"token realm .* is not at the peer's origin") as refused:
        await blob_exists(peer_config(url(peer)))
    assert refused.value.retryable  # the peer may be fixed; the status shows the error
    assert foreign.seen == []
    # The peer itself got the Basic credentials on the first try (its own origin), no more.
    assert seen.credentials() == [BASIC]


async def test_a_realm_named_in_the_config_gets_them(serve: Serve) -> None:
    foreign = Recorder()
    elsewhere = await serve(token_service(foreign))
    peer = await serve(registry(Recorder(), lambda r: f"{url(elsewhere)}/token?x=1"))
    assert await blob_exists(peer_config(url(peer), token_realm=f"{url(elsewhere)}/token"))
    assert foreign.credentials() == [BASIC]
    # Another path at that origin is not the realm that was named.
    foreign.seen.clear()
    other = await serve(registry(Recorder(), lambda r: f"{url(elsewhere)}/other"))
    with pytest.raises(PeerError, match="token realm"):
        await blob_exists(peer_config(url(other), token_realm=f"{url(elsewhere)}/token"))
    assert foreign.seen == []


def _certificate(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "peer.crt", tmp_path / "peer.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


async def test_an_https_peer_never_sends_them_over_http(serve: Serve, tmp_path: Path) -> None:
    context, ca = _certificate(tmp_path)
    plain = Recorder()
    cleartext = await serve(token_service(plain))
    seen = Recorder()
    # Same host, the http scheme: a downgrade, refused whatever the port.
    peer = await serve(registry(seen, lambda r: f"{url(cleartext)}/token"), context)
    assert url(peer).startswith("https://")
    with pytest.raises(PeerError, match="token realm"):
        await blob_exists(peer_config(url(peer), ca_file=ca))
    assert plain.seen == []
    # The same realm over https at the peer's origin is fine.
    seen_tls = Recorder()
    tls_peer = await serve(registry(seen_tls, lambda r: f"https://{r.host}/token"), context)
    assert await blob_exists(peer_config(url(tls_peer), ca_file=ca))


def test_config_refuses_an_http_realm_for_an_https_peer(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    peer = "    - {name: p, url: 'https://peer.example.com', token_realm: '%s'}\n"
    head = "replication:\n  region: eu\n  peers:\n"
    path.write_text(head + peer % "http://auth.example.com/token")
    with pytest.raises(config.ConfigError, match="token_realm must be https"):
        config.load(path, env={})
    path.write_text(head + peer % "auth.example.com/token")
    with pytest.raises(config.ConfigError, match="token_realm must start with"):
        config.load(path, env={})
    path.write_text(head + peer % "https://auth.example.com/token")
    loaded = config.load(path, env={})
    assert loaded.replication.peers[0].token_realm == "https://auth.example.com/token"


async def test_a_location_elsewhere_gets_no_credentials(serve: Serve) -> None:
    storage = Recorder()

    async def upload(request: web.Request) -> web.Response:
        storage.seen.append((request.path, request.headers.get("Authorization")))
        return web.Response(status=201)

    backend = web.Application()
    backend.router.add_put("/upload", upload)
    elsewhere = await serve(backend)

    async def start(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != BASIC:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="p"'})
        return web.Response(status=202, headers={"Location": f"{url(elsewhere)}/upload"})

    app = web.Application()
    app.router.add_post("/v2/{repo:.+}/blobs/uploads/", start)
    peer = await serve(app)
    async with aiohttp.ClientSession() as session:
        client = PeerClient(peer_config(url(peer)), session)
        location = await client.start_upload("a/b", DIGEST, None)
        assert location is not None
        await client.request("PUT", location, client._push("a/b"), expect=(201,))
    assert storage.credentials() == [None]


async def test_credentials_from_files_are_read_at_every_use(serve: Serve, tmp_path: Path) -> None:
    """A mounted Secret's username and password keys (an upstream's credentialsSecretRef):
    both files are read for each token request, so a rotated pair needs no restart; a
    username holding ':' is refused without sending anything."""
    user, secret = tmp_path / "username", tmp_path / "password"
    user.write_text("replicator\n")
    secret.write_text("s3cret\n")
    seen = Recorder()
    peer = await serve(registry(seen, lambda r: "/token"))
    files = PeerConfig(name="p", url=url(peer), username_file=user, password_file=secret)
    assert await blob_exists(files)
    assert ("/token", BASIC) in seen.seen
    user.write_text("other")
    seen.seen.clear()
    with pytest.raises(PeerError, match="token request: HTTP 401"):  # not its account
        await blob_exists(files)
    assert ("/token", "Basic " + base64.b64encode(b"other:s3cret").decode()) in seen.seen
    user.write_text("a:b")
    seen.seen.clear()
    with pytest.raises(PeerError, match="holds ':'"):
        await blob_exists(files)
    assert all(auth is None or auth.startswith("Bearer") for auth in seen.credentials())
    # A Secret not mounted (yet): the peer's failure, as an unreachable peer's would be
    # (an upstream's cached copies are then served), not an unhandled error.
    user.unlink()
    with pytest.raises(PeerError, match=r"credentials: .*username") as missing:
        await blob_exists(files)
    assert missing.value.retryable
