"""spec.tls: the generated CA and serving certificate (checked by a real TLS handshake),
when they are kept, renewed or replaced, a user's Secret, and what the reconcile writes."""

from __future__ import annotations

import base64
import datetime
import itertools
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from registry_operator import certificates, credentials, fetching, models, reconcile, serving_tls
from tests.registry_operator.fake_kube import FakeKube

OWNER = models.Owner(name="main", namespace="ns", uid="reg-uid")
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
NAMES = certificates.serving_names("main", "ns")


def _spec(raw: dict[str, Any] | None = None) -> models.Spec:
    return models.parse_spec(raw or {}, image="img:test", namespace="ns")


def _generated(
    ca: dict[str, str] | None = None,
    serving: dict[str, str] | None = None,
    now: datetime.datetime = NOW,
) -> serving_tls.Plan:
    return serving_tls.plan(_spec(), OWNER, ca, serving, now)


def _data(plan: serving_tls.Plan) -> tuple[dict[str, str], dict[str, str]]:
    """The two Secrets' data as the reconcile writes them (decoded)."""
    material = plan.material
    assert material is not None
    ca = {"ca.crt": material.ca_cert, "ca.key": material.ca_key}
    serving = {"tls.crt": material.cert, "tls.key": material.key, "ca.crt": material.ca_cert}
    return ca, serving


# --- a real handshake ------------------------------------------------------------------------


def _real_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)  # OpenSSL checks validity by the real clock


def _handshake(tmp_path: Path, serving: dict[str, str], trust: fetching.Trust, name: str) -> None:
    """Serve `serving` on loopback and connect as the operator does, verifying `name`."""
    (tmp_path / "tls.crt").write_text(serving["tls.crt"])
    (tmp_path / "tls.key").write_text(serving["tls.key"])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client refused us: what some tests expect

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        context = trust.context()
        assert context is not None
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize(
    "name",
    ["main.ns.svc", "main.ns.svc.cluster.local", "main", "main.ns", "localhost", "127.0.0.1"],
)
def test_the_generated_certificate_verifies_for_every_service_name(
    tmp_path: Path, name: str
) -> None:
    plan = _generated(now=_real_now())
    _, serving = _data(plan)
    _handshake(tmp_path, serving, fetching.Trust("https", plan.ca_pem), name)


def test_another_name_or_another_ca_is_refused(tmp_path: Path) -> None:
    plan = _generated(now=_real_now())
    _, serving = _data(plan)
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(tmp_path, serving, fetching.Trust("https", plan.ca_pem), "other.ns.svc")
    stranger = _generated(now=_real_now())  # another Registry's CA
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, serving, fetching.Trust("https", stranger.ca_pem), "main.ns.svc")
    # No CA known yet: nothing is trusted (never the system's CAs, never unverified).
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, serving, fetching.Trust("https", None), "main.ns.svc")


def test_the_ca_signs_server_certificates_only() -> None:
    from cryptography import x509

    plan = _generated()
    assert plan.material is not None
    ca = x509.load_pem_x509_certificate(plan.material.ca_cert.encode())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    leaf = x509.load_pem_x509_certificate(plan.material.cert.encode())
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc - NOW == certificates.SERVING_LIFETIME


# --- Generated: keep, renew, replace ---------------------------------------------------------


def test_a_sound_pair_is_kept_as_it_is() -> None:
    first = _generated()
    ca, serving = _data(first)
    again = _generated(ca, serving, NOW + datetime.timedelta(days=59))
    assert again.material == first.material
    assert again.events == ()
    assert again.condition == ("True", "Valid", "valid until 2026-04-01T00:00:00Z")


def test_the_certificate_is_renewed_a_month_before_expiry_by_the_same_ca() -> None:
    first = _generated()
    ca, serving = _data(first)
    later = NOW + datetime.timedelta(days=61)
    renewed = _generated(ca, serving, later)
    assert renewed.material is not None and first.material is not None
    assert renewed.material.ca_cert == first.material.ca_cert  # peers keep trusting it
    assert renewed.material.cert != first.material.cert
    assert renewed.material.key != first.material.key
    ((kind, reason, message),) = renewed.events
    assert (kind, reason) == ("Normal", "CertificateIssued")
    assert "the old one: tls.crt expires at 2026-04-01T00:00:00Z" in message
    assert certificates.not_after(renewed.material.cert) == later + certificates.SERVING_LIFETIME


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda ca, s: s.update({"tls.key": _generated().material.key}), "does not belong"),  # type: ignore[union-attr]
        (lambda ca, s: s.update({"tls.crt": "not a certificate"}), "unreadable"),
        (lambda ca, s: s.update({"ca.crt": _generated().ca_pem}), "is not the Registry's CA"),
    ],
)
def test_a_spoiled_serving_secret_is_issued_again(spoil: Any, why: str) -> None:
    ca, serving = _data(_generated())
    spoil(ca, serving)
    fixed = _generated(ca, serving)
    assert fixed.material is not None
    assert fixed.material.ca_cert == ca["ca.crt"]
    ((_, reason, message),) = fixed.events
    assert reason == "CertificateIssued" and why in message


