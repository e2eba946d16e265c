"""A real Kubernetes control plane on loopback, started the way envtest does it.

etcd, kube-apiserver and kube-controller-manager (built by `make tools`) run as
local processes. A throwaway CA signs the API server's serving certificate and the
client certificates; the admin kubeconfig authenticates as a member of
system:masters. There is no kubelet and no scheduler: objects are stored and the
controllers that need no node (garbage collector, namespaces, service accounts,
deployments, replica sets) act on them, but pods never run.

With `node_ip` the control plane is made for a real node (tests/support/node.py): the
API server listens on that address (pods reach it through the `kubernetes` Service),
publishes it as its endpoint, admits service accounts, and the controllers that nodes
need (endpoints, daemon sets, volume binding, ...) run too.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .processes import ManagedProcess, free_port, http_status, wait_until
from .tools import REPO_ROOT, require_tool

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

# Service addresses are virtual; with a node, kube-proxy translates them. The range is
# one that tests/support/node.py blackholes on the host, so a packet to a Service that
# has no rule yet is dropped instead of leaving the machine.
SERVICE_CLUSTER_IP_RANGE = "198.18.128.0/24"
# The first address of the range: the `kubernetes` Service in `default`.
KUBERNETES_SERVICE_IP = "198.18.128.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CRD_DIR = REPO_ROOT / "crds"

# Controllers that are useful without nodes. Pods created by the deployment and
# replica set controllers stay Pending.
DEFAULT_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
)
# What a cluster with a node needs on top: Service endpoints for kube-proxy, daemon sets,
# PVC binding (the node fixture provisions the volumes), pod garbage collection.
NODE_CONTROLLERS = (
    *DEFAULT_CONTROLLERS,
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "daemonset-controller",
    "statefulset-controller",
    "job-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "pod-garbage-collector-controller",
    # Lifts the not-ready taint the kubelet registers its node with.
    "node-lifecycle-controller",
    "disruption-controller",
)


# --- certificates -----------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything the control plane's TLS and service-account tokens need."""

    ca_cert: Path
    apiserver: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    # Signs service-account tokens ("EC PRIVATE KEY"); the public half verifies them.
    service_account_key: Path
    service_account_public_key: Path


