"""A real one-node cluster on this machine: pods really run.

On top of a control plane started with `node_ip=NODE_IP` (tests/support/control_plane.py)
this starts what a node is made of: containerd (Debian's, with its CRI plugin and runc)
on its own socket and state directories, CNI (bridge + host-local + portmap), a kubelet,
kube-proxy (iptables mode) and kube-scheduler built from the pinned `k8s.io/kubernetes`
module, CoreDNS as a Deployment behind the `kube-dns` Service, and a small hostPath
provisioner (a thread here) so that PVCs bind. Every image comes from this machine: the
sandbox and CoreDNS images are made from binaries built by `make tools`.

Addresses: the node IP is a /32 on `lo` (the kernel here has no `dummy` links), pods
get addresses on the `berth0` bridge and Services are virtual; all three lie in
198.18.0.0/15 (RFC 2544's benchmarking range), which bring-up blackholes so that
nothing addressed there ever leaves the machine, and forwarding from the pod bridge to
any other interface is dropped: pods reach this machine only.

One node per machine: everything lives under NODE_ROOT, and bring-up first cleans what a
crashed run left there (processes, mounts, iptables rules, links, sysctls, cgroups).
Teardown does the same and then checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .control_plane import KUBERNETES_SERVICE_IP, SERVICE_CLUSTER_IP_RANGE, ControlPlane
from .node_images import busybox_image, static_binary_image, write_archive
from .processes import ManagedProcess, free_port, wait_until
from .tools import in_ci, read_versions, require_tool

NODE_NAME = "berth-node"
NODE_IP = "198.18.0.1"
TEST_NET = "198.18.0.0/15"
POD_CIDR = "198.18.64.0/24"
DNS_SERVICE_IP = "198.18.128.10"
BRIDGE = "berth0"
CNI_NETWORK = "berth-node"
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
NODE_ROOT = Path("/var/lib/berth-node")
# What bring-up changed on the host outside NODE_ROOT, for teardown (or the next
# bring-up, after a crash) to put back.
HOST_STATE = Path("/var/lib/berth-node.host.json")
CGROUP_ROOT = "berth-node"
STORAGE_CLASS = "berth-local"
PROVISIONER = "berth.dev/test-hostpath"
# Rules of ours in iptables: kube-proxy's and the kubelet's (KUBE-), CNI's (CNI-) and
# the egress guard below (BERTH-).
RULE_MARKERS = ("KUBE-", "CNI-", "BERTH-")
# The kubelet writes these (protectKernelDefaults: false); bring-up writes the first two.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
)
# Fixed paths the kubelet and CNI use whatever their configuration says.
FIXED_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/run/netns"),
)
NODE_COMPONENTS = ("kubelet", "kube-proxy", "kube-scheduler", "coredns", "pause")


class NodeUnavailable(RuntimeError):
    """This machine cannot run the node (not Linux, not root, a tool missing)."""


def unavailable_reason() -> str | None:
    """Why no node can run here, or None. Tools are checked by `require_tool`."""
    if sys.platform != "linux":
        return "the test node needs Linux"
    if os.geteuid() != 0:
        return "the test node needs root (containerd, iptables, mounts)"
    missing = [p for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
    if missing:
        return (
            f"CNI plugins missing in {CNI_BIN_DIR}: {missing}"
            " (Debian containernetworking-plugins; run `make tools`)"
        )
    return None


def _run(*argv: str, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        _sysctl_path(name).write_text(value)


# --- cleaning the host: after teardown, and before bring-up after a crash -------------------


def _our_processes() -> list[int]:
    """Processes whose command line names NODE_ROOT (containerd, its shims, node
    components) or that sit in the node's cgroups (containers)."""
    found: set[int] = set()
    marker = str(NODE_ROOT).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.add(int(entry))
    for procs in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}/**/cgroup.procs"):
        with contextlib.suppress(OSError):
            found.update(int(p) for p in procs.read_text().split())
    return sorted(found)


def _kill_processes() -> None:
    for _ in range(20):
        pids = _our_processes()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)


