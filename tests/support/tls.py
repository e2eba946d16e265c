"""TLS for test registries: certificates from a test CA, the kubelet's Secret volume layout
with its atomic ``..data`` swap, and a registry process that serves HTTPS.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .control_plane import CertificateAuthority, KeyPair
from .processes import RegistryProcess, wait_until

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)


def serving_pair(ca: CertificateAuthority, stem: str) -> KeyPair:
    """A serving certificate for the loopback names, from ``ca``."""
    return ca.issue(stem, "berth-registry", server_names=LOOPBACK_NAMES, server_ips=LOOPBACK_IPS)


def rsa_pair(ca: CertificateAuthority, stem: str) -> KeyPair:
    """A serving certificate for the loopback names with an RSA key (the CA's are EC)."""
    return _pair(ca, stem, rsa.generate_private_key(65537, 2048), valid_hours=24, ago_hours=1)


def expired_pair(ca: CertificateAuthority, stem: str) -> KeyPair:
    """A serving certificate for the loopback names that expired an hour ago."""
    return _pair(ca, stem, ec.generate_private_key(ec.SECP256R1()), valid_hours=-1, ago_hours=48)


def _pair(
    ca: CertificateAuthority,
    stem: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    valid_hours: int,
    ago_hours: int,
) -> KeyPair:
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in LOOPBACK_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=ago_hours))
        .not_valid_after(now + datetime.timedelta(hours=valid_hours))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pair = KeyPair(ca.directory / f"{stem}.crt", ca.directory / f"{stem}.key")
    pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: ``tls.crt`` and ``tls.key`` are
    links into ``..data``, itself a link to a timestamped directory; ``swap`` replaces the
    pair at once by renaming a new ``..data`` link over the old one."""

    def __init__(self, directory: Path, cert: bytes, key: bytes) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._generation = 0
        self.swap(cert, key)
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", directory / name)

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    def swap(self, cert: bytes, key: bytes) -> None:
        self._generation += 1
        snapshot = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._generation}"
        target = self.directory / snapshot
        target.mkdir()
        (target / "tls.crt").write_bytes(cert)
        (target / "tls.key").write_bytes(key)
        os.symlink(snapshot, self.directory / "..data_tmp")
        os.replace(self.directory / "..data_tmp", self.directory / "..data")

    def swap_pair(self, pair: KeyPair) -> None:
        self.swap(pair.cert.read_bytes(), pair.key.read_bytes())


def served_serial(port: int, ca_file: Path | None = None, host: str = "127.0.0.1") -> int:
    """The serial number of the certificate a new connection to ``port`` is shown."""
    pem = ssl.get_server_certificate((host, port), ca_certs=str(ca_file) if ca_file else None)
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def serial_of(pair: KeyPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def https_status(
    url: str, ca_file: Path, timeout: float = 2.0, client: KeyPair | None = None
) -> int | None:
    """The status of a GET over TLS, the chain verified but not the name (a readiness
    check that also works for the servers that show a wrong name on purpose)."""
    context = client_context(ca_file)
    context.check_hostname = False
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


class TlsRegistryProcess(RegistryProcess):
    """Our registry serving HTTPS with ``volume``'s pair (clients trust ``ca_file``)."""

    def __init__(
        self,
        workdir: Path,
        volume: SecretVolume,
        ca_file: Path,
        *,
        config: dict[str, object] | None = None,
        tls: dict[str, object] | None = None,
        port: int | None = None,
        client: KeyPair | None = None,
    ) -> None:
        merged: dict[str, object] = dict(config or {})
        http = dict(merged.get("http") or {})  # type: ignore[call-overload]
        http["tls"] = {
            "certificate": str(volume.cert),
            "key": str(volume.key),
            "reload_interval_seconds": 0.2,
            **(tls or {}),
        }
        merged["http"] = http
        merged.setdefault("log", {"level": "info", "format": "json"})  # reasons in the log
        super().__init__("berth", workdir, port=port, config=merged)
        self.volume = volume
        self.ca_file = ca_file
        self.client = client  # what the readiness check shows under mutual TLS

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def start(self) -> TlsRegistryProcess:
        self.process.start()
        try:
            wait_until(
                lambda: (
                    https_status(f"{self.url}/v2/", self.ca_file, client=self.client) in (200, 401)
                ),
                timeout=self.ready_timeout,
                what=f"GET {self.url}/v2/",
                process=self.process,
            )
        except BaseException:
            self.process.stop()
            raise
        return self


def registry_ca(secrets: Sequence[Mapping[str, Any]], registry: str) -> str:
    """The CA of a Registry's generated serving certificate, from the Secrets a pod
    mounts (`podspec_runner.inputs`) or any list holding `<registry>-serving-tls`."""
    for secret in secrets:
        if secret["metadata"]["name"] == f"{registry}-serving-tls":
            return base64.b64decode(secret["data"]["ca.crt"]).decode()
    raise LookupError(f"no Secret {registry}-serving-tls among {len(secrets)} Secrets")


def trusting(ca_pem: str) -> ssl.SSLContext:
    """A client context trusting `ca_pem` only, names verified."""
    return ssl.create_default_context(cadata=ca_pem)


def cert_dir(ca_pem: str, directory: Path) -> Path:
    """A directory for skopeo's --cert-dir (and containers' certs.d) holding the CA."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_text(ca_pem)
    return directory


class BareTlsListener:
    """A loopback TLS listener with any pair at all (our server refuses to start with an
    expired one), answering every request 200: what a client's verification is up
    against. close() when done."""

    def __init__(self, pair: KeyPair) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pair.cert, pair.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.url = f"https://{self.host}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

    def close(self) -> None:
        self.listener.close()
