"""The operator at scale: thousands of Repositories of one Registry (issue 18).

For each size, on a fresh control plane (etcd, kube-apiserver, kube-controller-manager
from `make tools`, no kubelet) and a fresh operator subprocess (`--standalone`):

1. 50 tenant namespaces, one Registry (emptyDir storage), converged, operator idle;
2. N Repositories created through the API by 16 threads as fast as the API server takes
   them ("the bulk apply"), each granting pull to two of the tenant namespaces (the
   shape of issue 18: a platform team with many services);
3. time until every one is `Ready=True` for its generation, counted from the start and
   from the end of the creation: the moment the last one became Ready is its condition's
   lastTransitionTime (whole seconds), read by a list every 5 s (more often would load
   the API server the operator shares); the operator's RSS (VmRSS) sampled every 50 ms:
   before, peak, settled;
4. one more Repository, three times: from its creation until a GET (every 20 ms) sees
   it Ready;
5. the policy Secrets' sizes.

Then the restart case (issue 18's last goal: 1,000 Registries with 3 Repositories each,
all reconciled within 5 minutes of an operator restart, RSS at most 250 MiB), on a
control plane and operator of its own:

1. 20 namespaces; 1,000 Registries (50 in each; emptyDir storage and no node proxy: the
   node ports are a range of 800, so a thousand proxies could not all have one) created
   through the API by 16 threads, each followed by its 3 Repositories, each granting
   pull to another of the namespaces (3,000 pull Secrets); time until every Registry
   has a status for its generation and every Repository is Ready (polled every 5 s),
   the operator's peak RSS, then its CPU use over a minute of idling (the readiness
   poll of every Registry's server, which does not exist here, every 15 s);
2. the operator stopped, every Registry changed while it is down (`spec.logLevel:
   debug`, so every Deployment's config checksum must change), the operator started:
   time until every Deployment's checksum differs and every Registry's
   status.observedGeneration is its generation (polled every 3 s: +/- 3 s), counted
   from the operator's start (its process spawned), and the operator's VmHWM (peak
   RSS) over its life until then and a minute later.

`python -m bench.operator_scale --sizes 2000,10000` (default 500,2000,10000); the result
goes to bench/results/operator_scale.json, `--docs-only` writes its table into
docs/operator.md (between the operator-scale markers). `--timeout` bounds the wait for
all Ready (a size that never gets there is reported with the reasons of those that are
not). `--restart 1000` (the default; 0 skips it) sizes the restart case; `--sizes ''
--restart 1000` runs it alone, and `--docs-only` then writes only its block.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

API = "berth.dev/v1alpha1"
NAMESPACE = "scale"
REGISTRY = "main"
TENANTS = 50
GRANTS = 2  # tenant namespaces per Repository
CREATE_THREADS = 16
RESULT = Path(__file__).resolve().parent / "results" / "operator_scale.json"


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """VmRSS of one process every 50 ms; `mark()` starts a new peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak = _rss_mib(pid)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = _rss_mib(self.pid)
            with self._lock:
                self._peak = max(self._peak, rss)

    def mark(self) -> float:
        rss = _rss_mib(self.pid)
        with self._lock:
            self._peak = rss
        return rss

    @property
    def peak(self) -> float:
        with self._lock:
            return max(self._peak, _rss_mib(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _ready_at(item: dict[str, Any]) -> float | None:
    """When the operator made the Repository Ready for its generation (the condition's
    lastTransitionTime, whole seconds), None when it is not."""
    status = item.get("status") or {}
    if status.get("observedGeneration") != item["metadata"].get("generation"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            moment = datetime.datetime.strptime(
                condition["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ"
            ).replace(tzinfo=datetime.UTC)
            return moment.timestamp()
    return None


def wait_all_ready(
    kube: Any, names: set[str], timeout: float, interval: float = 5.0
) -> tuple[bool, float | None, dict[str, int]]:
    """Poll (every `interval`: a list of thousands of objects loads the API server) until
    every one of `names` is Ready. Returns whether they are, the wall-clock time the
    last became Ready (from the conditions, so the polling interval does not count), and
    the reasons of those that are not."""
    deadline = time.monotonic() + timeout
    while True:
        items = kube.list(API, "Repository", NAMESPACE)
        times: dict[str, float] = {}
        reasons: dict[str, int] = {}
        for item in items:
            name = item["metadata"]["name"]
            if name not in names:
                continue
            at = _ready_at(item)
            if at is not None:
                times[name] = at
                continue
            ready = [
                c
                for c in (item.get("status") or {}).get("conditions") or []
                if c["type"] == "Ready"
            ]
            reason = ready[0]["reason"] if ready else "no status"
            reasons[reason] = reasons.get(reason, 0) + 1
        missing = len(names) - len(times) - sum(reasons.values())
        if missing:
            reasons["not created"] = missing
        if len(times) == len(names):
            return True, max(times.values()), {}
        if time.monotonic() > deadline:
            return False, None, reasons
        time.sleep(interval)


def wait_one_ready(kube: Any, name: str, timeout: float) -> float | None:
    """Seconds on the monotonic clock when it was seen Ready (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = kube.find(API, "Repository", NAMESPACE, name)
        if item is not None and _ready_at(item) is not None:
            return time.monotonic()
        time.sleep(0.02)
    return None


def repository(i: int, name: str | None = None) -> dict[str, Any]:
    team = i % TENANTS
    granted = sorted({f"tenant-{(team + k * 7) % TENANTS:02d}" for k in range(GRANTS)})
    return {
        "apiVersion": API,
        "kind": "Repository",
        "metadata": {"name": name or f"svc-{i:05d}", "namespace": NAMESPACE},
        "spec": {
            "registryRef": {"name": REGISTRY},
            "path": f"team-{team:02d}/{name or f'svc-{i:05d}'}",
            "pullAccess": {"namespaces": granted},
        },
    }


@contextmanager
def stack(
    workdir: Path, operator_args: Sequence[str], services: int = 0
) -> Iterator[tuple[Any, Any, Any]]:
    """A control plane, an API client and the operator process. `services`: how many
    Services it must take (the default range has 254 addresses)."""
    from registry_operator.kube import client as kube_client
    from tests.support.control_plane import SERVICE_CLUSTER_IP_RANGE, ControlPlane
    from tests.support.operator_process import OperatorProcess

    service_range = SERVICE_CLUSTER_IP_RANGE
    if services > 200:
        # 198.18.128.0/20 (4,094 addresses) still starts at the `kubernetes` Service's.
        service_range = SERVICE_CLUSTER_IP_RANGE.split("/")[0] + "/20"
    plane = ControlPlane(workdir / "control-plane", service_cluster_ip_range=service_range)
    operator = None
    kube = None
    try:
        plane.start()
        kube = kube_client.Client.connect(str(plane.kubeconfig))
        operator = OperatorProcess(
            plane, workdir, ("--standalone", *operator_args), name="operator"
        ).start()
        yield plane, kube, operator
    except BaseException:
        if operator is not None:
            print(f"--- operator log ---\n{operator.log(60)}", file=sys.stderr, flush=True)
        raise
    finally:
        if operator is not None:
            operator.stop(clean_up=False)
        if kube is not None:
            kube.close()
        plane.stop()


def settle(pid: int, quiet_cpu_s: float = 0.05, window_s: float = 1.0, most_s: float = 120) -> None:
    """Until the operator spends less than `quiet_cpu_s` of CPU in a window."""
    deadline = time.monotonic() + most_s
    before = _cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = _cpu_s(pid)
        if now - before < quiet_cpu_s:
            return
        before = now


def policy_sizes(kube: Any) -> dict[str, Any]:
    from registry_operator.rendering import names

    selector = f"{names.REGISTRY_LABEL}={REGISTRY},{names.COMPONENT_LABEL}=policy"
    found = kube.list("v1", "Secret", NAMESPACE, selector)
    sizes = sorted(
        sum(len(base64.b64decode(v)) for v in (s.get("data") or {}).values()) for s in found
    )
    return {
        "secrets": len(sizes),
        "largest_bytes": max(sizes, default=0),
        "total_bytes": sum(sizes),
    }


def measure(
    size: int, workdir: Path, timeout: float, operator_args: Sequence[str]
) -> dict[str, Any]:
    with stack(workdir, operator_args) as (plane, kube, operator):
        namespaces = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
            for n in [NAMESPACE, *(f"tenant-{i:02d}" for i in range(TENANTS))]
        ]
        plane.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": namespaces}),
        )
        kube.create(
            {
                "apiVersion": API,
                "kind": "Registry",
                "metadata": {"name": REGISTRY, "namespace": NAMESPACE},
                "spec": {"storage": {"emptyDir": {}}},
            }
        )
        deadline = time.monotonic() + 120
        while True:
            body = kube.find(API, "Registry", NAMESPACE, REGISTRY) or {}
            if (body.get("status") or {}).get("observedGeneration") == 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the Registry did not converge")
            time.sleep(0.2)
        pid = operator.pid
        settle(pid)
        sampler = Sampler(pid)
        result: dict[str, Any] = {"repositories": size, "tenant_namespaces": TENANTS}
        try:
            result["rss_before_mib"] = round(sampler.mark(), 1)
            wanted = {f"svc-{i:05d}" for i in range(size)}
            load_before = os.getloadavg()[0]
            wall = time.time()
            started = time.monotonic()
            with ThreadPoolExecutor(CREATE_THREADS) as pool:
                list(pool.map(lambda i: kube.create(repository(i)), range(size)))
            created = time.monotonic()
            created_wall = wall + (created - started)
            result["create_s"] = round(created - started, 2)
            print(f"  {size}: created in {created - started:.1f} s", file=sys.stderr, flush=True)
            done, last, reasons = wait_all_ready(kube, wanted, timeout)
            result["all_ready"] = done
            if done and last is not None:
                # lastTransitionTime has whole seconds: +/- 1 s.
                result["all_ready_from_start_s"] = round(last - wall, 1)
                result["all_ready_from_created_s"] = round(max(0.0, last - created_wall), 1)
            else:
                result["not_ready_reasons"] = reasons
            result["rss_peak_mib"] = round(sampler.peak, 1)
            print(
                f"  {size}: all Ready {done}: {result.get('all_ready_from_start_s')} s from the"
                f" start, {result.get('all_ready_from_created_s')} s after the last was created;"
                f" RSS peak {sampler.peak:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
            settle(pid)
            result["rss_settled_mib"] = round(_rss_mib(pid), 1)
            one_more: list[float | None] = []
            if done:
                for k in range(3):
                    name = f"extra-{k}"
                    started = time.monotonic()
                    kube.create(repository(k, name))
                    seen = wait_one_ready(kube, name, 60)
                    one_more.append(None if seen is None else round(seen - started, 2))
                    settle(pid, window_s=0.5)
            result["one_more_s"] = one_more
            result["rss_end_mib"] = round(_rss_mib(pid), 1)
            result["rss_peak_overall_mib"] = round(sampler.peak, 1)
            result["policy"] = policy_sizes(kube)
            result["load_average_before_after"] = [
                round(load_before, 2),
                round(os.getloadavg()[0], 2),
            ]
            print(f"  {size}: {json.dumps(result)}", file=sys.stderr, flush=True)
        finally:
            sampler.stop()
        return result


# --- the restart case -------------------------------------------------------------------

FLEET_NAMESPACES = 20
PER_REGISTRY = 3  # Repositories of each Registry
RESTART_POLL_S = 3.0


def _vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fleet_registry(i: int) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Registry",
        "metadata": {"name": f"reg-{i:04d}", "namespace": f"fleet-{i % FLEET_NAMESPACES:02d}"},
        "spec": {"storage": {"emptyDir": {}}, "nodeProxy": {"enabled": False}},
    }


def fleet_repositories(i: int) -> list[dict[str, Any]]:
    """The Registry's Repositories, each granting pull to another namespace."""
    namespace = i % FLEET_NAMESPACES
    return [
        {
            "apiVersion": API,
            "kind": "Repository",
            "metadata": {"name": f"reg-{i:04d}-{k}", "namespace": f"fleet-{namespace:02d}"},
            "spec": {
                "registryRef": {"name": f"reg-{i:04d}"},
                "path": f"team-{i:04d}/svc-{k}",
                "pullAccess": {
                    "namespaces": [f"fleet-{(namespace + 1 + k) % FLEET_NAMESPACES:02d}"]
                },
            },
        }
        for k in range(PER_REGISTRY)
    ]


def _key(item: dict[str, Any]) -> tuple[str, str]:
    return item["metadata"]["namespace"], item["metadata"]["name"]


def registries_behind(kube: Any) -> int:
    """Registries whose status does not carry their generation."""
    return sum(
        1
        for r in kube.list(API, "Registry", None)
        if (r.get("status") or {}).get("observedGeneration") != r["metadata"].get("generation")
    )


def repositories_not_ready(kube: Any) -> int:
    return sum(1 for r in kube.list(API, "Repository", None) if _ready_at(r) is None)


def checksums(kube: Any) -> dict[tuple[str, str], str]:
    """Every Registry's server Deployment's config checksum, by (namespace, Registry)."""
    from registry_operator.rendering import names

    found = {}
    selector = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"
    for deployment in kube.list("apps/v1", "Deployment", None, selector):
        registry = deployment["metadata"].get("labels", {}).get(names.REGISTRY_LABEL)
        if registry != deployment["metadata"]["name"]:
            continue
        template = deployment["spec"]["template"]["metadata"]
        found[_key(deployment)] = (template.get("annotations") or {}).get(
            names.CHECKSUM_ANNOTATION, ""
        )
    return found


def idle_cpu(pid: int, seconds: float) -> float:
    """The operator's CPU use over `seconds`, in percent of one core."""
    before = _cpu_s(pid)
    time.sleep(seconds)
    return round(100 * (_cpu_s(pid) - before) / seconds, 1)


def measure_restart(
    registries: int,
    workdir: Path,
    timeout: float,
    operator_args: Sequence[str] = (),
    idle_s: float = 60.0,
) -> dict[str, Any]:
    """The restart case (see the module docstring); its result."""
    result: dict[str, Any] = {
        "registries": registries,
        "repositories": registries * PER_REGISTRY,
        "namespaces": FLEET_NAMESPACES,
    }

    def say(message: str) -> None:
        print(f"  restart ({registries}): {message}", file=sys.stderr, flush=True)

    with stack(workdir, operator_args, services=registries) as (plane, kube, operator):
        namespaces = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"fleet-{i:02d}"}}
            for i in range(FLEET_NAMESPACES)
        ]
        plane.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": namespaces}),
        )
        pid = operator.pid
        settle(pid)
        sampler = Sampler(pid)
        try:
            result["rss_before_mib"] = round(sampler.mark(), 1)
            result["load_average_before"] = round(os.getloadavg()[0], 2)

            def create(i: int) -> None:
                kube.create(fleet_registry(i))
                for repository in fleet_repositories(i):
                    kube.create(repository)

            started = time.monotonic()
            with ThreadPoolExecutor(CREATE_THREADS) as pool:
                list(pool.map(create, range(registries)))
            result["create_s"] = round(time.monotonic() - started, 1)
            say(f"created in {result['create_s']} s")
            deadline = time.monotonic() + timeout
            while True:
                behind = registries_behind(kube)
                not_ready = repositories_not_ready(kube) if not behind else 0
                if not behind and not not_ready:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"not converged after {timeout:.0f} s: {behind} Registries without a"
                        f" status for their generation, {not_ready} Repositories not Ready"
                    )
                time.sleep(5)
            result["converged_s"] = round(time.monotonic() - started, 1)
            result["converged_rss_peak_mib"] = round(sampler.peak, 1)
            say(f"converged in {result['converged_s']} s, RSS peak {sampler.peak:.0f} MiB")
            settle(pid, most_s=60)
            result["idle_rss_mib"] = round(_rss_mib(pid), 1)
            result["idle_cpu_percent"] = idle_cpu(pid, idle_s)
            result["first_vm_hwm_mib"] = round(_vm_hwm_mib(pid), 1)
            say(f"idle: {result['idle_cpu_percent']} % CPU, RSS {result['idle_rss_mib']} MiB")
        finally:
            sampler.stop()

        before = checksums(kube)
        if len(before) != registries:
            raise RuntimeError(f"{len(before)} server Deployments for {registries} Registries")
        operator.stop(clean_up=False)
        started = time.monotonic()

        def change(i: int) -> None:
            body = fleet_registry(i)
            kube.patch(
                API,
                "Registry",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                {"spec": {"logLevel": "debug"}},
            )

        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(pool.map(change, range(registries)))
        result["change_s"] = round(time.monotonic() - started, 1)
        say(f"changed while the operator was down in {result['change_s']} s")
        result["load_average_at_restart"] = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        operator.start()
        result["restart_liveness_s"] = round(time.monotonic() - started, 1)
        pid = operator.pid
        progress: list[list[float]] = []
        while True:
            polled = time.monotonic()
            behind = registries_behind(kube)
            now = checksums(kube)
            stale = sum(1 for key, value in before.items() if now.get(key, value) == value)
            elapsed = time.monotonic() - started
            progress.append([round(elapsed, 1), registries - stale, registries - behind])
            if not behind and not stale:
                break
            if elapsed > timeout or not operator.process.running:
                break
            time.sleep(max(0.0, RESTART_POLL_S - (time.monotonic() - polled)))
        result["restart_reconciled"] = not behind and not stale
        result["restart_reconciled_s"] = round(elapsed, 1)
        if behind or stale:
            result["restart_left"] = {"registries_behind": behind, "checksums_unchanged": stale}
        result["restart_vm_hwm_mib"] = round(_vm_hwm_mib(pid), 1)
        result["restart_cpu_s"] = round(_cpu_s(pid), 1)  # a new process
        result["restart_load_average"] = round(os.getloadavg()[0], 2)
        # (seconds, Deployments changed, Registries with their generation's status)
        result["restart_progress"] = progress[:: max(1, len(progress) // 30)] + progress[-1:]
        say(
            f"reconciled {result['restart_reconciled']} in {elapsed:.1f} s after the restart,"
            f" VmHWM {result['restart_vm_hwm_mib']} MiB, {result['restart_cpu_s']} s CPU"
        )
        result["restart_repositories_not_ready"] = repositories_not_ready(kube)
        settle(pid, most_s=60)
        result["restart_idle_cpu_percent"] = idle_cpu(pid, idle_s)
        result["restart_idle_rss_mib"] = round(_rss_mib(pid), 1)
        result["restart_vm_hwm_end_mib"] = round(_vm_hwm_mib(pid), 1)
        result["load_average_after"] = round(os.getloadavg()[0], 2)
        log = workdir / "operator.log"
        if log.exists():
            keep = os.environ.get("BERTH_BENCH_KEEP_LOG")
            if keep:
                Path(keep).write_bytes(log.read_bytes())
        say(json.dumps(result))
    return result


DOCS = Path(__file__).resolve().parents[1] / "docs" / "operator.md"
MARKERS = ("<!-- operator-scale:start -->", "<!-- operator-scale:end -->")
RESTART_MARKERS = ("<!-- operator-restart:start -->", "<!-- operator-restart:end -->")


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _run_line(document: dict[str, Any]) -> str:
    return (
        f"Run of {document['date']}, commit {document['commit']}"
        + (f" ({document['label']})" if document.get("label") else "")
        + f", {document['machine']['cpus']} CPUs, Python {document['machine']['python']}."
    )


def markdown(document: dict[str, Any]) -> str:
    """The figures of a saved run, as docs/operator.md shows them (both blocks)."""
    return "\n".join(b for b in (sizes_markdown(document), restart_markdown(document)) if b)


def sizes_markdown(document: dict[str, Any]) -> str:
    if not document.get("runs"):
        return ""
    lines = [
        _run_line(document),
        "",
        "| Repositories | created in | all Ready (from the start) | after the last was created"
        " | one more Repository Ready | operator RSS: before → peak → settled"
        " | policy Secrets (largest) | load average before / after |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for run in document["runs"]:
        if run.get("all_ready"):
            ready = _s(run.get("all_ready_from_start_s"))
            after = _s(run.get("all_ready_from_created_s"))
        else:
            reasons = run.get("not_ready_reasons", {}).items()
            counts = ", ".join(f"{k or 'no status'}: {v}" for k, v in reasons)
            ready, after = f"never ({counts})", "—"
        more = ", ".join(_s(v) for v in run.get("one_more_s") or []) or "—"
        policy = run.get("policy") or {}
        load = run.get("load_average_before_after") or ["?", "?"]
        lines.append(
            f"| {run['repositories']:,} | {_s(run.get('create_s'))} | {ready} | {after} | {more}"
            f" | {run['rss_before_mib']:.0f} → {run['rss_peak_overall_mib']:.0f} →"
            f" {run['rss_end_mib']:.0f} MiB | {policy.get('secrets', 0)}"
            f" ({policy.get('largest_bytes', 0) / 1024:.0f} KiB) | {load[0]} / {load[1]} |"
        )
    return "\n".join(lines) + "\n"


def restart_markdown(document: dict[str, Any]) -> str:
    """The restart case of a saved run: one row for the convergence, one for the restart."""
    run = document.get("restart")
    if not run:
        return ""
    in_time = run["restart_reconciled"] and run["restart_reconciled_s"] <= 300
    small = run["restart_vm_hwm_end_mib"] <= 250
    goal = f"all within 5 minutes {'met' if in_time else 'missed'}, RSS ≤ 250 MiB"
    goal += " met" if small else " missed"
    if run["restart_reconciled"]:
        restart = f"{run['restart_reconciled_s']:.0f} s (±3 s)"
    else:
        left = run.get("restart_left") or {}
        restart = (
            f"not within {run['restart_reconciled_s']:.0f} s: {left.get('checksums_unchanged')}"
            f" Deployments unchanged, {left.get('registries_behind')} statuses behind"
        )
    return (
        "\n".join(
            [
                _run_line(document),
                "",
                f"{run['registries']:,} Registries in {run['namespaces']} namespaces,"
                f" {run['repositories']:,} Repositories; the goal: {goal}.",
                "",
                "| phase | took | operator RSS | operator CPU | load average |",
                "| --- | ---: | --- | --- | --- |",
                f"| created through the API (16 threads) | {run['create_s']:.0f} s"
                f" | {run['rss_before_mib']:.0f} MiB before | | {run['load_average_before']} |",
                f"| all converged (from the start of the creation, ±5 s)"
                f" | {run['converged_s']:.0f} s"
                f" | peak {run['converged_rss_peak_mib']:.0f} MiB (VmHWM"
                f" {run['first_vm_hwm_mib']:.0f}) | | |",
                f"| idle (the readiness polls, the resync) | 60 s | {run['idle_rss_mib']:.0f} MiB"
                f" | {run['idle_cpu_percent']} % of a core | |",
                f"| every Registry changed, the operator down | {run['change_s']:.0f} s | | |"
                f" {run['load_average_at_restart']} |",
                f"| restart: every Deployment's checksum changed, every status current | {restart}"
                f" | VmHWM {run['restart_vm_hwm_mib']:.0f} MiB | {run['restart_cpu_s']:.0f} s"
                f" | {run['restart_load_average']} |",
                "| the minute after (idle, once all are done) | 60 s"
                f" | {run['restart_idle_rss_mib']:.0f} MiB (VmHWM"
                f" {run['restart_vm_hwm_end_mib']:.0f}) | {run['restart_idle_cpu_percent']} %"
                f" of a core | {run['load_average_after']} |",
            ]
        )
        + "\n"
    )


def _replace_block(text: str, markers: tuple[str, str], block: str) -> str:
    start, end = text.index(markers[0]), text.index(markers[1])
    return text[: start + len(markers[0])] + "\n" + block + text[end:]


def write_docs(document: dict[str, Any], path: Path = DOCS) -> None:
    """Each block whose figures the document has (a run of the restart case alone leaves
    the sizes' block as it was, with its own date and commit)."""
    text = path.read_text()
    if document.get("runs"):
        text = _replace_block(text, MARKERS, sizes_markdown(document))
    if document.get("restart"):
        text = _replace_block(text, RESTART_MARKERS, restart_markdown(document))
    path.write_text(text)


SIZES = (500, 2000, 10_000)
QUICK_SIZES = (100,)
RESTART = 1000
QUICK_RESTART = 20


def measure_all(
    sizes: Sequence[int],
    label: str = "",
    timeout: float = 300.0,
    restart: int = 0,
    operator_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Every size, then the restart case (of `restart` Registries, unless 0), each on its
    own control plane; the saved document."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    runs = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="berth-operator-scale-") as tmp:
            runs.append(measure(size, Path(tmp), timeout, operator_args))
    document: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "label": label,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
    }
    if restart:
        with tempfile.TemporaryDirectory(prefix="berth-operator-restart-") as tmp:
            # Converging and restarting take longer than one size: the timeout is for each.
            document["restart"] = measure_restart(
                restart, Path(tmp), max(timeout, 600.0), operator_args
            )
    return document


def run_section(results: Path, docs_dir: Path | None, quick: bool = False) -> Path:
    """`python -m bench --only operator-scale`: measure, save, and (unless quick or no
    docs directory) write the table into docs/operator.md."""
    document = (
        measure_all(QUICK_SIZES, restart=QUICK_RESTART)
        if quick
        else measure_all(SIZES, restart=RESTART)
    )
    path = results / "operator_scale.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    if docs_dir is not None and not quick:
        write_docs(document, docs_dir / "operator.md")
    return path


def _stop(signum: int, frame: object) -> None:
    # SIGTERM (and SIGINT, which a background job ignores) end the run through the
    # `finally` blocks: the control plane and the operator are stopped, not orphaned.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__)
    parser.add_argument("--sizes", default="500,2000,10000")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for all Ready"
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--label", default="", help="a note saved with the run (e.g. before/after)")
    parser.add_argument("--operator-arg", action="append", default=[], help="extra operator flag")
    parser.add_argument(
        "--restart",
        type=int,
        default=RESTART,
        help="Registries of the restart case (3 Repositories each; 0 skips it)",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="measure nothing: write the figures of the saved result into docs/operator.md",
    )
    args = parser.parse_args(argv)
    if args.docs_only:
        write_docs(json.loads(args.out.read_text()))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    document = measure_all(sizes, args.label, args.timeout, args.restart, args.operator_arg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