def _our_mounts() -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(NODE_ROOT) or point.startswith(f"{NODE_ROOT}/"):
            mounts.append(point)
    return mounts


def _unmount_all() -> None:
    for _ in range(5):
        mounts = _our_mounts()
        if not mounts:
            return
        for point in sorted(mounts, key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _iptables_variants() -> list[str]:
    return [v for v in ("iptables-nft", "iptables-legacy") if _exists_on_path(f"{v}-save")]


def _exists_on_path(name: str) -> bool:
    return any((Path(d) / name).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin"))


def _our_rules() -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    for variant in _iptables_variants():
        saved = _run(f"{variant}-save", check=False)
        ours = [line for line in saved.splitlines() if any(m in line for m in RULE_MARKERS)]
        if ours:
            rules[variant] = ours
    return rules


def _remove_rules() -> None:
    """Drop every rule and chain of ours, keeping the rest of each table as it is."""
    for variant in _our_rules():
        saved = _run(f"{variant}-save")
        kept = [line for line in saved.splitlines() if not any(m in line for m in RULE_MARKERS)]
        _run(f"{variant}-restore", input="\n".join(kept) + "\n", check=False)


def _our_links() -> list[str]:
    links = []
    for line in _run("ip", "-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == BRIDGE:
            links.append(name)
    return links


def _our_addresses() -> list[str]:
    found = []
    if f"{NODE_IP}/32" in _run("ip", "-o", "addr", "show", "dev", "lo", check=False):
        found.append(f"{NODE_IP}/32 on lo")
    if TEST_NET in _run("ip", "route", "show", "type", "blackhole", check=False):
        found.append(f"blackhole route {TEST_NET}")
    return found


def _our_cgroups() -> list[Path]:
    return sorted(
        Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}"), key=lambda p: str(p), reverse=True
    )


def _remove_cgroups() -> None:
    for top in _our_cgroups():
        directories = sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        for directory in [*directories, top]:
            with contextlib.suppress(OSError):
                directory.rmdir()


def clean_host() -> None:
    """Remove whatever a node left on this machine; safe to call any time, twice."""
    _kill_processes()
    _unmount_all()
    _remove_rules()
    for link in _our_links():
        _run("ip", "link", "delete", link, check=False)
    _run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo", check=False)
    _run("ip", "route", "del", "blackhole", TEST_NET, check=False)
    _remove_cgroups()
    if HOST_STATE.exists():
        state = json.loads(HOST_STATE.read_text())
        for name, value in state.get("sysctls", {}).items():
            if value is not None:
                _write_sysctl(name, value)
        for path in state.get("created", []):
            subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(NODE_ROOT)], check=False)
    HOST_STATE.unlink(missing_ok=True)


def leftovers() -> list[str]:
    """What of a node is still on this machine (empty after a clean teardown)."""
    left = [f"process {pid}" for pid in _our_processes()]
    left += [f"mount {m}" for m in _our_mounts()]
    left += [f"{v} rule {r}" for v, rules in _our_rules().items() for r in rules]
    left += [f"link {name}" for name in _our_links()]
    left += _our_addresses()
    left += [f"cgroup {p}" for p in _our_cgroups()]
    if NODE_ROOT.exists():
        left.append(f"directory {NODE_ROOT}")
    if HOST_STATE.exists():
        left.append(f"file {HOST_STATE}")
    return left


def prepare_host() -> None:
    """Clean what a crashed run left, record the host state, and set up the addresses
    the control plane binds: call before starting a ControlPlane with node_ip=NODE_IP."""
    clean_host()
    state = {
        "sysctls": {name: _read_sysctl(name) for name in SYSCTLS},
        "created": [str(p) for p in FIXED_PATHS if not p.exists()],
    }
    NODE_ROOT.mkdir(parents=True)
    HOST_STATE.write_text(json.dumps(state, indent=2))
    _write_sysctl("net/ipv4/ip_forward", "1")
    _write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    _run("ip", "route", "add", "blackhole", TEST_NET)
    # The host itself reaches Services too (kube-proxy's rules translate them on output),
    # but only when routing finds a way first: through the pod bridge, which CNI would
    # otherwise create with the first pod, and never off the machine.
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "link", "set", BRIDGE, "up")
    _run("ip", "route", "add", SERVICE_CLUSTER_IP_RANGE, "dev", BRIDGE)
    # Pods talk to this machine only: nothing from the pod bridge is forwarded elsewhere.
    for variant in _iptables_variants()[:1]:
        _run(variant, "-N", "BERTH-NODE-EGRESS")
        _run(variant, "-A", "BERTH-NODE-EGRESS", "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")
        _run(variant, "-I", "FORWARD", "1", "-j", "BERTH-NODE-EGRESS")