def test_a_certificate_for_other_names_is_issued_again() -> None:
    ca, _ = _data(_generated())
    authority = certificates.Authority(ca["ca.crt"], ca["ca.key"])
    narrow = certificates.issue(authority, certificates.Names(("main.ns.svc",)), NOW)
    serving = {"tls.crt": narrow.cert_pem, "tls.key": narrow.key_pem, "ca.crt": ca["ca.crt"]}
    fixed = _generated(ca, serving)
    ((_, _, message),) = fixed.events
    assert "does not name main, main.ns, main.ns.svc.cluster.local, localhost" in message


def test_a_broken_ca_is_replaced_with_a_warning() -> None:
    ca, serving = _data(_generated())
    ca["ca.key"] = _data(_generated())[0]["ca.key"]
    fixed = _generated(ca, serving)
    assert fixed.material is not None and fixed.material.ca_cert != ca["ca.crt"]
    kinds = [(kind, reason) for kind, reason, _ in fixed.events]
    assert kinds == [
        ("Warning", "CertificateAuthorityReplaced"),
        ("Normal", "CertificateIssued"),
    ]
    assert "ca.key does not belong to ca.crt" in fixed.events[0][2]


# --- a user's Secret ------------------------------------------------------------------------


def _users(data: dict[str, str] | None, now: datetime.datetime = NOW) -> serving_tls.Plan:
    spec = _spec({"tls": {"secretRef": {"name": "cert"}}})
    return serving_tls.plan(spec, OWNER, None, data, now)


def test_a_users_secret_is_read_never_written() -> None:
    _, serving = _data(_generated())
    plan = _users(serving)
    assert plan.material is None and plan.events == ()
    assert plan.ca_pem == serving["ca.crt"]
    assert plan.report == {
        "mode": "Secret",
        "secretName": "cert",
        "notAfter": "2026-04-01T00:00:00Z",
    }
    assert plan.condition is not None and plan.condition[:2] == ("True", "Valid")


def test_a_users_secret_near_expiry_warns_and_an_expired_one_is_invalid() -> None:
    _, serving = _data(_generated())
    soon = _users(serving, NOW + datetime.timedelta(days=80))
    assert soon.condition is not None and soon.condition[:2] == ("True", "ExpiresSoon")
    assert "expires in 10 days" in soon.condition[2]
    gone = _users(serving, NOW + datetime.timedelta(days=91))
    assert gone.condition is not None and gone.condition[:2] == ("False", "SecretInvalid")


