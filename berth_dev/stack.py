"""The local stack behind `make run`: Berth as a user meets it, on one machine.

1. a control plane (etcd, kube-apiserver, kube-controller-manager from `make tools`)
   with the CRDs from crds/ applied;
2. the operator's RBAC from manifests/install.yaml (Namespace, ServiceAccount,
   ClusterRole, binding), so the operator below runs with exactly the rights the chart
   grants, through a token of its ServiceAccount;
3. the operator, `python -m registry_operator`, as a subprocess;
4. samples/ applied with kubectl, as a user would;
5. for every Registry in the samples, once the operator has reconciled it (and the
   Repositories the samples hold): the registry server started from the Deployment,
   ConfigMaps and Secrets the operator wrote (tests/support/podspec_runner.py stands in
   for the kubelet: mounted files follow their ConfigMaps and Secrets, Service URLs
   point at the local processes); each registry's port is fixed up front and handed to
   the operator (--endpoint-overrides), which reaches the servers there;
6. the endpoint and the admin credentials printed; then it runs until SIGINT or
   SIGTERM (Ctrl-C), restarting a registry process on its port when the operator
   changes its pod template (as a rollout would), and stops everything in reverse order.

`--ready-file PATH` writes the endpoints as JSON once all is up (for tests and
scripts); `--exit-after-ready` stops right after (to time a start).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import kopf
import yaml

from berth_dev import node_stack
from registry_operator import credentials, handlers, models
from registry_operator.kube import client as kube_client
from registry_operator.rendering import names
from tests.support import podspec_runner, tools
from tests.support.control_plane import ControlPlane
from tests.support.processes import (
    ManagedProcess,
    ReservedPort,
    free_port,
    http_status,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "samples"
INSTALL_MANIFEST = REPO_ROOT / "manifests" / "install.yaml"
# What the stack takes from install.yaml: the operator's identity and rights. The CRDs
# come from crds/ (the control plane applies them); the operator Deployment is this
# process's job, since no kubelet runs here.
RBAC_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
CONTROL_PLANE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
TOKEN_DURATION = "48h"
API_GROUP = "berth.dev"
KINDS = {"Registry": "registries", "Repository": "repositories"}
API_VERSIONS = {
    "Registry": f"{API_GROUP}/v1alpha1",
    "Repository": f"{API_GROUP}/v1alpha1",
    "Deployment": "apps/v1",
    "ConfigMap": "v1",
    "Secret": "v1",
}

Object = dict[str, Any]
Log = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot start or keep running; the message says why."""


class Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM: unwind, then stop everything."""


@dataclasses.dataclass
class Instance:
    """One Registry of the samples, served by a local registry process."""

    namespace: str
    name: str
    deployment: str
    username: str
    password: str
    pod: podspec_runner.RunningPod
    template: Object  # the pod template the process was started from
    cert_dir: Path | None = None  # the Registry's CA for --cert-dir (None: plain HTTP)

    @property
    def host(self) -> str:
        return self.pod.host

    def describe(self) -> dict[str, str]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "url": self.pod.url,
            "host": self.pod.host,
            "username": self.username,
            "password": self.password,
            "log": str(self.pod.process.log_path),
            "cert_dir": str(self.cert_dir or ""),
        }


def handled_kinds() -> set[str]:
    """The kinds of our group whose changes the operator handles (from its handlers)."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, resync_seconds=300)
    selectors = [h.selector for h in registry._changing.get_all_handlers() if h.selector]
    plurals = {selector.plural or selector.any_name for selector in selectors}
    return {kind for kind, plural in KINDS.items() if plural in plurals}


def missing_tools() -> list[str]:
    return [name for name in CONTROL_PLANE_TOOLS if tools.find_tool(name) is None]


def load_documents(paths: Sequence[Path]) -> list[Object]:
    documents: list[Object] = []
    for path in paths:
        documents += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return documents


