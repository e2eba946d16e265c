"""spec.tls on real components: the operator renews a Registry's generated certificate
while its pod serves under load (no failed request, no restart), and the operator's own
calls refuse a server whose certificate is expired, for another name or from another CA.

The operator runs against a real control plane; the pod runs from its pod spec
(tests/support/podspec_runner.py), its Secret volumes kept current as the kubelet does.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from registry_operator import certificates, fetching
from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.support import podspec_runner
from tests.support.control_plane import CertificateAuthority, ControlPlane
from tests.support.operator_process import OperatorProcess, operator_running, registry_condition
from tests.support.operator_process import wait_for as _wait
from tests.support.tls import (
    BareTlsListener,
    TlsRegistryProcess,
    expired_pair,
    serving_pair,
)

pytestmark = pytest.mark.integration

API = "berth.dev/v1alpha1"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, overrides: Path
) -> Iterator[OperatorProcess]:
    with operator_running(
        control_plane,
        tmp_path_factory.mktemp("operator"),
        "--resync-seconds=30",
        f"--endpoint-overrides={overrides}",
    ) as running:
        yield running


def _decoded(kube: kube_client.Client, namespace: str, name: str) -> dict[str, str]:
    secret = kube.get("v1", "Secret", namespace, name)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def _serial(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def _served_serial(pod: podspec_runner.RunningPod) -> int:
    host, port = pod.host.rsplit(":", 1)
    context = pod.context
    assert context is not None
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return _serial(ssl.DER_cert_to_PEM_cert(der))


class Load:
    """Clients pulling over new TLS connections (each handshake sees the certificate of
    the moment), verified against the Registry's CA, counting what failed."""

    def __init__(self, url: str, context: ssl.SSLContext, threads: int = 4) -> None:
        self.url, self.context = url, context
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=10, context=self.context):
                    pass
            except urllib.error.HTTPError as exc:
                if exc.code != 401:  # the challenge is an answer
                    with self._lock:
                        self.failures.append(f"HTTP {exc.code}")
            except OSError as exc:
                with self._lock:
                    self.failures.append(repr(exc))
            with self._lock:
                self.done += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def test_renewal_under_load_fails_no_request_and_rolls_no_pod(
    operator: OperatorProcess,
    kube: kube_client.Client,
    control_plane: ControlPlane,
    namespace: str,
    overrides: Path,
    tmp_path: Path,
) -> None:
    document = {"apiVersion": API, "kind": "Registry", "metadata": {"name": "main"}, "spec": {}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))

    def fetch() -> tuple[list[Any], list[Any]] | None:
        deployment = kube.find("apps/v1", "Deployment", namespace, "main")
        if deployment is None:
            return None
        return podspec_runner.inputs(
            lambda kind, ns, name: kube.find("v1", kind, ns, name), namespace, deployment
        )

    _wait(fetch, operator, "the Deployment and every Secret its pod mounts")
    deployment = kube.get("apps/v1", "Deployment", namespace, "main")
    template = deployment["spec"]["template"]
    inputs = fetch()
    assert inputs is not None
    pod = podspec_runner.start(
        deployment,
        *inputs,
        tmp_path / "pod",
        fetch=lambda: fetch() or ([], []),
        follow_interval=0.5,
    )
    try:
        overrides.write_text(json.dumps({f"{namespace}/main": pod.url}))
        ready = _wait(
            lambda: (
                (c := registry_condition(kube, namespace, "main", "CertificateReady"))
                and c.get("reason") == "Valid"
                and c
            ),
            operator,
            "CertificateReady=True",
        )
        assert ready["status"] == "True"
        first = _decoded(kube, namespace, names.serving_secret("main"))
        assert _served_serial(pod) == _serial(first["tls.crt"])

        # A certificate 5 days from its end, as if 85 of its 90 days had passed: the
        # operator issues a new one at the next reconcile (this Secret's watch event).
        ca = _decoded(kube, namespace, names.serving_ca_secret("main"))
        authority = certificates.Authority(ca["ca.crt"], ca["ca.key"])
        wanted = certificates.serving_names("main", namespace)
        now = datetime.datetime.now(datetime.UTC)
        aging = certificates.issue(authority, wanted, now - datetime.timedelta(days=85))
        context = pod.context
        assert context is not None
        with Load(pod.url, context) as load:
            _wait(lambda: load.done > 20, operator, "load before the swap")
            control_plane.kubectl(
                "patch", "secret", names.serving_secret("main"), "-n", namespace,
                "--type=merge", "-p", json.dumps({"data": {
                    "tls.crt": base64.b64encode(aging.cert_pem.encode()).decode(),
                    "tls.key": base64.b64encode(aging.key_pem.encode()).decode(),
                }}),
            )  # fmt: skip
            renewed = _wait(
                lambda: (
                    (d := _decoded(kube, namespace, names.serving_secret("main")))["tls.crt"]
                    not in (first["tls.crt"], aging.cert_pem)
                    and d
                ),
                operator,
                "a renewed certificate in the Secret",
            )
            _wait(
                lambda: _served_serial(pod) == _serial(renewed["tls.crt"]),
                operator,
                "the pod serving the renewed certificate",
            )
            served_before = load.done
            _wait(lambda: load.done > served_before + 20, operator, "load after the swap")
        assert load.failures == [], load.failures[:5]
        assert certificates.not_after(renewed["tls.crt"]) > now + datetime.timedelta(days=89)
        # Same CA (peers and node proxies keep trusting it), same pod template: no rollout.
        assert renewed["ca.crt"] == first["ca.crt"]
        assert kube.get("apps/v1", "Deployment", namespace, "main")["spec"]["template"] == template
        assert pod.process.running, "the server kept running"
        events = control_plane.kubectl_json("get", "events", "-n", namespace)["items"]
        issued = [e["message"] for e in events if e["reason"] == "CertificateIssued"]
        assert any("the old one: tls.crt expires at" in m for m in issued), issued
    except BaseException:
        print(pod.log_tail())
        raise
    finally:
        pod.stop()


def test_the_operator_refuses_an_expired_a_misnamed_and_an_untrusted_certificate(
    ca: CertificateAuthority, tls_registry: Callable[..., TlsRegistryProcess], tmp_path: Path
) -> None:
    """What the operator's calls (`fetching`, with the Trust a reconcile computed) do
    against real servers: only the right certificate gets an answer."""
    trusted = fetching.Trust("https", ca.cert_path.read_text()).context()
    good = tls_registry(serving_pair(ca, "good"), ca.cert_path)
    assert fetching.readiness(good.url, trusted).code == 200

    # Our server refuses to start with an expired pair: a bare TLS listener shows it.
    expired = BareTlsListener(expired_pair(ca, "expired"))
    misnamed = tls_registry(
        ca.issue("misnamed", "elsewhere", server_names=("elsewhere.example",)), ca.cert_path
    )
    other_dir = tmp_path / "other-ca"
    other_dir.mkdir()
    stranger = CertificateAuthority(other_dir, "stranger")
    untrusted = tls_registry(serving_pair(stranger, "untrusted"), stranger.cert_path)
    for server, why in (
        (expired, "certificate has expired"),
        (misnamed, "match"),
        (untrusted, "unable to get local issuer certificate"),
    ):
        answer = fetching.readiness(server.url, trusted)
        assert answer.code is None and why in answer.text, answer
        assert fetching.replication_status(server.url, "admin", "pw", trusted).error
    # No CA known: nothing is trusted, not even the good server (no fallback to the
    # system's CAs or to no verification).
    blind = fetching.Trust("https", None).context()
    assert fetching.readiness(good.url, blind).code is None
    expired.close()