def test_a_users_chain_through_an_intermediate_to_a_root_bundle_is_valid() -> None:
    """Vault and cert-manager issuers often sign with an intermediate: tls.crt carries it,
    ca.crt holds the root (maybe in a bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = certificates.new_authority("root", NOW)
    root_cert = x509.load_pem_x509_certificate(root.cert_pem.encode())
    root_key = serialization.load_pem_private_key(root.key_pem.encode(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle_name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "intermediate")])
    middle = (
        x509.CertificateBuilder()
        .subject_name(middle_name)
        .issuer_name(root_cert.subject)
        .public_key(middle_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    middle_pem = middle.public_bytes(serialization.Encoding.PEM).decode()
    middle_authority = certificates.Authority(
        middle_pem,
        middle_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )
    leaf = certificates.issue(middle_authority, NAMES, NOW)
    other_root = _generated().ca_pem
    assert other_root is not None
    data = {
        "tls.crt": leaf.cert_pem + middle_pem,
        "tls.key": leaf.key_pem,
        "ca.crt": other_root + root.cert_pem,  # a bundle: another root, then ours
    }
    plan = _users(data)
    assert plan.condition is not None and plan.condition[:2] == ("True", "Valid"), plan
    # Without the intermediate in tls.crt the chain does not reach the root.
    data["tls.crt"] = leaf.cert_pem
    broken = _users(data)
    assert broken.condition is not None and broken.condition[1] == "SecretInvalid"


def test_a_missing_or_incomplete_users_secret_is_reported() -> None:
    missing = _users(None)
    assert missing.condition is not None and missing.condition[1] == "SecretMissing"
    _, serving = _data(_generated())
    del serving["ca.crt"]
    lacking = _users(serving)
    assert lacking.condition == (
        "False",
        "SecretInvalid",
        "Secret cert lacks ca.crt (cert-manager's keys)",
    )


def test_disabled_plans_nothing() -> None:
    plan = serving_tls.plan(_spec({"tls": {"mode": "Disabled"}}), OWNER, None, None, NOW)
    assert plan == serving_tls.Plan()


# --- through the reconcile -------------------------------------------------------------------


def _options(clock: list[datetime.datetime]) -> reconcile.Options:
    counter = itertools.count(1)
    return reconcile.Options(
        image="img:test",
        generators=credentials.Generators(
            signing_key=credentials.generate_signing_key,
            password=lambda: f"pw-{next(counter)}",
            hash=lambda password: f"$2b$04$fake-{password}",
        ),
        now=lambda: "2026-01-01T00:00:00Z",
        moment=lambda: clock[0],
    )


def _registry(kube: FakeKube, spec: dict[str, Any]) -> None:
    existing = kube.objects.get(("Registry", "ns", "main"))
    body: dict[str, Any] = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": "main", "namespace": "ns", "uid": "reg-uid", "generation": 1},
        "spec": spec,
    }
    if existing is not None and "status" in existing:
        body["status"] = existing["status"]
    kube.put(body)


def _decoded(kube: FakeKube, name: str) -> dict[str, str]:
    secret = kube.find("v1", "Secret", "ns", name)
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_reconcile_renews_without_rolling_the_pods() -> None:
    kube, clock = FakeKube(), [NOW]
    _registry(kube, {})
    first = reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    assert first.trust == fetching.Trust("https", _decoded(kube, "main-serving-ca")["ca.crt"])
    issued = _decoded(kube, "main-serving-tls")
    pod = kube.find("apps/v1", "Deployment", "ns", "main")
    assert pod is not None
    clock[0] = NOW + datetime.timedelta(days=75)
    renewed = reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    reasons = [e.reason for e in renewed.events]
    assert reasons == ["CertificateIssued"]  # no "Repaired" for our own new Secret
    assert _decoded(kube, "main-serving-tls")["tls.crt"] != issued["tls.crt"]
    # The server reloads the files: the pod template (and its checksum) did not change.
    assert kube.find("apps/v1", "Deployment", "ns", "main") == pod


def test_reconcile_warns_once_when_a_users_certificate_nears_expiry() -> None:
    kube, clock = FakeKube(), [NOW]
    _, serving = _data(_generated())
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "cert", "namespace": "ns"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in serving.items()},
        }
    )
    _registry(kube, {"tls": {"secretRef": {"name": "cert"}}})
    reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    assert kube.find("v1", "Secret", "ns", "main-serving-tls") is None
    clock[0] = NOW + datetime.timedelta(days=80)
    _registry(kube, {"tls": {"secretRef": {"name": "cert"}}})
    warned = reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    assert [(e.type, e.reason) for e in warned.events] == [("Warning", "CertificateExpiring")]
    _registry(kube, {"tls": {"secretRef": {"name": "cert"}}})
    again = reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    assert again.events == ()


def test_disabling_tls_deletes_the_generated_secrets() -> None:
    kube, clock = FakeKube(), [NOW]
    _registry(kube, {})
    reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    _registry(kube, {"tls": {"mode": "Disabled"}})
    outcome = reconcile.reconcile(kube, "ns", "main", _options(clock))  # type: ignore[arg-type]
    assert kube.find("v1", "Secret", "ns", "main-serving-tls") is None
    assert kube.find("v1", "Secret", "ns", "main-serving-ca") is None
    assert outcome.trust == fetching.Trust("http", None)
    registry = kube.find("berth.dev/v1alpha1", "Registry", "ns", "main")
    assert registry is not None
    assert registry["status"]["endpoint"] == "http://main.ns.svc:5000"
    assert "tls" not in registry["status"]
