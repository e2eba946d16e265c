"""The certificates of `spec.tls.mode: Generated`: a CA per Registry and the serving
certificate it issues for the Service's names. Pure: PEM text and a clock in, PEM text
and reasons out; the reconcile stores them in Secrets.

ECDSA P-256 keys: every client here (Go's crypto/tls in containerd, crane, skopeo and
oras, OpenSSL in Python) speaks it, and signing and handshakes cost less than RSA.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
SERVING_LIFETIME = datetime.timedelta(days=90)
# Renewed with a third of its life left: a month of retries before anything expires.
RENEW_BEFORE = datetime.timedelta(days=30)
# Any certificate the Registry serves (a user's too) gets a Warning this close to expiry.
WARN_BEFORE = datetime.timedelta(days=14)
# Issued a little in the past: clocks of clients are not all exactly right.
BACKDATE = datetime.timedelta(minutes=5)

# The keys of the two Secrets. The serving Secret has cert-manager's layout, so a
# user's Secret (secretRef) and a generated one are mounted the same way.
CERT_KEY = "tls.crt"
KEY_KEY = "tls.key"
CA_KEY = "ca.crt"
CA_PRIVATE_KEY = "ca.key"


class CertificateProblem(ValueError):
    """PEM text that is not a usable certificate, key or CA."""


@dataclasses.dataclass(frozen=True)
class Authority:
    cert_pem: str
    key_pem: str


@dataclasses.dataclass(frozen=True)
class Serving:
    cert_pem: str
    key_pem: str
    ca_pem: str


@dataclasses.dataclass(frozen=True)
class Names:
    """What a serving certificate must name (subject alternative names)."""

    dns: tuple[str, ...]
    ips: tuple[str, ...] = ()


def serving_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> Names:
    """Every name an in-cluster client may use for the Service, and the loopback names
    (`kubectl port-forward` to localhost then verifies too; only clients trusting this
    Registry's own CA accept them, so they lend no one else anything)."""
    dns = (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{cluster_domain}",
        "localhost",
    )
    return Names(dns=dns, ips=("127.0.0.1", "::1"))


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def new_authority(common_name: str, now: datetime.datetime | None = None) -> Authority:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    moment = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Berth"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - BACKDATE)
        .not_valid_after(moment + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(_cert_pem(cert), _key_pem(key))


def issue(
    authority: Authority,
    names: Names,
    now: datetime.datetime | None = None,
    lifetime: datetime.timedelta = SERVING_LIFETIME,
) -> Serving:
    """A serving certificate for `names`, signed by `authority`, with a new key."""
    ca_cert = _load_cert(authority.cert_pem, "the CA certificate")
    ca_key = serialization.load_pem_private_key(authority.key_pem.encode(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateProblem("the CA key is not an ECDSA key")
    moment = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names.dns]
    alternatives += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in names.ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.dns[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - BACKDATE)
        .not_valid_after(min(moment + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Serving(_cert_pem(cert), _key_pem(key), authority.cert_pem)


def _load_cert(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise CertificateProblem(f"{what} is not a PEM certificate") from None


def _load_certs(pem: str, what: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise CertificateProblem(f"{what} is not a PEM certificate") from None
    return found


def authority_problem(authority: Authority, now: datetime.datetime | None = None) -> str | None:
    """Why a stored CA cannot be used to issue any more (None: it can)."""
    try:
        cert = _load_cert(authority.cert_pem, "ca.crt")
        key = serialization.load_pem_private_key(authority.key_pem.encode(), password=None)
    except (CertificateProblem, ValueError, TypeError) as exc:
        return f"unreadable: {exc}"
    if cert.public_key() != key.public_key():
        return "ca.key does not belong to ca.crt"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        return "ca.crt is not a CA certificate"
    if cert.not_valid_after_utc - _now(now) < RENEW_BEFORE:
        return f"the CA expires at {rfc3339(cert.not_valid_after_utc)}"
    return None


def not_after(cert_pem: str) -> datetime.datetime:
    """When the first certificate of a chain (the server's own) expires."""
    certs = _load_certs(cert_pem, "tls.crt")
    return certs[0].not_valid_after_utc


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def serving_problem(
    serving: Serving,
    names: Names,
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = RENEW_BEFORE,
) -> str | None:
    """Why a serving certificate should be issued again (None: keep it). Checks what a
    client would: the key matches, the CA signed it, every name is in it, and it does
    not expire within `renew_before`."""
    try:
        chain = _load_certs(serving.cert_pem, CERT_KEY)
        anchors = _load_certs(serving.ca_pem, CA_KEY)
        key = serialization.load_pem_private_key(serving.key_pem.encode(), password=None)
    except (CertificateProblem, ValueError, TypeError) as exc:
        return f"unreadable: {exc}"
    cert = chain[0]
    if cert.public_key() != key.public_key():
        return f"{KEY_KEY} does not belong to {CERT_KEY}"
    if not _chains_to(chain, anchors):
        return f"{CERT_KEY} is not signed by {CA_KEY}"
    missing = missing_names(cert, names)
    if missing:
        return f"{CERT_KEY} does not name {', '.join(missing)}"
    left = cert.not_valid_after_utc - _now(now)
    if left < renew_before:
        return f"{CERT_KEY} expires at {rfc3339(cert.not_valid_after_utc)}"
    return None


def _chains_to(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> bool:
    """Whether the leaf (chain[0]) leads to one of `anchors` through the intermediates
    the chain carries (a user's issuer may sign with an intermediate and give its root as
    ca.crt; ca.crt may be a bundle)."""
    current, rest = chain[0], list(chain[1:])
    for _ in range(len(chain)):
        if any(_signed_by(current, anchor) for anchor in anchors):
            return True
        issuer = next((c for c in rest if _signed_by(current, c)), None)
        if issuer is None:
            return False
        rest.remove(issuer)
        current = issuer
    return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def missing_names(cert: x509.Certificate, names: Names) -> Sequence[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [*names.dns, *names.ips]
    dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    wanted_ips = [str(ipaddress.ip_address(ip)) for ip in names.ips]
    return [n for n in names.dns if n.lower() not in dns] + [
        ip for ip in wanted_ips if ip not in ips
    ]