# --- the node ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeImages:
    pause: str
    coredns: str


class Node:
    """The node's processes and in-cluster add-ons, on a control plane made for it."""

    def __init__(self, plane: ControlPlane, workdir: Path, *, ready_timeout: float = 180) -> None:
        self.plane = plane
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.logs = workdir / "logs"
        self.processes: list[ManagedProcess] = []
        self.containerd_socket = NODE_ROOT / "containerd" / "containerd.sock"
        versions = read_versions()
        self.images = NodeImages(
            pause=f"berth.local/pause:{versions['PAUSE_VERSION']}",
            coredns=f"berth.local/coredns:{versions['COREDNS_VERSION']}",
        )
        self.ctr_path = Path("ctr")
        self.timings: dict[str, float] = {}
        self._provisioner: HostPathProvisioner | None = None

    # -- bring-up --

    def start(self) -> Node:
        tools = {name: require_tool(name) for name in NODE_COMPONENTS}
        containerd = require_tool("containerd")
        self.ctr_path = require_tool("ctr")
        for name in ("runc", "iptables", "conntrack", "busybox"):
            require_tool(name)
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._start_containerd(containerd)
        self._load_images(tools["pause"], tools["coredns"])
        self._write_cni_config()
        self._start_kubelet(tools["kubelet"])
        self._start_kube_proxy(tools["kube-proxy"])
        self._start_scheduler(tools["kube-scheduler"])
        self._wait_node_ready()
        self.timings["node_ready"] = time.monotonic() - started
        self._provisioner = HostPathProvisioner(self.plane, NODE_ROOT / "volumes")
        self._provisioner.start()
        self._deploy_coredns()
        self.timings["dns_ready"] = time.monotonic() - started
        return self

    def _launch(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        process.start()
        return process

    def _start_containerd(self, containerd: Path) -> None:
        root = NODE_ROOT / "containerd"
        config = root / "config.toml"
        root.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(
            f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{root / "containerd.sock.ttrpc"}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
[{cri}]
  sandbox_image = "{self.images.pause}"
  # Root here lacks CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj below ours.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{NODE_ROOT / "cni" / "net.d"}"
"""
        )
        process = self._launch(
            ManagedProcess(
                "containerd",
                [containerd, "--config", config, "--log-level", "warn"],
                self.logs / "containerd.log",
            )
        )
        wait_until(
            lambda: self.ctr("version", check=False).returncode == 0,
            timeout=60,
            what="containerd answering on its socket",
            process=process,
        )

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr` against the node's containerd, in the CRI's namespace (k8s.io)."""
        result = subprocess.run(
            [str(self.ctr_path), "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr}")
        return result

    def import_image(self, archive: Path) -> None:
        """Load an OCI image archive into the node's containerd (as a pre-pulled image)."""
        self.ctr("images", "import", str(archive))

    def _load_images(self, pause: Path, coredns: Path) -> None:
        images = self.workdir / "images"
        for spec in (
            static_binary_image(self.images.pause, pause),
            static_binary_image(self.images.coredns, coredns),
        ):
            archive = images / (spec.name.replace("/", "_").replace(":", "_") + ".tar")
            write_archive(spec, archive)
            self.import_image(archive)

    def _write_cni_config(self) -> None:
        conf_dir = NODE_ROOT / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(NODE_ROOT / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (conf_dir / "10-berth.conflist").write_text(json.dumps(config, indent=2))

    def _kubeconfig(self, stem: str, common_name: str) -> Path:
        from .control_plane import write_kubeconfig

        pair = self.plane.ca.issue(stem, common_name, organizations=["system:masters"], client=True)
        return write_kubeconfig(
            self.workdir / f"{stem}.kubeconfig",
            server=self.plane.server,
            ca=self.plane.ca_cert,
            client=pair,
            user=common_name,
        )

    def _make_cgroup_root(self) -> None:
        """The kubelet puts pods under `cgroupRoot` but does not create it: one directory
        per cgroup v1 hierarchy (cpuset needs its cpus and mems filled in first)."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            group = hierarchy / CGROUP_ROOT
            group.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (group / knob).exists() and not (group / knob).read_text().strip():
                    (group / knob).write_text((hierarchy / knob).read_text())

    def _start_kubelet(self, kubelet: Path) -> None:
        self._make_cgroup_root()
        root = NODE_ROOT / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        kubeconfig = self._kubeconfig("kubelet", f"system:node:{NODE_NAME}")
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "clusterDomain": "cluster.local",
            "clusterDNS": [DNS_SERVICE_IP],
            # Pods get the cluster's DNS only: nothing asks the host's resolvers.
            "resolvConf": "",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "podLogsDir": str(NODE_ROOT / "pod-logs"),
            "serializeImagePulls": False,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "protectKernelDefaults": False,
            "registerNode": True,
        }
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._launch(
            ManagedProcess(
                "kubelet",
                [
                    kubelet,
                    f"--config={config_path}",
                    f"--kubeconfig={kubeconfig}",
                    f"--root-dir={root}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-ip={NODE_IP}",
                    "--v=1",
                ],
                self.logs / "kubelet.log",
            )
        )

    def _start_kube_proxy(self, kube_proxy: Path) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            # Pods on one bridge reaching each other through a Service need SNAT
            # (hairpin); masquerading all Service traffic gives it without more setup.
            "iptables": {"masqueradeAll": True, "localhostNodePorts": False},
            # The conntrack table is the host's: kube-proxy must not resize it.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }
        config_path = self.workdir / "kube-proxy.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._launch(
            ManagedProcess(
                "kube-proxy",
                [kube_proxy, f"--config={config_path}", "--v=1"],
                self.logs / "kube-proxy.log",
            )
        )

    def _start_scheduler(self, scheduler: Path) -> None:
        kubeconfig = self._kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._launch(
            ManagedProcess(
                "kube-scheduler",
                [
                    scheduler,
                    f"--kubeconfig={kubeconfig}",
                    f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    # A pod tried while its claim was still unbound ("pod has unbound
                    # immediate PersistentVolumeClaims") was seen to wait the whole
                    # default 5 minutes after the claim was bound: the bind did not
                    # requeue it. Retried every 10 s at the latest here.
                    "--pod-max-in-unschedulable-pods-duration=10s",
                ],
                self.logs / "kube-scheduler.log",
            )
        )

    def _node_ready(self) -> bool:
        result = self.plane.kubectl(
            "get",
            "node",
            NODE_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
        )
        return result.stdout.strip() == "True"

    def _wait_node_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not self._node_ready():
            for process in self.processes:
                if not process.running:
                    raise process.startup_error("exited before the node was Ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not Ready after {self.ready_timeout:.0f}s")
            time.sleep(0.5)

    def _deploy_coredns(self) -> None:
        self.plane.kubectl("apply", "-f", "-", input=coredns_manifests(self.images.coredns))
        self.plane.kubectl(
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=180s",
            timeout=200,
        )

    # -- helpers for tests --

    def load_busybox(self, name: str, message: str) -> Path:
        """Write a busybox image whose pods print `message`; returns its OCI archive."""
        archive = self.workdir / "images" / (name.replace("/", "_").replace(":", "_") + ".tar")
        write_archive(busybox_image(name, require_tool("busybox"), message=message), archive)
        return archive

    def logs_summary(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.log_path} ---\n{p.log_tail(lines)}" for p in self.processes)

    # -- teardown --

    def stop(self) -> None:
        """Stop the node's processes; `clean_host()` (after the control plane stopped,
        since it listens on the node IP) removes the rest."""
        if self._provisioner is not None:
            self._provisioner.stop()
        for process in reversed(self.processes):
            process.stop(timeout=15)


# --- cluster add-ons ------------------------------------------------------------------------


def coredns_manifests(image: str) -> str:
    """CoreDNS as the cluster's DNS: answers for cluster.local only (nothing is
    forwarded: pods have no business resolving names outside the cluster here)."""
    corefile = """.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    loop
}
"""
    labels = {"k8s-app": "kube-dns"}
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]
    return yaml.safe_dump_all(objects, sort_keys=False)


class HostPathProvisioner:
    """Binds every PVC of the `berth-local` StorageClass (the default) to a new hostPath
    PersistentVolume under `directory`, and deletes released ones: what a dynamic
    provisioner does, in a thread, for a one-node test cluster."""

    def __init__(self, plane: ControlPlane, directory: Path, interval: float = 0.5) -> None:
        self.plane = plane
        self.directory = directory
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostpath-provisioner", daemon=True)
        self.errors: list[str] = []

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plane.kubectl(
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump(
                {
                    "apiVersion": "storage.k8s.io/v1",
                    "kind": "StorageClass",
                    "metadata": {
                        "name": STORAGE_CLASS,
                        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                    },
                    "provisioner": PROVISIONER,
                    "reclaimPolicy": "Delete",
                    "volumeBindingMode": "Immediate",
                }
            ),
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes import client

        with self.plane.api_client() as api_client:
            core = client.CoreV1Api(api_client)
            while not self._stop.wait(self.interval):
                try:
                    self._provision(core)
                    self._reclaim(core)
                except Exception as err:  # keep serving; the test sees PVCs stay Pending
                    self.errors.append(repr(err))

    def _provision(self, core: Any) -> None:
        for claim in core.list_persistent_volume_claim_for_all_namespaces().items:
            spec, meta = claim.spec, claim.metadata
            if claim.status.phase != "Pending" or spec.volume_name:
                continue
            if (spec.storage_class_name or STORAGE_CLASS) != STORAGE_CLASS:
                continue
            name = f"pvc-{meta.uid}"
            path = self.directory / name
            path.mkdir(exist_ok=True)
            path.chmod(0o777)  # hostPath volumes get no fsGroup: any pod user may write
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": name,
                    "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                },
                "spec": {
                    "capacity": {"storage": spec.resources.requests["storage"]},
                    "accessModes": spec.access_modes,
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(path), "type": "Directory"},
                    "claimRef": {
                        "namespace": meta.namespace,
                        "name": meta.name,
                        "uid": meta.uid,
                    },
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "kubernetes.io/hostname",
                                            "operator": "In",
                                            "values": [NODE_NAME],
                                        }
                                    ]
                                }
                            ]
                        }
                    },
                },
            }
            with contextlib.suppress(Exception):  # exists already: bound on the next turn
                core.create_persistent_volume(volume)

    def _reclaim(self, core: Any) -> None:
        for volume in core.list_persistent_volume().items:
            annotations = volume.metadata.annotations or {}
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if volume.status.phase in ("Released", "Failed"):
                subprocess.run(
                    ["rm", "-rf", "--one-file-system", str(self.directory / volume.metadata.name)],
                    check=False,
                )
                with contextlib.suppress(Exception):
                    core.delete_persistent_volume(volume.metadata.name)


# --- for fixtures ----------------------------------------------------------------------------


def skip_or_fail(reason: str) -> None:
    """Skip outside CI (naming what installs the missing part); fail in CI."""
    import pytest

    message = f"no test node: {reason}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


__all__ = [
    "DNS_SERVICE_IP",
    "KUBERNETES_SERVICE_IP",
    "NODE_IP",
    "NODE_NAME",
    "SERVICE_CLUSTER_IP_RANGE",
    "Node",
    "NodeUnavailable",
    "clean_host",
    "leftovers",
    "prepare_host",
    "skip_or_fail",
    "unavailable_reason",
]
