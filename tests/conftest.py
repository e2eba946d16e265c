"""Shared fixtures: the real control plane, per-test namespaces, registry processes.

See docs/testing.md. The processes' logs are files; when a test fails, the log
tails of the registry processes it started are added to its report.
"""

from __future__ import annotations

import re
import secrets
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.control_plane import ControlPlane
from tests.support.operator_process import delete_berth_objects

if TYPE_CHECKING:
    from registry_operator.kube.client import Client as KubeClient
    from tests.support.node import Node
from tests.support.processes import ProcessStartError, RegistryKind, RegistryProcess

# Processes started for the current test, for the failure report.
_PROCESSES = pytest.StashKey[list[RegistryProcess]]()
_USES_CONTROL_PLANE = pytest.StashKey[ControlPlane]()


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, a `kill`) ends the run as Ctrl-C does, so fixtures tear
    down: no registry, object store, database or control plane outlives it (they did
    once, and shared the machine with the next benchmark)."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for process in item.stash.get(_PROCESSES, []):
            report.sections.append(
                (
                    f"{process.kind} registry log ({process.log_path})",
                    process.log_tail(200) or "(empty)",
                )
            )
        plane = item.stash.get(_USES_CONTROL_PLANE, None)
        if plane is not None:
            paths = "\n".join(str(p.log_path) for p in plane.processes)
            report.sections.append(("control plane logs", paths))
    return report