def sample_files(directory: Path) -> list[Path]:
    """kubectl's order for `apply -f <dir>`: file names, lexically."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def kubeconfig_with_token(path: Path, plane: ControlPlane, user: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "berth-local",
                "cluster": {"server": plane.server, "certificate-authority": str(plane.ca_cert)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "berth-local", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def secret_value(secret: Mapping[str, Any], key: str) -> str:
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        name = secret["metadata"]["name"]
        raise StackError(f"Secret {name} has no key {key!r}")
    return base64.b64decode(raw).decode()


class LocalStack:
    def __init__(
        self,
        workdir: Path,
        *,
        samples: Path = SAMPLES_DIR,
        install_manifest: Path = INSTALL_MANIFEST,
        operator_args: Sequence[str] = (),
        timeout: float = 120.0,
        log: Log = print,
    ) -> None:
        self.workdir = workdir
        self.samples = samples
        self.install_manifest = install_manifest
        self.operator_args = list(operator_args)
        self.timeout = timeout
        self.log = log
        self.plane = ControlPlane(workdir / "control-plane")
        self.operator: ManagedProcess | None = None
        self.operator_kubeconfig = workdir / "operator.kubeconfig"
        self.endpoints_file = workdir / "endpoints.json"
        self.instances: list[Instance] = []
        self.ports: dict[tuple[str, str], int] = {}  # (namespace, registry) -> its port
        self.schemes: dict[tuple[str, str], str] = {}  # (namespace, registry) -> http(s)
        # Each port stays held until its registry process is about to bind it.
        self._reserved: dict[tuple[str, str], ReservedPort] = {}
        self._reader: kube_client.Client | None = None

    # -- start --

    def start(self) -> list[Instance]:
        missing = missing_tools()
        if missing:
            raise StackError(f"missing tools {', '.join(missing)}: run `make tools` first")
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        registries = self._sample_registries()
        # Every registry's port is known before anything starts: the operator reaches the
        # servers there (instead of their Service names), and so do peers.
        self._reserved = {
            (r["metadata"]["namespace"], r["metadata"]["name"]): ReservedPort() for r in registries
        }
        self.ports = {key: reserved.port for key, reserved in self._reserved.items()}
        # HTTPS unless a sample switches spec.tls off; the generated certificates name
        # 127.0.0.1, so the operator and peers verify them here too.
        self.schemes = {
            (r["metadata"]["namespace"], r["metadata"]["name"]): models.parse_spec(
                r.get("spec") or {}, image="local"
            ).scheme
            for r in registries
        }
        overrides = {
            f"{ns}/{name}": f"{self.schemes[(ns, name)]}://127.0.0.1:{port}"
            for (ns, name), port in self.ports.items()
        }
        self.endpoints_file.write_text(json.dumps(overrides, indent=2) + "\n")

        self.log("starting the control plane (etcd, kube-apiserver, controller manager)")
        try:
            self.plane.start()
        except Exception as exc:
            raise StackError(
                f"the control plane did not start: {exc}\n{self.plane.logs_summary()}"
            ) from exc
        self.log(f"control plane up in {self.plane.startup_seconds:.1f}s; CRDs applied")
        self._reader = kube_client.Client.connect(str(self.plane.kubeconfig))
        self._install_rbac()
        self._start_operator()
        self._apply_samples()
        # Other resources (Repositories) change what a registry serves: let the operator
        # handle them first, so the pods start from their settled configuration.
        handled = handled_kinds() - {"Registry"}
        for obj in self._sample_objects():
            if obj["kind"] in handled:
                meta = obj["metadata"]
                self._wait_for_status(obj["kind"], meta["namespace"], meta["name"])
        for registry in registries:
            namespace, name = registry["metadata"]["namespace"], registry["metadata"]["name"]
            deployment = self._wait_for_reconciled(namespace, name)
            self.instances.append(self._start_instance(namespace, name, deployment))
        return self.instances

    def _install_rbac(self) -> None:
        documents = [d for d in load_documents([self.install_manifest]) if d["kind"] in RBAC_KINDS]
        accounts = [d for d in documents if d["kind"] == "ServiceAccount"]
        if len(accounts) != 1:
            raise StackError(f"{self.install_manifest} must hold exactly one ServiceAccount")
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
        meta = accounts[0]["metadata"]
        token = self.plane.kubectl(
            "create", "token", meta["name"], "-n", meta["namespace"], f"--duration={TOKEN_DURATION}"
        ).stdout.strip()
        user = f"system:serviceaccount:{meta['namespace']}:{meta['name']}"
        kubeconfig_with_token(self.operator_kubeconfig, self.plane, user, token)
        self.log(f"operator RBAC from {self.install_manifest.relative_to(REPO_ROOT)}: {user}")

    def _start_operator(self) -> None:
        port = free_port()
        liveness = f"http://127.0.0.1:{port}/healthz"
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.operator_kubeconfig)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT / "operator"), str(REPO_ROOT), env.get("PYTHONPATH")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            sys.executable,
            "-m",
            "registry_operator",
            f"--liveness={liveness}",
            f"--endpoint-overrides={self.endpoints_file}",
            *self.operator_args,
        ]
        self.operator = ManagedProcess(
            "operator", argv, self.workdir / "logs" / "operator.log", env=env, cwd=REPO_ROOT
        )
        self.operator.start()
        wait_until(
            lambda: http_status(liveness) == 200,
            timeout=self.timeout,
            what=f"the operator's liveness endpoint {liveness}",
            process=self.operator,
            interval=0.2,
        )
        self.log(f"operator running (pid {self.operator.pid}), log {self.operator.log_path}")

    def _apply_samples(self) -> None:
        self.plane.kubectl("apply", "-f", str(self.samples))
        self.log(f"applied {self.samples}")

    def _sample_objects(self) -> list[Object]:
        documents = load_documents(sample_files(self.samples))
        ours = [d for d in documents if str(d.get("apiVersion", "")).startswith(f"{API_GROUP}/")]
        for document in ours:
            document["metadata"].setdefault("namespace", "default")
        return ours

    def _sample_registries(self) -> list[Object]:
        found = [d for d in self._sample_objects() if d["kind"] == "Registry"]
        if not found:
            raise StackError(f"no Registry in {self.samples}")
        return found

    # -- reading the API (as admin, in-process) --

    def find(self, kind: str, namespace: str, name: str) -> Object | None:
        if self._reader is None:
            raise StackError("the control plane is not running")
        return self._reader.find(API_VERSIONS[kind], kind, namespace, name)

    def _wait(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll `check` until it returns something; fail after the timeout with `what`."""
        deadline = time.monotonic() + self.timeout
        while True:
            self._check_operator()
            found = check()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise StackError(
                    f"{what} after {self.timeout:.0f}s; operator log {self._operator_log()}"
                )
            time.sleep(0.25)

    def _wait_for_status(self, kind: str, namespace: str, name: str) -> Object:
        """The object, once its status.observedGeneration is its generation."""

        def check() -> Object | None:
            obj = self.find(kind, namespace, name)
            if obj is None:
                return None
            generation = obj["metadata"].get("generation")
            return (
                obj if (obj.get("status") or {}).get("observedGeneration") == generation else None
            )

        found: Object = self._wait(f"{kind} {namespace}/{name} has no status for its spec", check)
        return found

    def _wait_for_reconciled(self, namespace: str, name: str) -> Object:
        """The Registry's Deployment, once the operator's status covers the current spec."""
        registry = self._wait_for_status("Registry", namespace, name)
        uid = registry["metadata"]["uid"]

        def check() -> Object | None:
            deployment = self.find("Deployment", namespace, names.deployment(name))
            owners = ((deployment or {}).get("metadata") or {}).get("ownerReferences") or []
            return deployment if any(o.get("uid") == uid for o in owners) else None

        found: Object = self._wait(f"Registry {namespace}/{name} has no Deployment", check)
        return found

    def _pod_inputs(self, namespace: str, deployment: Object) -> tuple[list[Object], list[Object]]:
        """The ConfigMaps and Secrets the pod reads; like the kubelet, wait for them."""
        found: tuple[list[Object], list[Object]] = self._wait(
            f"the pod of {namespace}/{deployment['metadata']['name']} misses a ConfigMap or Secret",
            lambda: podspec_runner.inputs(self.find, namespace, deployment),
        )
        return found

    def _services(self) -> dict[str, str]:
        """In-cluster Service URLs of the registries -> the local processes' URLs."""
        return {
            names.in_cluster_url(name, ns, scheme): f"{scheme}://127.0.0.1:{port}"
            for (ns, name), port in self.ports.items()
            for scheme in [self.schemes[(ns, name)]]
        }

    def _start_instance(self, namespace: str, name: str, deployment: Object) -> Instance:
        config_maps, secrets = self._pod_inputs(namespace, deployment)
        auth = self.find("Secret", namespace, names.secret(name))
        if auth is None:
            raise StackError(f"Secret {namespace}/{names.secret(name)} does not exist")
        root = Path(tempfile.mkdtemp(prefix=f"{namespace}-{name}-", dir=self.workdir / "pods"))
        Inputs = tuple[Sequence[podspec_runner.Object], Sequence[podspec_runner.Object]]
        last: Inputs = (config_maps, secrets)

        def fetch() -> Inputs:
            # The kubelet's sync loop: current content of what the pod mounts (a missing
            # object keeps the last content, as a running pod does).
            nonlocal last
            last = podspec_runner.inputs(self.find, namespace, deployment) or last
            return last

        pod = podspec_runner.start(
            deployment,
            config_maps,
            secrets,
            root,
            port=self._reserved[(namespace, name)].release(),
            services=self._services(),
            fetch=fetch,
        )
        certs = None
        if pod.url.startswith("https://"):
            certs = pod.cert_dir(self.workdir / "certs" / f"{namespace}-{name}")
        self.log(f"registry {namespace}/{name} serving at {pod.url} (pid {pod.process.pid})")
        return Instance(
            namespace=namespace,
            name=name,
            deployment=deployment["metadata"]["name"],
            username=secret_value(auth, credentials.ADMIN_USERNAME),
            password=secret_value(auth, credentials.ADMIN_PASSWORD),
            pod=pod,
            template=deployment["spec"]["template"],
            cert_dir=certs,
        )

    # -- running --

    def _operator_log(self) -> str:
        return str(self.operator.log_path) if self.operator else "(not started)"

    def _check_operator(self) -> None:
        if self.operator is not None and not self.operator.running:
            raise StackError(
                f"the operator exited ({self.operator.returncode}):\n{self.operator.log_tail(40)}"
            )

    def check(self) -> None:
        """Raise StackError when a process of the stack has died."""
        self._check_operator()
        for process in self.plane.processes:
            if not process.running:
                raise StackError(f"{process.name} exited:\n{process.log_tail(40)}")
        for instance in self.instances:
            if not instance.pod.process.running:
                raise StackError(
                    f"registry {instance.namespace}/{instance.name} exited:\n"
                    f"{instance.pod.log_tail(40)}"
                )

    def follow(self) -> list[Instance]:
        """Restart the registry processes whose pod template the operator changed, as a
        rollout would (same port: the endpoint stays). Mounted ConfigMaps and Secrets
        are kept current by each pod's own kubelet-style sync."""
        restarted = []
        for index, instance in enumerate(self.instances):
            deployment = self.find("Deployment", instance.namespace, instance.deployment)
            if deployment is None or deployment["spec"]["template"] == instance.template:
                continue
            self.log(f"registry {instance.namespace}/{instance.name}: new pod template, restarting")
            instance.pod.stop()
            self.instances[index] = self._start_instance(
                instance.namespace, instance.name, deployment
            )
            restarted.append(self.instances[index])
        return restarted

    # -- stop --

    def stop(self) -> None:
        """Stop everything that was started, newest first; never raises."""
        for reserved in self._reserved.values():
            reserved.release()
        for instance in reversed(self.instances):
            with contextlib.suppress(Exception):
                instance.pod.stop()
        if self.operator is not None:
            with contextlib.suppress(Exception):
                self.operator.stop(timeout=15)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
        with contextlib.suppress(Exception):
            self.plane.stop()

    def pids(self) -> list[int]:
        processes = [*self.plane.processes, self.operator, *(i.pod.process for i in self.instances)]
        return [p.pid for p in processes if p is not None and p.pid is not None]


