"""The operator's ClusterRole grants exactly what the operator's code uses.

What the code needs is derived from the code, not written down a second time:

- Kopf's side, from the handler registry the operator builds: every resource with
  change handlers or timers is listed, watched and patched (annotations, finalizer);
  resources with event handlers are listed and watched; plus what the framework does
  with the settings the operator gives it (peering, CRD observation, events).
- The API client's side, by running the code that calls it against a real API server
  through a client that records every request, in scenarios that reach every call
  site. An AST scan finds the call sites, so a new call of the client that no
  scenario reaches fails the test instead of slipping by.

The granted side is the ClusterRole in manifests/install.yaml, which the drift test
keeps equal to the chart's. The local stack's test runs the operator with these very
rights, so a missing grant shows up there as well (as 403s).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import kopf
import pytest
import yaml

from berth_dev import generate
from registry_operator import granting, handlers, models, reconcile, settings
from registry_operator.handlers import child_watch, lifecycle, runtime
from registry_operator.kube import client as kube_client
from registry_operator.kube import resources
from registry_operator.rendering import names
from tests.support.control_plane import ControlPlane

pytestmark = pytest.mark.integration

OPERATOR_SRC = generate.REPO_ROOT / "operator" / "registry_operator"
KUBE_LAYER = OPERATOR_SRC / "kube"
# Every public request method of the operator's API client, whatever gets added.
CLIENT_METHODS = frozenset(
    name
    for name, _ in inspect.getmembers(kube_client.Client, inspect.isfunction)
    if not name.startswith("_") and name not in ("connect", "close")
)

Permission = tuple[str, str, str]  # (API group, resource[/subresource], verb)


# --- granted ----------------------------------------------------------------------


def granted_rules() -> set[Permission]:
    documents = list(yaml.safe_load_all((generate.MANIFESTS_DIR / "install.yaml").read_text()))
    roles = [d for d in documents if d and d["kind"] in ("ClusterRole", "Role")]
    assert [r["kind"] for r in roles] == ["ClusterRole"], "the operator has one ClusterRole"
    granted: set[Permission] = set()
    for rule in roles[0]["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    granted.add((group, resource, verb))
    return granted


# --- Kopf's needs -----------------------------------------------------------------


def _plural(selector: Any) -> str:
    name = selector.plural or selector.any_name
    assert isinstance(name, str) and name.islower(), f"selector {selector} names no plural"
    return name


def chart_operator_args() -> list[str]:
    documents = yaml.safe_load_all((generate.MANIFESTS_DIR / "install.yaml").read_text())
    deployment = next(d for d in documents if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return [*container.get("command", []), *container.get("args", [])]


def source_calls(*dotted: str) -> list[str]:
    """Where the operator's source calls any of the `dotted` functions (module:line)."""
    found = []
    for path in sorted(OPERATOR_SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in dotted:
                found.append(f"{path.relative_to(OPERATOR_SRC)}:{node.lineno}")
    return found


def kopf_needs() -> set[Permission]:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, resync_seconds=60)
    needs: set[Permission] = set()

    def grant(selector: Any, *verbs: str) -> None:
        needs.update((selector.group or "", _plural(selector), verb) for verb in verbs)

    # Change handlers and timers: Kopf lists and watches the resource and patches its
    # metadata (the last-handled annotation, progress, the timers' finalizer).
    writers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    for writer in writers:
        grant(writer.selector, "list", "watch", "patch")
    # Event handlers and indexes only read the stream.
    readers = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    for reader in readers:
        grant(reader.selector, "list", "watch")
    assert not list(registry._webhooks.get_all_handlers()), "webhooks need more RBAC: add it"

    args = chart_operator_args()
    assert not any(a.startswith(("--standalone", "--namespace")) for a in args), args
    operator_settings = settings.build()
    # Cluster-wide with peering (the chart's way): Kopf watches the ClusterKopfPeering
    # and patches its keep-alive into it.
    needs |= {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")}
    # Kopf observes CRDs to notice resources appearing later, unless scanning is off.
    if not operator_settings.scanning.disabled:
        needs |= {
            ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")
        }
    # Events: Kopf posts its own (settings.posting) and the handlers post theirs.
    if operator_settings.posting.enabled or source_calls(
        "kopf.event", "kopf.info", "kopf.warn", "kopf.exception"
    ):
        needs.add(("", "events", "create"))
    return needs


# --- the API client's needs -------------------------------------------------------

Site = tuple[str, str]  # (module path below registry_operator/, function qualname)


class _SiteFinder(ast.NodeVisitor):
    """Functions that use a kube client method (`kube.apply`, `state.kube.create`...)."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.scope: list[str] = []
        self.sites: set[Site] = set()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope += [node.name, "<locals>"]
        self.generic_visit(node)
        del self.scope[-2:]

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        receiver = ast.unparse(node.value)
        if node.attr in CLIENT_METHODS and re.search(r"(^|\.)kube$", receiver):
            qualname = ".".join(self.scope[:-1]) if self.scope else "<module>"
            self.sites.add((self.module, qualname))
        self.generic_visit(node)


def client_call_sites() -> set[Site]:
    sites: set[Site] = set()
    for path in sorted(OPERATOR_SRC.rglob("*.py")):
        if KUBE_LAYER in path.parents:
            continue
        finder = _SiteFinder(str(path.relative_to(OPERATOR_SRC)))
        finder.visit(ast.parse(path.read_text()))
        sites |= finder.sites
    return sites


_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/[^/]+)?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
WATCH = "WATCH"  # a GET with watch=true, recorded apart: the API server authorizes "watch"


def permissions_of(method: str, path: str, content_type: str | None) -> set[Permission]:
    match = _PATH.match(path)
    assert match, f"unexpected API path {path}"
    group = "" if match["core"] else match["group"]
    resource = match["plural"] + (f"/{match['sub']}" if match["sub"] else "")
    if method == WATCH:
        verb = "watch"
    else:
        verb = ("get" if match["name"] else "list") if method == "GET" else _VERBS[method]
    found = {(group, resource, verb)}
    # A server-side apply of an object that does not exist yet creates it, and the API
    # server authorizes that as create (a subresource is never created this way).
    if verb == "patch" and content_type == kube_client.APPLY and not match["sub"]:
        found.add((group, resource, "create"))
    return found


class RecordingClient(kube_client.Client):
    """The operator's client, recording each request and the operator code behind it."""

    def __init__(self, api: Any) -> None:
        super().__init__(api)
        self.requests: list[tuple[str, str, str | None]] = []
        self.sites: set[Site] = set()

    def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        self._record(method, path, kwargs.get("content_type"))
        return super()._call(method, path, **kwargs)

    def watch_metadata(
        self, api_version: str, kind: str, *args: Any, **kwargs: Any
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        resource = resources.lookup(api_version, kind)
        path = resource.path(None, all_namespaces=resource.namespaced)
        self._record(WATCH, path, None)
        return super().watch_metadata(api_version, kind, *args, **kwargs)

    def _record(self, method: str, path: str, content_type: str | None) -> None:
        self.requests.append((method, path, content_type))
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            file = Path(frame.f_code.co_filename)
            if OPERATOR_SRC in file.parents and KUBE_LAYER not in file.parents:
                self.sites.add((str(file.relative_to(OPERATOR_SRC)), frame.f_code.co_qualname))
                break
            frame = frame.f_back

    def permissions(self) -> set[Permission]:
        found: set[Permission] = set()
        for method, path, content_type in self.requests:
            found |= permissions_of(method, path, content_type)
        return found


@contextlib.contextmanager
def inline_threads() -> Iterator[None]:
    """asyncio.to_thread runs its function in place, so the calling frames stay visible."""

    async def run_inline(function: Any, /, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    original = asyncio.to_thread
    asyncio.to_thread = run_inline
    try:
        yield
    finally:
        asyncio.to_thread = original


def _registry(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def _apply(plane: ControlPlane, *objects: Mapping[str, Any]) -> None:
    document = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    result = plane.kubectl("apply", "-f", "-", input=document, check=False)
    assert result.returncode == 0, result.stderr


def _repository(namespace: str, name: str, registry: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Repository",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"registryRef": {"name": registry}, "path": f"rbac/{name}", **spec},
    }


def registry_scenarios(plane: ControlPlane, namespace: str, kube: RecordingClient) -> None:
    """The Registry's own children: create, re-apply, prune, refuse, peers."""
    options = reconcile.Options(image="berth:rbac-test")
    # A Registry that does not exist (deleted before its event was handled).
    reconcile.reconcile(kube, namespace, "absent", options)
    # Create with every optional child, reconcile again (all exist), then drop the
    # Ingress, the second replica (its disruption budget) and the node proxy from the
    # spec: all pruned.
    # Two replicas need S3 and PostgreSQL: the user's Secrets and CA ConfigMap are read.
    storage = {
        "s3": {
            "bucket": "images",
            "credentialsSecretRef": {"name": "s3"},
            "caConfigMapRef": {"name": "store-ca"},
        }
    }
    full = {
        "storage": storage,
        "metadata": {"postgresql": {"connectionSecretRef": {"name": "db"}}},
        "replicas": 2,
        "ingress": {"host": "registry.example.com"},
    }
    _apply(plane, _registry(namespace, "full", full))
    reconcile.reconcile(kube, namespace, "full", options)
    reconcile.reconcile(kube, namespace, "full", options)
    without_ingress = {
        "storage": storage,
        "metadata": full["metadata"],
        "nodeProxy": {"enabled": False},
    }
    _apply(plane, _registry(namespace, "full", without_ingress))
    reconcile.reconcile(kube, namespace, "full", options)
    # No Registry left with a node proxy: kube-public/local-registry-hosting goes (the
    # next reconcile of any Registry with a proxy writes it again).
    reconcile.sync_local_registry_hosting(kube, [])
    _apply(plane, _registry(namespace, "full", full))
    reconcile.reconcile(kube, namespace, "full", options)
    # One replica on a claim (created, then patched by the second reconcile).
    volume = {"storage": {"pvc": {"size": "1Gi"}}}
    _apply(plane, _registry(namespace, "volume", volume))
    reconcile.reconcile(kube, namespace, "volume", options)
    reconcile.reconcile(kube, namespace, "volume", options)
    # A spec the operator cannot serve: the status explains it, nothing is applied.
    # (A key prefix climbing out of its place: the CRD admits it, the parser does not.)
    s3 = {"storage": {"s3": {**storage["s3"], "prefix": "../x"}}, "metadata": full["metadata"]}
    _apply(plane, _registry(namespace, "unservable", s3))
    reconcile.reconcile(kube, namespace, "unservable", options)
    # Two Registries replicating to each other by reference: each reads the other.
    for me, other in (("east", "west"), ("west", "east")):
        peers = {"peers": [{"name": other, "registryRef": {"name": other}}]}
        spec = {"region": me, "storage": {"emptyDir": {}}, "replication": peers}
        _apply(plane, _registry(namespace, me, spec))
    for name in ("east", "west", "east"):
        reconcile.reconcile(kube, namespace, name, options)
    # The replication status poll reads the admin credentials (the server is not
    # reachable from here; that is an answer too).
    runtime.Runtime(kube=kube).fetch_replication(namespace, "east")


def access_scenarios(plane: ControlPlane, namespace: str, kube: RecordingClient) -> None:
    """Repositories: grant, repair, rotate, revoke; a Registry that cannot serve."""
    team = f"{namespace}-team"
    plane.kubectl("create", "namespace", team)
    try:
        deadline = time.monotonic() + 30
        while plane.kubectl("get", "sa", "default", "-n", team, check=False).returncode:
            assert time.monotonic() < deadline, "no default ServiceAccount"
            time.sleep(0.2)
        clock = [time.time()]
        options = granting.Options(clock=lambda: clock[0])
        grant = {"namespaces": [team], "serviceAccounts": ["default"]}
        _apply(plane, _repository(namespace, "app", "full", pullAccess=grant))
        # First grant: the robot, the policy, a pull Secret and the ServiceAccount entry.
        granting.reconcile_access(kube, namespace, "full", options)
        # A hand-made Secret of another type in its place is replaced.
        selector = names.access_selector("full", namespace)
        pulled = json.loads(
            plane.kubectl("get", "secrets", "-n", team, "-l", selector, "-o", "json").stdout
        )["items"][0]
        meta = pulled["metadata"]
        plane.kubectl("delete", "secret", meta["name"], "-n", team)
        tampered = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": meta["name"], "namespace": team, "labels": meta["labels"]},
            "data": {"x": "eA=="},
        }
        _apply(plane, tampered)
        granting.reconcile_access(kube, namespace, "full", options)
        # Rotation on request: staged, then handed out, then the request cleared.
        plane.kubectl(
            "annotate", "repository", "app", "-n", namespace, f"{models.ROTATE_ANNOTATION}=now"
        )
        for _ in range(3):
            granting.reconcile_access(kube, namespace, "full", options)
            clock[0] += 3600
        # Revocation: the ServiceAccount entry and the Secret go.
        _apply(plane, _repository(namespace, "app", "full", pullAccess={"namespaces": []}))
        granting.reconcile_access(kube, namespace, "full", options)
        # A Repository of a Registry whose spec cannot be served only gets a status.
        _apply(plane, _repository(namespace, "orphan", "unservable"))
        granting.reconcile_access(kube, namespace, "unservable", options)
        # Registries replicating to each other: each reads the other's spec.
        granting.reconcile_access(kube, namespace, "east", options)
    finally:
        plane.kubectl("delete", "namespace", team, "--wait=false", check=False)


def startup_scenario(plane: ControlPlane, kube: RecordingClient) -> None:
    """Operator start: the peering object is created (under a name of this test's own)."""
    peering = f"rbac-scan-{secrets.token_hex(3)}"
    memo = kopf.Memo(berth=runtime.Runtime(kube=kube, peering=peering))
    try:
        with inline_threads():
            asyncio.run(lifecycle.ensure_peering(memo=memo, logger=logging.getLogger("scan")))
    finally:
        plane.kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found")


def child_watch_scenario(kube: RecordingClient) -> None:
    """The children's watch: each kind listed and watched (metadata only)."""
    state = runtime.Runtime(kube=kube)

    async def watch_a_moment() -> None:
        watch = child_watch.ChildWatch(state, asyncio.get_running_loop())
        watch.start()
        try:
            for _ in range(200):
                if len(watch._open) == len(watch.kinds) * len(watch.namespaces):
                    break
                await asyncio.sleep(0.05)
            assert len(watch._open) == len(watch.kinds), sorted(map(str, watch._open))
        finally:
            await asyncio.to_thread(watch.stop)

    asyncio.run(watch_a_moment())
    state.probes.shutdown()


def run_scenarios(plane: ControlPlane, namespace: str, kube: RecordingClient) -> None:
    """Drive every code path that calls the API client, against the real API server."""
    registry_scenarios(plane, namespace, kube)
    access_scenarios(plane, namespace, kube)
    startup_scenario(plane, kube)
    child_watch_scenario(kube)


def client_needs(plane: ControlPlane, namespace: str) -> tuple[set[Permission], set[Site]]:
    kube = RecordingClient.connect(str(plane.kubeconfig))
    assert isinstance(kube, RecordingClient)
    try:
        run_scenarios(plane, namespace, kube)
    finally:
        kube.close()
    return kube.permissions(), kube.sites


# What no request uses but an admission plugin checks: setting blockOwnerDeletion in a
# child's ownerReferences, under OwnerReferencesPermissionEnforcement (OpenShift).
ADMISSION_NEEDS: set[Permission] = {("berth.dev", "registries/finalizers", "update")}


# --- the tests --------------------------------------------------------------------


def _table(permissions: Iterable[Permission]) -> str:
    return "\n".join(f"  {g or 'core'} {r} {v}" for g, r, v in sorted(permissions))


def test_every_client_call_site_is_found_by_the_scan() -> None:
    """The scan sees the call sites it is meant to (guards the scan itself)."""
    sites = client_call_sites()
    functions = {qualname for _, qualname in sites}
    assert {"reconcile", "_apply_children", "_write_status", "ensure_peering"} <= functions


def test_cluster_role_is_exactly_what_the_operator_uses(
    control_plane: ControlPlane, namespace: str
) -> None:
    used, reached = client_needs(control_plane, namespace)
    unreached = client_call_sites() - reached
    assert not unreached, (
        "operator code calls the API client where no scenario of run_scenarios() goes, "
        f"so its permissions are not derived: {sorted(unreached)}"
    )
    needed = used | kopf_needs() | ADMISSION_NEEDS
    granted = granted_rules()
    assert needed == granted, (
        f"the operator needs but is not granted:\n{_table(needed - granted)}\n"
        f"granted but never used:\n{_table(granted - needed)}\n"
        "(change helm/berth/templates/clusterrole.yaml, then python -m berth_dev.generate)"
    )