@pytest.fixture(scope="session")
def tools_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide scratch directory for tool state (configs, caches, layouts)."""
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager on loopback, CRDs from crds/ applied.

    Session-scoped; use `namespace` for isolation between tests.
    """
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()  # a missing tool skips (fails in CI) from here
    except ProcessStartError as err:  # carries the failing process's log
        logs = "\n".join(str(p.log_path) for p in plane.processes)
        pytest.fail(f"control plane did not start: {err}\nall logs:\n{logs}", pytrace=False)
    except Exception as err:
        pytest.fail(f"control plane did not start: {err}\n{plane.logs_summary()}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Iterator[KubeClient]:
    """The operator's own API client, connected to the control plane (one per module)."""
    from registry_operator.kube.client import Client

    client = Client.connect(str(control_plane.kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty `--endpoint-overrides` file for a module's operator; tests add URLs to it."""
    path = tmp_path_factory.mktemp("endpoints") / "endpoints.json"
    path.write_text("{}")
    return path


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards.

    Its Registries and Repositories are deleted first, and waited for (bounded), so that
    a running operator processes their finalizers while the namespace is still active.
    """
    request.node.stash[_USES_CONTROL_PLANE] = control_plane
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48].strip("-")
    name = f"{stem or 't'}-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        delete_berth_objects(control_plane, name)
        control_plane.kubectl(
            "delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False
        )


RegistryFactory = Callable[..., RegistryProcess]


@pytest.fixture
def registry_process(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RegistryFactory]:
    """Factory: `registry_process("berth" | "distribution", config=..., env=...)`.

    Each call starts a registry server subprocess on a free port with its own
    storage root and returns it once `GET /v2/` answers; all are stopped after
    the test.
    """
    started: list[RegistryProcess] = []
    request.node.stash[_PROCESSES] = started

    def start(
        kind: RegistryKind = "berth",
        *,
        config: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 30.0,
    ) -> RegistryProcess:
        workdir = tmp_path_factory.mktemp(f"{kind}-registry")
        process = RegistryProcess(
            kind, workdir, port=port, config=config, env=env, ready_timeout=ready_timeout
        )
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()


class NodeCluster:
    """A control plane with one real node (tests/support/node.py): pods really run."""

    def __init__(self, plane: ControlPlane, node: Node) -> None:
        self.plane = plane
        self.node = node


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    """A second control plane, made for a node, with the node attached (Node Ready,
    cluster DNS, a default StorageClass). Session-scoped and one per machine; teardown
    fails the session if it leaves processes, mounts, rules, links or cgroups behind."""
    from tests.support import node as node_support

    reason = node_support.unavailable_reason()
    if reason:
        node_support.skip_or_fail(reason)
    workdir = tmp_path_factory.mktemp("node-cluster")
    node_support.prepare_host()
    plane = ControlPlane(workdir / "control-plane", node_ip=node_support.NODE_IP)
    node = node_support.Node(plane, workdir / "node")
    try:
        try:
            plane.start()
            node.start()
        except Exception as err:
            logs = "\n".join(str(p.log_path) for p in [*plane.processes, *node.processes])
            pytest.fail(f"the test node did not start: {err}\nlogs:\n{logs}", pytrace=False)
        yield NodeCluster(plane, node)
    finally:
        node.stop()
        plane.stop()
        node_support.clean_host()
        left = node_support.leftovers()
        if left:
            pytest.fail(f"the test node left things behind: {left}", pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the node run last, together: the node stays up from its first test to the
    end of the session, and its processes would load the machine under the other tests."""
    items.sort(key=lambda item: "node_cluster" in getattr(item, "fixturenames", ()))


# -- PostgreSQL (tests/support/postgres.py) ----------------------------------------------

from tests.support.postgres import PostgresServer, require_server  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (Debian's initdb/pg_ctl, run as an
    unprivileged account, data in a temporary directory, a free loopback port, fsync off);
    stopped and removed afterwards. Missing: skipped naming `make tools` (failed in CI)."""
    server = PostgresServer(require_server())
    try:
        server.start()
    except Exception as err:
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database of its own for one test (dropped afterwards); its DSN."""
    dsn = postgres.create_database()
    try:
        yield dsn
    finally:
        postgres.drop_database(dsn)


# -- S3 (tests/support/s3_store.py) ------------------------------------------------------

from tests.support.s3_store import S3Store  # noqa: E402


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    """SeaweedFS's S3 gateway for the session (`weed server -s3`, built by `make tools`):
    free loopback ports, data in a temporary directory, an identity of its own and one
    bucket (`.bucket`); tests keep apart by prefix (`.new_prefix()`). Stopped and its data
    removed afterwards. Missing: skipped naming `make tools` (failed in CI)."""
    store = S3Store(tmp_path_factory.mktemp("s3-store"))
    try:
        store.start()  # a missing tool skips (fails in CI) from here
    except ProcessStartError as err:  # carries the log
        pytest.fail(f"the S3 store did not start: {err}", pytrace=False)
    try:
        yield store
    finally:
        store.stop()


# -- containerd (tests/support/containerd.py) --------------------------------------------

from tests.support.containerd import Containerd, running_containerd  # noqa: E402
from tests.support.tools import require_root  # noqa: E402


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A containerd of the test's own (socket, root and state in a temporary directory,
    the CRI plugin off, images in the namespace `test`); its containers, shims, mounts and
    directory removed afterwards. containerd needs root: without it skipped (failed in CI)."""
    require_root("containerd needs root")
    with running_containerd() as daemon:
        yield daemon


# -- TLS (tests/support/tls.py) ------------------------------------------------------------

from tests.support.control_plane import CertificateAuthority, KeyPair  # noqa: E402
from tests.support.tls import SecretVolume, TlsRegistryProcess  # noqa: E402


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A CA of the test's own, its files in `ca/` under the test's tmp_path."""
    directory = tmp_path / "ca"
    directory.mkdir()
    return CertificateAuthority(directory)


@pytest.fixture
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., TlsRegistryProcess]]:
    """Starts Berth servers on HTTPS: `start(pair, ca_file, config=None, **kw)`, each
    with its certificate in a Secret-like volume; all stopped afterwards."""
    started: list[TlsRegistryProcess] = []

    def start(
        pair: KeyPair, ca_file: Path, config: dict[str, Any] | None = None, **kw: Any
    ) -> TlsRegistryProcess:
        workdir = tmp_path_factory.mktemp("tls-registry")
        volume = SecretVolume(workdir / "secret", pair.cert.read_bytes(), pair.key.read_bytes())
        process = TlsRegistryProcess(workdir, volume, ca_file, config=config, **kw)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