# --- the command ------------------------------------------------------------------


def banner(instances: Sequence[Instance], plane: ControlPlane, seconds: float) -> str:
    lines = [f"Berth local stack is up ({seconds:.1f}s). Ctrl-C stops everything.", ""]
    for instance in instances:
        creds = f"{instance.username}:{instance.password}"
        image = f"{instance.host}/team-a/api:v1"
        if instance.cert_dir is not None:
            served = f"HTTPS, its CA in {instance.cert_dir}/ca.crt"
            dest, src = (f"--{side}-cert-dir={instance.cert_dir}" for side in ("dest", "src"))
        else:
            served, dest, src = "plain HTTP", "--dest-tls-verify=false", "--src-tls-verify=false"
        lines += [
            f"Registry {instance.namespace}/{instance.name}",
            f"  endpoint  {instance.host}  ({served})",
            f"  username  {instance.username}",
            f"  password  {instance.password}",
            f"  push      skopeo copy {dest} "
            f"--dest-creds '{creds}' oci:./image:v1 docker://{image}",
            f"  pull      skopeo copy {src} --src-creds '{creds}' docker://{image} oci:./back:v1",
            f"  log       {instance.pod.process.log_path}",
            "",
        ]
    lines += [
        f"kubectl:    export KUBECONFIG={plane.kubeconfig}",
        f"            alias kubectl={plane.kubectl_path}",
        "            kubectl get registries,repositories -A",
    ]
    return "\n".join(lines)


