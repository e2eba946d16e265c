"""The operator's figures, against the real control plane the integration tests use.

etcd, kube-apiserver and kube-controller-manager (tests/support/control_plane.py) and
the operator as a subprocess (`python -m registry_operator --standalone`,
tests/support/operator_process.py), on this machine. Measured in order, each in its own
namespace, on the same control plane and operator:

1. apply -> children: `kubectl apply` of one Registry (empty spec: the defaults) until
   every child the operator writes for it can be read, and until its status carries the
   generation; Registries one after another, each once the previous one's status is
   written. Which children a Registry has is read from a first Registry (not timed):
   everything labelled with its name in its namespace once it has settled.
2. fan-out: N labelled namespaces exist, a Repository selecting them is applied; time
   until all N pull Secrets can be listed. Then N more namespaces are created in one
   `kubectl apply` while the Repository exists (the namespace watch); time until they
   have theirs too. Then single namespaces, one at a time.
3. Repositories: M Repositories of one Registry, created through the API as fast as
   four threads can, each granting one of ten namespaces; time until every one has a
   status for its generation, and the operator's RSS before, at its peak and after.

The operator's RSS (VmRSS) is sampled every 50 ms throughout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench import procs

API = "berth.dev/v1alpha1"
PULL_LABEL = "bench.berth.dev/pull"
Object = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    registries: int = 20
    namespaces: int = 100
    single_namespaces: int = 5
    repositories: int = 2000
    repository_namespaces: int = 10
    # Stop waiting for any one thing after this long (the run fails).
    timeout_s: float = 600.0


QUICK = Settings(
    registries=3, namespaces=5, single_namespaces=2, repositories=20, repository_namespaces=2
)

TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")


class BenchFailure(RuntimeError):
    pass


def missing_tools() -> list[str]:
    from tests.support import tools

    return [name for name in TOOLS if tools.find_tool(name) is None]


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and every sample (seconds, rounded to the millisecond)."""
    return {
        "median_s": round(_median(samples), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
        "samples_s": [round(s, 3) for s in samples],
    }


class RssSampler:
    """The operator's VmRSS every 50 ms, in a thread, for as long as the run lasts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.current = procs.process_rss_mib(pid)
        self._peak = self.current
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = procs.process_rss_mib(self.pid)
            with self._lock:
                self.current = rss
                self._peak = max(self._peak, rss)

    def reset_peak(self) -> float:
        """Start a new peak from now; returns the RSS at this moment."""
        rss = procs.process_rss_mib(self.pid)
        with self._lock:
            self.current = self._peak = rss
        return rss

    @property
    def peak(self) -> float:
        with self._lock:
            return max(self._peak, procs.process_rss_mib(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Run:
    """One control plane and one operator for the whole section."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        from registry_operator.kube import client as kube_client
        from tests.support.control_plane import ControlPlane
        from tests.support.operator_process import OperatorProcess

        self.s = settings
        self.workdir = workdir
        self.plane = ControlPlane(workdir / "control-plane")
        self.operator: OperatorProcess | None = None
        self._client_type = kube_client.Client
        self._operator_type = OperatorProcess
        self.ports: set[int] = set()  # node proxy ports taken (see fresh_name)
        self.results: dict[str, Any] = {}
        self.sampler: RssSampler | None = None

    # -- plumbing --------------------------------------------------------------------------

    @contextmanager
    def running(self) -> Iterator[Run]:
        try:
            started = time.monotonic()
            self.plane.start()
            self.results["control_plane_start_s"] = round(time.monotonic() - started, 2)
            self.kube = self._client_type.connect(str(self.plane.kubeconfig))
            started = time.monotonic()
            self.operator = self._operator_type(
                self.plane, self.workdir, ("--standalone",), name="operator"
            ).start()
            self.results["operator_start_s"] = round(time.monotonic() - started, 2)
            assert self.operator.pid is not None
            self.sampler = RssSampler(self.operator.pid)
            yield self
        except BaseException:
            if self.operator is not None:
                print(f"--- operator log ---\n{self.operator.log(60)}", file=sys.stderr, flush=True)
            raise
        finally:
            if self.sampler is not None:
                self.sampler.stop()
            if self.operator is not None:
                # Everything goes with the control plane: no cleanup pass to wait for.
                self.operator.stop(clean_up=False)
            if hasattr(self, "kube"):
                self.kube.close()
            self.plane.stop()

    @property
    def pid(self) -> int:
        assert self.operator is not None and self.operator.pid is not None
        return self.operator.pid

    def wait(self, check: Callable[[], T | None], what: str, interval: float = 0.02) -> T:
        deadline = time.monotonic() + self.s.timeout_s
        while True:
            value = check()
            if value:
                return value
            if self.operator is not None and not self.operator.process.running:
                raise BenchFailure(f"the operator exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise BenchFailure(f"timed out after {self.s.timeout_s:.0f} s waiting for {what}")
            time.sleep(interval)

    def settle(self, quiet_cpu_s: float = 0.03, window_s: float = 0.5, most_s: float = 60) -> None:
        """Wait until the operator is idle (less than ``quiet_cpu_s`` of CPU in a window),
        so that one measurement does not start inside the tail of the previous one."""
        deadline = time.monotonic() + most_s
        before = procs.cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(window_s)
            now = procs.cpu_seconds(self.pid)
            if now - before < quiet_cpu_s:
                return
            before = now

    def kubectl(self, *args: str, input: str | None = None) -> None:
        self.plane.kubectl(*args, input=input, timeout=self.s.timeout_s)

    def apply(self, kind: str, name: str, namespace: str, spec: dict[str, Any]) -> None:
        document = {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))

    def fresh_name(self, prefix: str, namespace: str) -> str:
        """``prefix`` or ``prefix-N`` whose default node proxy port no other Registry of
        the run has: two Registries on one port would leave the younger without a
        proxy (NodePortConflict), and so without one of its children."""
        from registry_operator.rendering import names

        for i in range(10_000):
            name = prefix if i == 0 else f"{prefix}-{i:02d}"
            port = names.default_node_port(name, namespace)
            if port not in self.ports:
                self.ports.add(port)
                return name
        raise BenchFailure("no free node proxy port")

    def converged(self, kind: str, namespace: str, name: str) -> bool:
        found = self.kube.find(API, kind, namespace, name)
        if found is None:
            return False
        status = found.get("status") or {}
        return bool(status.get("observedGeneration") == found["metadata"]["generation"])

    def create_namespaces(self, names: list[str], label: str) -> float:
        """One `kubectl apply` of all of them; returns how long kubectl took."""
        items = [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": n, "labels": {PULL_LABEL: label}},
            }
            for n in names
        ]
        started = time.monotonic()
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )
        return time.monotonic() - started

    def rss(self) -> float:
        return round(procs.process_rss_mib(self.pid), 1)

    # -- 1. apply -> children --------------------------------------------------------------

    def children_of(self, namespace: str, registry: str) -> list[tuple[str, str, str]]:
        """(apiVersion, kind, name) of everything labelled with the Registry's name in its
        namespace, from the kinds the operator writes."""
        from registry_operator.kube import resources
        from registry_operator.rendering import names

        found = []
        for resource in resources.KNOWN:
            if not resource.namespaced or resource.api_version in (API, "kopf.dev/v1"):
                continue
            selector = (
                f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY},{names.REGISTRY_LABEL}={registry}"
            )
            for item in self.kube.list(resource.api_version, resource.kind, namespace, selector):
                found.append((resource.api_version, resource.kind, item["metadata"]["name"]))
        return sorted(found)

    def apply_to_children(self) -> None:
        namespace = "bench-apply"
        self.kubectl("create", "namespace", namespace)
        self.kubectl("get", "registries", "-n", namespace)  # kubectl's discovery cache
        reference = self.fresh_name("ref", namespace)
        self.apply("Registry", reference, namespace, {})
        self.wait(lambda: self.converged("Registry", namespace, reference), "the first Registry")
        self.settle()
        children = self.children_of(namespace, reference)

        def renamed(child: str, name: str) -> str:
            # Children are named after their Registry: <registry> or <registry>-<suffix>.
            if child == reference:
                return name
            if child.startswith(reference + "-"):
                return name + child[len(reference) :]
            raise BenchFailure(f"child {child} is not named after its Registry {reference}")

        totals, kubectls, statuses = [], [], []
        for i in range(self.s.registries):
            name = self.fresh_name(f"lat-{i:02d}", namespace)
            expected = [(a, k, renamed(c, name)) for a, k, c in children]
            started = time.monotonic()
            self.apply("Registry", name, namespace, {})
            applied = time.monotonic()

            def missing(expected: list[tuple[str, str, str]] = expected) -> bool:
                # Drop what is found, so each poll asks only for what is still missing.
                expected[:] = [
                    c for c in expected if self.kube.find(c[0], c[1], namespace, c[2]) is None
                ]
                return not expected

            self.wait(missing, f"the children of {name}")
            present = time.monotonic()
            self.wait(partial(self.converged, "Registry", namespace, name), f"{name}'s status")
            converged = time.monotonic()
            totals.append(present - started)
            kubectls.append(applied - started)
            statuses.append(converged - started)
            self.settle()
        self.results["apply"] = {
            "registries": self.s.registries,
            "children": [f"{kind} {c.replace(reference, '<name>', 1)}" for _, kind, c in children],
            "to_children": summary(totals),
            "kubectl_apply": summary(kubectls),
            "to_status": summary(statuses),
            "rss_after_mib": self.rss(),
        }
        print(
            f"  apply -> {len(children)} children: median {_median(totals):.2f} s"
            f" over {len(totals)} Registries",
            file=sys.stderr,
            flush=True,
        )

    # -- 2. fan-out ------------------------------------------------------------------------

    def fan_out(self) -> None:
        from registry_operator.rendering import names

        namespace = "bench-fan"
        count = self.s.namespaces
        label = "fan"
        self.kubectl("create", "namespace", namespace)
        registry = self.fresh_name("fan", namespace)
        self.apply("Registry", registry, namespace, {"storage": {"emptyDir": {}}})
        self.wait(lambda: self.converged("Registry", namespace, registry), "the Registry")
        first = [f"fan-{i:04d}" for i in range(count)]
        self.create_namespaces(first, label)
        selector = names.access_selector(registry, namespace)

        def secrets(total: int) -> bool:
            return len(self.kube.list("v1", "Secret", None, selector)) >= total

        self.settle()  # measure the fan-out, not the namespaces' creation
        assert self.sampler is not None
        before = self.sampler.reset_peak()
        started = time.monotonic()
        self.apply(
            "Repository",
            "fan",
            namespace,
            {
                "registryRef": {"name": registry},
                "path": "fan/out",
                "pullAccess": {"namespaceSelector": {"matchLabels": {PULL_LABEL: label}}},
            },
        )
        self.wait(lambda: secrets(count), f"{count} pull Secrets", interval=0.1)
        by_repository = time.monotonic() - started
        peak_repository = self.sampler.peak
        self.wait(lambda: self.converged("Repository", namespace, "fan"), "the Repository status")
        self.settle()

        second = [f"fan-{i:04d}" for i in range(count, 2 * count)]
        self.sampler.reset_peak()
        started = time.monotonic()
        kubectl_s = self.create_namespaces(second, label)
        self.wait(lambda: secrets(2 * count), f"{count} more pull Secrets", interval=0.1)
        by_watch = time.monotonic() - started
        peak_watch = self.sampler.peak
        self.settle()

        singles = []
        for i in range(self.s.single_namespaces):
            single = f"fan-single-{i}"
            secret = names.access_secret(registry, namespace, "pull")
            started = time.monotonic()
            self.create_namespaces([single], label)
            self.wait(partial(self.kube.find, "v1", "Secret", single, secret), f"{single}'s Secret")
            singles.append(time.monotonic() - started)
            self.settle()
        self.results["fan_out"] = {
            "namespaces": count,
            "repository_to_secrets_s": round(by_repository, 2),
            "new_namespaces_to_secrets_s": round(by_watch, 2),
            "new_namespaces_kubectl_s": round(kubectl_s, 2),
            "single_namespace": summary(singles),
            "rss_before_mib": round(before, 1),
            "rss_peak_repository_mib": round(peak_repository, 1),
            "rss_peak_new_namespaces_mib": round(peak_watch, 1),
            "rss_after_mib": self.rss(),
        }
        print(
            f"  fan-out: {count} namespaces {by_repository:.2f} s, {count} new ones"
            f" {by_watch:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    # -- 3. many Repositories --------------------------------------------------------------

    def repositories(self) -> None:
        namespace = "bench-repos"
        count = self.s.repositories
        self.kubectl("create", "namespace", namespace)
        teams = [f"team-{i}" for i in range(self.s.repository_namespaces)]
        self.create_namespaces(teams, "team")
        registry = self.fresh_name("repos", namespace)
        self.apply("Registry", registry, namespace, {"storage": {"emptyDir": {}}})
        self.wait(lambda: self.converged("Registry", namespace, registry), "the Registry")
        self.settle()
        assert self.sampler is not None
        before = self.sampler.reset_peak()

        def create(i: int) -> None:
            self.kube.create(
                {
                    "apiVersion": API,
                    "kind": "Repository",
                    "metadata": {"name": f"r{i:05d}", "namespace": namespace},
                    "spec": {
                        "registryRef": {"name": registry},
                        "path": f"bench/r{i:05d}",
                        "pullAccess": {"namespaces": [teams[i % len(teams)]]},
                    },
                }
            )

        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(count)))
        created = time.monotonic() - started

        def all_reconciled() -> bool:
            items = self.kube.list(API, "Repository", namespace)
            done = sum(
                1
                for r in items
                if (r.get("status") or {}).get("observedGeneration") == r["metadata"]["generation"]
            )
            return done >= count

        self.wait(all_reconciled, f"{count} Repositories reconciled", interval=1.0)
        reconciled = time.monotonic() - started
        self.settle()  # the peak may come after the last status, as the events arrive
        peak = self.sampler.peak
        self.results["repositories"] = {
            "repositories": count,
            "namespaces": len(teams),
            "create_s": round(created, 2),
            "to_all_reconciled_s": round(reconciled, 2),
            "rss_before_mib": round(before, 1),
            "rss_peak_mib": round(peak, 1),
            "rss_after_mib": self.rss(),
        }
        print(
            f"  {count} Repositories: reconciled in {reconciled:.1f} s, RSS {before:.0f} ->"
            f" peak {peak:.0f} -> {self.rss():.0f} MiB",
            file=sys.stderr,
            flush=True,
        )


def run(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure everything; returns the section's result (without the run's metadata)."""
    with Run(settings, workdir).running() as bench:
        bench.settle()
        bench.results["rss_idle_mib"] = bench.rss()
        print(
            f"bench: operator up (control plane {bench.results['control_plane_start_s']} s),"
            f" RSS {bench.results['rss_idle_mib']} MiB",
            file=sys.stderr,
            flush=True,
        )
        bench.apply_to_children()
        bench.fan_out()
        bench.repositories()
        assert bench.sampler is not None
        return {"settings": asdict(settings), **bench.results}


def namespaces_from_env(default: int) -> int:
    """BENCH_FANOUT_NAMESPACES overrides the fan-out size (as in the integration test)."""
    value = os.environ.get("BENCH_FANOUT_NAMESPACES", "").strip()
    return int(value) if value else default


def kube_versions() -> dict[str, str]:
    from tests.support import tools

    versions = {}
    for name in ("kube-apiserver", "etcd"):
        path = tools.find_tool(name)
        versions[name] = (
            subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
            .stdout.strip()
            .splitlines()[0]
            if path
            else "?"
        )
    return versions
