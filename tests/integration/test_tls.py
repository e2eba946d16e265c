"""HTTPS served by the registry itself (http.tls), on real processes and clients.

Certificates come from a CA made in the test; the pair sits in a directory laid out as the
kubelet mounts a Secret, and rotation swaps its ``..data`` link as the kubelet does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests

from tests.integration.test_conformance import run_conformance
from tests.support.clients import oras, run_tool
from tests.support.containerd import Containerd
from tests.support.control_plane import CertificateAuthority
from tests.support.images import make_oci_layout
from tests.support.processes import (
    ManagedProcess,
    RegistryProcess,
    free_port,
    http_status,
    wait_until,
)
from tests.support.tls import (
    BareTlsListener,
    TlsRegistryProcess,
    expired_pair,
    https_status,
    serial_of,
    served_serial,
    serving_pair,
)
from tests.support.tools import REPO_ROOT

pytestmark = pytest.mark.integration

MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def _push_blob(registry: TlsRegistryProcess, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = requests.post(
        f"{registry.url}/v2/{repo}/blobs/uploads/?digest={digest}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        verify=str(registry.ca_file),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return digest


def test_conformance_over_tls(
    ca: CertificateAuthority,
    tls_registry: Callable[..., TlsRegistryProcess],
    tmp_path: Path,
) -> None:
    registry = tls_registry(serving_pair(ca, "server"), ca.cert_path)
    # Go's crypto/x509 takes SSL_CERT_FILE as the trusted roots on Linux.
    run_conformance(registry, tmp_path, {"OCI_TLS": "enabled", "SSL_CERT_FILE": str(ca.cert_path)})


def test_clients_verify_the_ca(
    ca: CertificateAuthority,
    tls_registry: Callable[..., TlsRegistryProcess],
    tmp_path: Path,
) -> None:
    registry = tls_registry(serving_pair(ca, "server"), ca.cert_path)
    digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=300_000)
    certs = tmp_path / "certs.d"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    ref = f"docker://{registry.host}/team-a/api:v1"
    # Without the CA the push is refused by the client's verification.
    refused = run_tool("skopeo", "copy", f"oci:{tmp_path / 'img'}:v1", ref, check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr
    run_tool(
        "skopeo", "copy", "--dest-cert-dir", certs, "--preserve-digests",
        f"oci:{tmp_path / 'img'}:v1", ref,
    )  # fmt: skip
    run_tool("skopeo", "copy", "--src-cert-dir", certs, ref, f"oci:{tmp_path / 'back'}:v1")
    trusted = {"SSL_CERT_FILE": str(ca.cert_path)}
    out = run_tool("crane", "digest", f"{registry.host}/team-a/api:v1", env=trusted)
    assert out.stdout.strip() == digest
    run_tool("crane", "copy", f"{registry.host}/team-a/api:v1", f"{registry.host}/b/c:v1",
             env=trusted)  # fmt: skip
    untrusted = run_tool("crane", "digest", f"{registry.host}/b/c:v1", check=False)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr


def test_oras_and_ctr_verify_the_ca(
    ca: CertificateAuthority,
    tls_registry: Callable[..., TlsRegistryProcess],
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    """The other two clients of the issue: oras (--ca-file) and containerd's ctr (the
    CA in a hosts.toml, as on a node), each refused without the CA."""
    registry = tls_registry(serving_pair(ca, "server"), ca.cert_path)
    work = tmp_path / "oras"
    work.mkdir()
    (work / "notes.txt").write_text("signed by nobody\n")
    ref = f"{registry.host}/oras/tls:v1"
    refused = oras("push", ref, "notes.txt:text/plain", cwd=work, check=False)
    assert refused.returncode != 0 and "certificate" in refused.stderr, refused.stderr
    oras("push", "--ca-file", ca.cert_path, ref, "notes.txt:text/plain", cwd=work)
    oras("pull", "--ca-file", ca.cert_path, "-o", tmp_path / "pulled", ref)
    assert (tmp_path / "pulled" / "notes.txt").read_text() == "signed by nobody\n"

    digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=200_000)
    image = f"{registry.host}/ctr/app:v1"
    certs = tmp_path / "certs.d"  # the CA alone: skopeo reads a *.key as a client key
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    run_tool("skopeo", "copy", "--dest-cert-dir", certs, "--preserve-digests",
             f"oci:{tmp_path / 'img'}:v1", f"docker://{image}")  # fmt: skip

    # containerd speaks plain HTTP to a loopback host unless its hosts.toml (what nodes
    # keep in certs.d) says https: once with no CA (refused), once with the CA.
    def hosts_dir(name: str, ca_line: str) -> Path:
        directory = tmp_path / name / registry.host
        directory.mkdir(parents=True)
        (directory / "hosts.toml").write_text(
            f'server = "https://{registry.host}"\n'
            f'[host."https://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n{ca_line}'
        )
        return tmp_path / name

    untrusting = containerd.run(
        "images", "pull", "--hosts-dir", str(hosts_dir("hosts-without-ca", "")),
        "--snapshotter", "native", image, check=False,
    )  # fmt: skip
    assert untrusting.returncode != 0 and "certificate" in untrusting.stderr, untrusting.stderr
    trusting = hosts_dir("hosts-with-ca", f'  ca = "{ca.cert_path}"\n')
    containerd.ctr("images", "pull", "--hosts-dir", str(trusting), "--snapshotter", "native", image)
    listed = [line.split() for line in containerd.ctr("images", "ls").splitlines()[1:] if line]
    assert [(row[0], row[2]) for row in listed] == [(image, digest)]


def test_replication_peers_verify_certificate_and_name(
    ca: CertificateAuthority,
    tls_registry: Callable[..., TlsRegistryProcess],
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
) -> None:
    other_dir = tmp_path / "other-ca"
    other_dir.mkdir()
    stranger = CertificateAuthority(other_dir, "someone-else")
    target = {"replication": {"region": "t"}}
    good = tls_registry(serving_pair(ca, "good"), ca.cert_path, config=target)
    wrong_name = tls_registry(
        ca.issue("wrong", "elsewhere", server_names=["elsewhere.example"]),
        ca.cert_path,
        config=target,
    )
    untrusted = tls_registry(serving_pair(stranger, "untrusted"), stranger.cert_path, config=target)
    expired = BareTlsListener(expired_pair(ca, "expired"))  # our server would not serve it
    peers = [
        {"name": name, "url": p.url, "ca_file": str(ca.cert_path)}
        for name, p in (
            ("good", good),
            ("wrong-name", wrong_name),
            ("untrusted", untrusted),
            ("expired", expired),
        )
    ]
    source = registry_process(
        config={
            "replication": {
                "region": "s",
                "anti_entropy_interval_seconds": 2,
                "retry_max_seconds": 1,
                "peers": peers,
            }
        }
    )
    digest = make_oci_layout(tmp_path / "img")
    run_tool("skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
             f"oci:{tmp_path / 'img'}:v1", f"docker://{source.host}/team-a/api:v1")  # fmt: skip

    def at(registry: TlsRegistryProcess) -> str | None:
        r = requests.head(
            f"{registry.url}/v2/team-a/api/manifests/v1",
            headers={"Accept": MANIFEST_ACCEPT},
            verify=str(registry.ca_file),
            timeout=5,
        )
        return r.headers.get("Docker-Content-Digest") if r.status_code == 200 else None

    def errors() -> dict[str, str]:
        status = requests.get(f"{source.url}/berth/v1/replication/status", timeout=5).json()
        return {p["name"]: str(p["last_error"] or "") for p in status["peers"]}

    wait_until(lambda: at(good) == digest, timeout=30, what="replication to the good peer")
    wait_until(
        lambda: all(errors()[n] for n in ("wrong-name", "untrusted", "expired")),
        timeout=30,
        what="the three bad peers refused",
    )
    expired.close()
    found = errors()
    print("peer errors:", found)
    assert not found["good"]
    assert "hostname" in found["wrong-name"].lower() or "match" in found["wrong-name"]
    assert "certificate" in found["untrusted"].lower()
    assert "expired" in found["expired"].lower()
    # Nothing reached them (asked with their own CA, the name not checked).
    for refused in (wrong_name, untrusted):
        url = f"{refused.url}/v2/team-a/api/manifests/v1"
        assert https_status(url, refused.ca_file) == 404


def _load(
    registry: TlsRegistryProcess, repo: str, digest: str, stop: threading.Event
) -> tuple[list[int], list[str]]:
    """Threads pulling the blob until ``stop``: half over kept-alive sessions, half on a new
    connection each time. Returns (counts, failures), filled in as they go."""
    counts = [0]
    failures: list[str] = []
    lock = threading.Lock()
    url = f"{registry.url}/v2/{repo}/blobs/{digest}"

    def run(keep_alive: bool) -> None:
        session = requests.Session() if keep_alive else None
        while not stop.is_set():
            try:
                getter = session.get if session is not None else requests.get
                r = getter(url, verify=str(registry.ca_file), timeout=20)
                ok = (
                    r.status_code == 200
                    and "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
                )
                problem = "" if ok else f"HTTP {r.status_code}"
            except requests.RequestException as exc:
                problem = repr(exc)
            with lock:
                counts[0] += 1
                if problem:
                    failures.append(problem)

    for i in range(6):
        threading.Thread(target=run, args=(i % 2 == 0,), daemon=True).start()
    return counts, failures


def _serves(registry: TlsRegistryProcess, serial: int, times: int = 12) -> bool:
    """Whether ``times`` new connections in a row (any worker) see ``serial``."""
    return all(served_serial(registry.port, registry.ca_file) == serial for _ in range(times))


def test_rotation_under_load_drops_nothing(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess]
) -> None:
    first = serving_pair(ca, "first")
    registry = tls_registry(first, ca.cert_path, config={"http": {"workers": 2}})
    digest = _push_blob(registry, "load/blob", os.urandom(2 << 20))
    stop = threading.Event()
    counts, failures = _load(registry, "load/blob", digest, stop)
    try:
        time.sleep(1.5)
        for n in range(3):
            pair = serving_pair(ca, f"rotated-{n}")
            started = time.monotonic()
            registry.volume.swap_pair(pair)
            wait_until(lambda p=pair: _serves(registry, serial_of(p)), timeout=15,  # type: ignore[misc]
                       what=f"new connections see rotation {n}")  # fmt: skip
            print(f"rotation {n}: new certificate served after {time.monotonic() - started:.2f} s")
            time.sleep(1.0)
    finally:
        stop.set()
        time.sleep(0.5)
    print(f"requests during rotation: {counts[0]}, failed: {len(failures)}")
    assert counts[0] > 50
    assert failures == [], failures[:5]
    assert registry.log_path.read_text().count("TLS certificate reloaded") >= 6  # 2 workers


def test_bad_new_certificate_keeps_the_old_one(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess], tmp_path: Path
) -> None:
    first = serving_pair(ca, "first")
    registry = tls_registry(first, ca.cert_path)
    other = serving_pair(ca, "other")
    expired = expired_pair(ca, "old")
    bad: list[tuple[str, bytes, bytes]] = [
        ("key of another certificate", other.cert.read_bytes(), first.key.read_bytes()),
        ("expired", expired.cert.read_bytes(), expired.key.read_bytes()),
        ("not PEM", b"garbage\n", first.key.read_bytes()),
        ("empty key", first.cert.read_bytes(), b""),
    ]  # fmt: skip
    for n, (what, cert, key) in enumerate(bad, start=1):
        registry.volume.swap(cert, key)
        wait_until(
            lambda n=n: registry.log_path.read_text().count("new TLS certificate refused") >= n,  # type: ignore[misc]
            timeout=10,
            what=f"the {what} pair refused",
        )
        assert _serves(registry, serial_of(first), times=4), what
        assert requests.get(f"{registry.url}/v2/", verify=str(ca.cert_path), timeout=5).ok
    log = registry.log_path.read_text()
    assert "expired at" in log and "refused by OpenSSL" in log
    # A good pair afterwards is taken up.
    fixed = serving_pair(ca, "fixed")
    registry.volume.swap_pair(fixed)
    wait_until(lambda: _serves(registry, serial_of(fixed), 3), timeout=10, what="good pair served")


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess], tmp_path: Path
) -> None:
    clients_dir = tmp_path / "clients"
    clients_dir.mkdir()
    clients = CertificateAuthority(clients_dir, "berth-clients")
    relay = clients.issue("relay", "node-proxy", client=True)
    registry = tls_registry(
        serving_pair(ca, "server"),
        ca.cert_path,
        tls={"client_ca": str(clients.cert_path)},
        client=relay,
    )
    url = f"{registry.url}/v2/"
    ok = requests.get(url, verify=str(ca.cert_path), cert=(str(relay.cert), str(relay.key)))
    assert ok.status_code == 200
    # No certificate, or one the client CA did not sign: the handshake fails (under TLS
    # 1.3 the client hears of it after sending its request: the connection is dropped).
    stranger = ca.issue("stranger", "someone", client=True)
    for cert in (None, (str(stranger.cert), str(stranger.key))):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, verify=str(ca.cert_path), cert=cert, timeout=5)


def test_node_proxy_serves_plain_http_and_speaks_verified_tls_to_the_registry(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess], tmp_path: Path
) -> None:
    registry = tls_registry(serving_pair(ca, "server"), ca.cert_path)
    relay_port = free_port()
    relay = ManagedProcess(
        "node-proxy",
        [sys.executable, "-m", "registry_server.node_proxy",
         "--listen", f"127.0.0.1:{relay_port}", "--upstream", registry.host,
         "--upstream-ca", ca.cert_path, "--upstream-server-name", "localhost"],
        tmp_path / "relay.log",
        cwd=REPO_ROOT,
    )  # fmt: skip
    relay.start()
    try:
        local = f"127.0.0.1:{relay_port}"
        wait_until(lambda: http_status(f"http://{local}/v2/") == 200, timeout=10, what="relay",
                   process=relay)  # fmt: skip
        # What a kubelet does: plain HTTP to localhost; the relay's hop is TLS.
        digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=500_000)
        run_tool("skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
                 f"oci:{tmp_path / 'img'}:v1", f"docker://{local}/team-a/api:v1")  # fmt: skip
        out = run_tool("crane", "digest", "--insecure", f"{local}/team-a/api:v1")
        assert out.stdout.strip() == digest
        blob = os.urandom(8 << 20)
        ref = _push_blob(registry, "big/blob", blob)
        pulled = requests.get(f"http://{local}/v2/big/blob/blobs/{ref}", timeout=30)
        assert pulled.status_code == 200 and pulled.content == blob
    finally:
        relay.stop()
    # A relay that does not trust the registry's CA passes nothing on.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    stranger = CertificateAuthority(other_dir, "stranger")
    untrusting = ManagedProcess(
        "node-proxy-untrusting",
        [sys.executable, "-m", "registry_server.node_proxy",
         "--listen", f"127.0.0.1:{relay_port}", "--upstream", registry.host,
         "--upstream-ca", stranger.cert_path],
        tmp_path / "relay2.log",
        cwd=REPO_ROOT,
    )  # fmt: skip
    untrusting.start()
    try:
        wait_until(lambda: _listening(relay_port), timeout=10, what="relay", process=untrusting)
        assert http_status(f"http://127.0.0.1:{relay_port}/v2/") is None
        wait_until(lambda: "certificate verify failed" in untrusting.log_tail(), timeout=5,
                   what="the refusal logged")  # fmt: skip
    finally:
        untrusting.stop()


def _realm(url: str, **kwargs: Any) -> str:
    challenge = requests.get(f"{url}/v2/", timeout=10, **kwargs).headers["WWW-Authenticate"]
    return challenge.split('realm="', 1)[1].split('"', 1)[0]


def test_the_token_realm_behind_the_relay_names_what_its_clients_reach(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess], tmp_path: Path
) -> None:
    """Kubelets speak plain HTTP to the node proxy, which re-encrypts: the server sees TLS,
    yet the realm in their challenge must be http://<the proxy's address>, or they fetch
    tokens with HTTPS from a plain listener and every pull fails (http.relayed_hosts)."""
    relay_port = free_port()
    local = f"127.0.0.1:{relay_port}"
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    config = {"http": {"relayed_hosts": [local]}, "auth": {"htpasswd": str(htpasswd)}}
    registry = tls_registry(serving_pair(ca, "server"), ca.cert_path, config=config)
    relay = ManagedProcess(
        "node-proxy",
        [sys.executable, "-m", "registry_server.node_proxy",
         "--listen", local, "--upstream", registry.host,
         "--upstream-ca", ca.cert_path, "--upstream-server-name", "localhost"],
        tmp_path / "relay.log",
        cwd=REPO_ROOT,
    )  # fmt: skip
    relay.start()
    try:
        wait_until(lambda: http_status(f"http://{local}/v2/") == 401, timeout=10, what="relay",
                   process=relay)  # fmt: skip
        assert _realm(f"http://{local}") == f"http://{local}/token"
        # Clients reaching the server itself keep https.
        assert _realm(registry.url, verify=str(ca.cert_path)) == f"{registry.url}/token"
        # A real client through the relay, with credentials: the whole token dance.
        digest = make_oci_layout(tmp_path / "img", layers=2, layer_size=100_000)
        run_tool("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "alice:secret",
                 f"oci:{tmp_path / 'img'}:v1", f"docker://{local}/team-a/api:v1")  # fmt: skip
        out = run_tool("skopeo", "inspect", "--tls-verify=false", "--creds", "alice:secret",
                       "--format", "{{.Digest}}", f"docker://{local}/team-a/api:v1")  # fmt: skip
        assert out.stdout.strip() == digest
    finally:
        relay.stop()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