def write_ready_file(path: Path, stack: LocalStack, seconds: float) -> None:
    info = {
        "startup_seconds": round(seconds, 2),
        "kubeconfig": str(stack.plane.kubeconfig),
        "kubectl": str(stack.plane.kubectl_path),
        "workdir": str(stack.workdir),
        "pids": stack.pids(),
        "registries": [instance.describe() for instance in stack.instances],
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    temporary.chmod(0o600)  # it holds passwords
    temporary.replace(path)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stop in the main thread, once; later ones only tell."""
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            print("\nstill stopping, please wait", file=sys.stderr)
            return
        stopping = True
        raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m berth_dev",
        description="Run Berth locally: control plane, operator, samples, registry servers.",
    )
    parser.add_argument("--samples", type=Path, default=SAMPLES_DIR, help="what to apply")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep all state here (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="do not delete the temp workdir")
    parser.add_argument("--ready-file", type=Path, default=None, help="write endpoints as JSON")
    parser.add_argument("--exit-after-ready", action="store_true", help="stop once up")
    parser.add_argument("--timeout", type=float, default=120.0, help="for each startup step")
    parser.add_argument(
        "--mode",
        choices=("auto", "node", "processes"),
        default="auto",
        help="node: Berth as pods on a local node (Linux, root); processes: the registry "
        "started from the rendered pod spec; auto: node where it can run (default)",
    )
    parser.add_argument(
        "--operator-arg",
        action="append",
        default=[],
        help="extra argument of `python -m registry_operator` (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.workdir is not None:
        workdir, remove = args.workdir.resolve(), False
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir, remove = Path(tempfile.mkdtemp(prefix="berth-dev-")), not args.keep

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    if args.mode != "processes":
        reason = node_stack.unavailable_reason()
        if reason is None:
            with stop_on_signals():
                status = node_stack.run(
                    workdir,
                    samples=args.samples.resolve(),
                    ready_file=args.ready_file,
                    exit_after_ready=args.exit_after_ready,
                    remove=remove,
                    log=log,
                    stop_signals=(Stop,),
                )
            log("stopped")
            return status
        if args.mode == "node":
            print(f"berth-dev: cannot run the local node: {reason}", file=sys.stderr)
            return 1
        log(
            f"no local node here ({reason}): falling back to the process stand-in; the "
            "registry runs as a process started from the pod spec the operator rendered, "
            "and no pod runs"
        )

    stack = LocalStack(
        workdir,
        samples=args.samples.resolve(),
        operator_args=args.operator_arg,
        timeout=args.timeout,
        log=log,
    )
    status = 0
    with stop_on_signals():
        try:
            instances = stack.start()
            seconds = time.monotonic() - started
            print("\n" + banner(instances, stack.plane, seconds) + "\n", flush=True)
            if args.ready_file is not None:
                write_ready_file(args.ready_file, stack, seconds)
            while not args.exit_after_ready:
                time.sleep(1)
                stack.check()
                if stack.follow() and args.ready_file is not None:
                    write_ready_file(args.ready_file, stack, seconds)
                    print(banner(stack.instances, stack.plane, seconds), flush=True)
        except Stop as stop:
            log(f"{stop}: stopping")
        except (StackError, subprocess.SubprocessError, TimeoutError) as exc:
            print(f"berth-dev: {exc}", file=sys.stderr)
            status = 1
        finally:
            stack.stop()
            if remove and status == 0:
                shutil.rmtree(workdir, ignore_errors=True)
            elif status:
                print(f"berth-dev: logs kept in {workdir}", file=sys.stderr)
    log("stopped")
    return status