def _write_key(
    key: ec.EllipticCurvePrivateKey,
    path: Path,
    key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


class CertificateAuthority:
    """A self-signed CA, valid for a day, that issues leaf certificates."""

    def __init__(self, directory: Path, name: str = "berth-test-ca") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = _name(name)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "ca.crt"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key, directory / "ca.key")

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server_names: Sequence[str] = (),
        server_ips: Sequence[str] = (),
        client: bool = False,
    ) -> KeyPair:
        """Write `<stem>.crt` and `<stem>.key`: a serving and/or client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = []
        if server_names or server_ips:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        pair = KeyPair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair


def write_kubeconfig(path: Path, *, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    """A kubeconfig with one cluster, user and context, referring to cert files."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "berth-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(client.cert),
                    "client-key": str(client.key),
                },
            }
        ],
        "contexts": [{"name": "berth-test", "context": {"cluster": "berth-test", "user": user}}],
        "current-context": "berth-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# --- the control plane ------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under one working directory.

    Use `start()` / `stop()` (or the `control_plane` fixture). After start:
    `kubeconfig` is an admin kubeconfig, `server` the API server URL, and
    `kubectl(...)` runs the matching kubectl against it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        controllers: Iterable[str] | None = None,
        ready_timeout: float = 120.0,
        node_ip: str | None = None,
        service_cluster_ip_range: str = SERVICE_CLUSTER_IP_RANGE,
    ) -> None:
        self.workdir = workdir
        # A wider range for thousands of Services (the operator bench's 1,000 Registries);
        # it must start at KUBERNETES_SERVICE_IP, and the node fixture routes only the
        # default one.
        self.service_cluster_ip_range = service_cluster_ip_range
        self.node_ip = node_ip
        self.address = node_ip or "127.0.0.1"
        if controllers is None:
            controllers = NODE_CONTROLLERS if node_ip else DEFAULT_CONTROLLERS
        self.controllers = tuple(controllers)
        self.ready_timeout = ready_timeout
        self.pki = workdir / "pki"
        self.logs = workdir / "logs"
        self.processes: list[ManagedProcess] = []
        self.api_port = 0
        self.etcd_url = ""
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.kubectl_path = Path("kubectl")
        self.startup_seconds = 0.0
        self._pki: Pki | None = None
        self._ca: CertificateAuthority | None = None

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    @property
    def ca(self) -> CertificateAuthority:
        """The cluster CA, to issue node components their certificates."""
        if self._ca is None:
            raise RuntimeError("the control plane has not been started")
        return self._ca

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def certs(self) -> Pki:
        if self._pki is None:
            raise RuntimeError("the control plane has not been started")
        return self._pki

    # -- startup --

    def start(self) -> ControlPlane:
        etcd = require_tool("etcd")
        apiserver = require_tool("kube-apiserver")
        controller_manager = require_tool("kube-controller-manager")
        self.kubectl_path = require_tool("kubectl")
        for d in (self.pki, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            self._pki = self._write_pki()
            self._start_etcd(etcd)
            self._start_apiserver(apiserver)
            self._start_controller_manager(controller_manager)
            self.apply_crds()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _write_pki(self) -> Pki:
        ca = self._ca = CertificateAuthority(self.pki)
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            server_ips=sorted({"127.0.0.1", self.address, KUBERNETES_SERVICE_IP}),
        )
        admin = ca.issue("admin", "berth-test-admin", organizations=["system:masters"], client=True)
        # Throwaway cluster: the controller manager gets full rights too, which is
        # what --use-service-account-credentials=false needs for every controller.
        controller_manager = ca.issue(
            "controller-manager",
            "system:kube-controller-manager",
            organizations=["system:masters"],
            client=True,
        )
        sa_key = ec.generate_private_key(ec.SECP256R1())
        sa_private = self.pki / "service-account.key"
        _write_key(sa_key, sa_private, serialization.PrivateFormat.TraditionalOpenSSL)
        sa_public = self.pki / "service-account.pub"
        sa_public.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return Pki(ca.cert_path, serving, admin, controller_manager, sa_private, sa_public)

    def _start_etcd(self, etcd: Path) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        process = ManagedProcess(
            "etcd",
            [
                etcd,
                "--name=berth-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=berth-test={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            self.logs / "etcd.log",
        )
        self._launch(process)
        wait_until(
            lambda: http_status(f"{self.etcd_url}/health") == 200,
            timeout=self.ready_timeout,
            what="etcd /health",
            process=process,
        )

    def _start_apiserver(self, apiserver: Path) -> None:
        pki = self.certs
        self.api_port = free_port()
        if self.node_ip:
            # Pods reach the API server through the `kubernetes` Service, whose endpoint
            # the API server keeps itself; they need service account tokens; `kubectl
            # logs/exec` reach the kubelet by its address with the admin certificate.
            node_flags = [
                f"--kubelet-client-certificate={pki.admin.cert}",
                f"--kubelet-client-key={pki.admin.key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
            ]
        else:
            node_flags = [
                # Like envtest: pods need no existing service account to be created.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
            ]
        process = ManagedProcess(
            "kube-apiserver",
            [
                apiserver,
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.pki}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account_public_key}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={self.service_cluster_ip_range}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                *node_flags,
            ],
            self.logs / "kube-apiserver.log",
        )
        self._launch(process)
        wait_until(
            lambda: self._api_get("/readyz") == 200,
            timeout=self.ready_timeout,
            what="kube-apiserver /readyz",
            process=process,
            interval=0.25,
        )
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            ca=pki.ca_cert,
            client=pki.admin,
            user="berth-test-admin",
        )

    def _start_controller_manager(self, controller_manager: Path) -> None:
        pki = self.certs
        kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            server=self.server,
            ca=pki.ca_cert,
            client=pki.controller_manager,
            user="system:kube-controller-manager",
        )
        process = ManagedProcess(
            "kube-controller-manager",
            [
                controller_manager,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                # No serving endpoint: nothing scrapes it and it would need a port.
                "--secure-port=0",
                f"--controllers={','.join(self.controllers)}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            ],
            self.logs / "kube-controller-manager.log",
        )
        self._launch(process)
        # The service account controller creating `default` in `default` shows
        # the controller manager is connected and running its controllers.
        wait_until(
            lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default") == 200,
            timeout=self.ready_timeout,
            what="the default service account (controller manager running)",
            process=process,
            interval=0.25,
        )

    def _launch(self, process: ManagedProcess) -> None:
        self.processes.append(process)
        process.start()

    # -- HTTP to the API server with the admin certificate --

    def _ssl_context(self) -> ssl.SSLContext:
        pki = self.certs
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        return context

    def _api_get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(
                f"{self.server}{path}", context=self._ssl_context(), timeout=5
            ) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return None

    # -- helpers for tests --

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane; raises on failure when `check`."""
        result = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )
        return result

    def kubectl_json(self, *args: str) -> Any:
        """Run kubectl with `-o json` and parse its output."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def wait_gone(self, *get_args: str, timeout: float, interval: float = 0.5) -> list[str]:
        """Poll `kubectl get <get_args> -o name` until it lists nothing or `timeout`
        seconds have passed; returns the names still listed (never raises on a slow
        deletion: the caller decides whether that matters)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.kubectl("get", *get_args, "-o", "name", timeout=60)
                left = result.stdout.split()
            except (subprocess.SubprocessError, OSError) as err:
                left = [f"(kubectl get failed: {err})"]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(interval)

    @contextlib.contextmanager
    def refusing(
        self,
        namespace: str,
        name: str,
        *,
        resource: str,
        operations: Sequence[str],
        expression: str,
        message: str,
        reason: str,
        probe: Sequence[str],
        probe_input: str | None = None,
    ) -> Iterator[str]:
        """For the block, an admission policy `name` refusing `operations` on the core
        `resource` in `namespace` where `expression` is false, with `message` and `reason`,
        as the API server refuses a write for a cause of its own. In force once the server
        dry run of `kubectl <probe>` is refused with `message`; deleted afterwards."""
        policy = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": list(operations),
                            "resources": [resource],
                        }
                    ]
                },
                "validations": [{"expression": expression, "message": message, "reason": reason}],
            },
        }
        binding = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        }

        def active() -> bool:
            result = self.kubectl(*probe, "--dry-run=server", input=probe_input, check=False)
            return result.returncode != 0 and message in result.stderr

        try:
            for document in (policy, binding):
                self.kubectl("apply", "-f", "-", input=json.dumps(document))
            wait_until(active, timeout=30, what="the admission policy to take effect")
            yield name
        finally:
            for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
                self.kubectl("delete", kind, name, "--ignore-not-found", check=False)

    def api_client(self) -> ApiClient:
        """A `kubernetes.client.ApiClient` for the admin kubeconfig (use it in `with`)."""
        from kubernetes import config  # the client is slow to import; only when used

        client: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
            config_file=str(self.kubeconfig)
        )
        return client

    def apply_crds(self, paths: Iterable[Path] | None = None, timeout: float = 60) -> list[str]:
        """Apply CRD files (default: crds/*.yaml) and wait until each is Established.

        Returns the applied objects' names (`customresourcedefinition.../...`).
        """
        files = sorted(CRD_DIR.glob("*.yaml")) if paths is None else list(paths)
        names: list[str] = []
        for file in files:
            output = self.kubectl("apply", "--server-side", "-f", str(file), "-o", "name")
            names += [n for n in output.stdout.split() if n.startswith("customresourcedefinition")]
        if names:
            self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", *names)
        return names

    # -- shutdown --

    def stop(self) -> None:
        """Stop the controller manager, API server and etcd, in reverse start order."""
        for process in reversed(self.processes):
            process.stop(timeout=15)

    def logs_summary(self, lines: int = 40) -> str:
        parts = [f"--- {p.log_path} ---\n{p.log_tail(lines)}" for p in self.processes]
        return "\n".join(parts)


def start_control_plane(workdir: Path | None = None) -> ControlPlane:
    """Start a control plane outside pytest (e.g. from a script); stop() it yourself."""
    directory = workdir or Path(tempfile.mkdtemp(prefix="berth-control-plane-"))
    return ControlPlane(directory).start()
