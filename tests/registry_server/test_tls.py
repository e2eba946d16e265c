"""http.tls: its configuration, and the serving context's checks and reloads."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from registry_server import config
from registry_server.http import tls
from tests.support.control_plane import CertificateAuthority
from tests.support.tls import SecretVolume, expired_pair, rsa_pair, serving_pair


def _load(tmp_path: Path, http: dict[str, Any]) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"http": http}))
    return config.load(path, env={})


def test_tls_section(tmp_path: Path, ca: CertificateAuthority) -> None:
    pair = serving_pair(ca, "s")
    cfg = _load(
        tmp_path,
        {"addr": "127.0.0.1:5443", "tls": {"certificate": str(pair.cert), "key": str(pair.key)}},
    )
    assert cfg.http.tls == config.TlsConfig(certificate=pair.cert, key=pair.key)
    assert cfg.http.scheme == "https"
    assert _load(tmp_path, {}).http.scheme == "http"


@pytest.mark.parametrize(
    ("tls_section", "message"),
    [
        ({"certificate": ""}, "http.tls.certificate is required"),
        ({"key": ""}, "http.tls.key is required"),
        ({"ciphers": "x"}, "unknown keys"),
        ({"client_auth": "maybe"}, "http.tls.client_auth"),
        ({"min_version": "1.1"}, "http.tls.min_version"),
        ({"reload_interval_seconds": 0}, "reload_interval_seconds"),
        ({"client_ca": "/nonexistent/ca.crt"}, "http.tls.client_ca: cannot read"),
    ],
)
def test_invalid_tls_section(
    tmp_path: Path, ca: CertificateAuthority, tls_section: dict[str, Any], message: str
) -> None:
    pair = serving_pair(ca, "s")
    section = {"certificate": str(pair.cert), "key": str(pair.key), **tls_section}
    with pytest.raises(config.ConfigError, match=message):
        _load(tmp_path, {"tls": section})


def test_context_defaults(ca: CertificateAuthority, tmp_path: Path) -> None:
    pair = serving_pair(ca, "s")
    cfg = config.TlsConfig(certificate=pair.cert, key=pair.key)
    context = tls.ServingTls(cfg).context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    ciphers = {c["name"] for c in context.get_ciphers()}
    assert not any("CBC" in c or "RC4" in c or c.endswith("-SHA") for c in ciphers), ciphers
    mutual = config.TlsConfig(
        certificate=pair.cert, key=pair.key, client_ca=ca.cert_path, min_version="1.3"
    )
    context = tls.ServingTls(mutual).context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_start_refuses_a_bad_pair(ca: CertificateAuthority) -> None:
    old = expired_pair(ca, "old")
    with pytest.raises(tls.CertificateError, match="expired at"):
        tls.ServingTls(config.TlsConfig(certificate=old.cert, key=old.key))
    one, two = serving_pair(ca, "one"), serving_pair(ca, "two")
    with pytest.raises(tls.CertificateError, match="KEY_VALUES_MISMATCH"):
        tls.read_pair(config.TlsConfig(certificate=one.cert, key=two.key))


def test_reload_waits_for_settled_files_and_keeps_the_last_good_pair(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    first, second = serving_pair(ca, "first"), serving_pair(ca, "second")
    volume = SecretVolume(tmp_path / "secret", first.cert.read_bytes(), first.key.read_bytes())
    serving = tls.ServingTls(config.TlsConfig(certificate=volume.cert, key=volume.key))
    assert serving.check() is None  # unchanged
    volume.swap(second.cert.read_bytes(), first.key.read_bytes())  # mismatched
    assert serving.check() is None  # seen once: not settled yet
    assert serving.check() is None  # settled, refused
    assert serving.check() is None  # and not read again
    volume.swap_pair(second)
    assert serving.check() is None
    pair = serving.check()
    assert pair is not None and pair.cert_pem == second.cert.read_bytes()
    serving.apply(pair)
    assert serving.pair is pair
    assert serving.check() is None


async def test_after_a_reload_client_certificates_and_alpn_hold(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A connection handed to the new context still requires a client certificate from
    the CA and still answers ALPN with http/1.1 (the new context's settings)."""
    first, second = serving_pair(ca, "first"), rsa_pair(ca, "second")
    relay = ca.issue("relay", "relay", client=True)
    volume = SecretVolume(tmp_path / "secret", first.cert.read_bytes(), first.key.read_bytes())
    serving = tls.ServingTls(
        config.TlsConfig(
            certificate=volume.cert, key=volume.key, client_ca=ca.cert_path, min_version="1.2"
        )
    )
    volume.swap_pair(second)
    serving.check()
    pair = serving.check()
    assert pair is not None
    serving.apply(pair)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=serving.context)
    port = server.sockets[0].getsockname()[1]

    async def exchange(cert: bool) -> tuple[bytes, str | None]:
        client = ssl.create_default_context(cafile=str(ca.cert_path))
        client.maximum_version = ssl.TLSVersion.TLSv1_2  # the refusal comes in the handshake
        client.set_alpn_protocols(["h2", "http/1.1"])
        if cert:
            client.load_cert_chain(str(relay.cert), str(relay.key))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        writer.write(b"hello")
        got = await reader.read(5)
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.close()
        return got, alpn

    try:
        assert await exchange(cert=True) == (b"hello", "http/1.1")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await exchange(cert=False)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("sni", ["localhost", None])
async def test_a_reload_to_another_key_type_serves_only_the_new_certificate(
    ca: CertificateAuthority, tmp_path: Path, sni: str | None
) -> None:
    """OpenSSL holds one certificate per key type: loaded into the live context, an RSA
    pair replacing an EC one was added beside it and clients went on being shown the
    old certificate (found by review). With SNI and without (an address)."""
    first, second = serving_pair(ca, "old"), rsa_pair(ca, "new-rsa")
    volume = SecretVolume(tmp_path / "secret", first.cert.read_bytes(), first.key.read_bytes())
    serving = tls.ServingTls(config.TlsConfig(certificate=volume.cert, key=volume.key))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=serving.context)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    client.check_hostname = sni is not None

    async def presented() -> str:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=sni or ""
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    try:
        assert await presented() == "CN=berth-registry"
        volume.swap_pair(second)
        serving.check()
        pair = serving.check()
        assert pair is not None
        serving.apply(pair)
        assert await presented() == "CN=new-rsa"
    finally:
        server.close()
        await server.wait_closed()
