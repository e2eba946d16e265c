"""Run the registry server exactly as the operator's pod template says, without a kubelet.

No kubelet runs on these machines, so this is the honest substitute for "the pod starts":
take the Deployment, ConfigMaps and Secrets the operator wrote (as read back from the API
server), and

- materialise every volume into a temp dir the way the kubelet would (ConfigMap, Secret
  and projected volumes' keys as files, honouring `items` and `defaultMode`, behind the
  kubelet's `..data` symlink; PVC and emptyDir as empty directories),
- map each container mount path to its temp dir, and rewrite those paths wherever the pod
  refers to them: command, args, env values and the files materialised from ConfigMaps
  (a mount namespace would make the rewrite unnecessary; this is its stand-in),
- start the container's command with its env, `python` replaced by this interpreter,
  BERTH_HTTP_ADDR pointing at a free loopback port and BERTH_EXTERNAL_URL at that port
  (standing in for the Service's DNS name), and BERTH_METRICS_ADDR at another when the
  container has a port named metrics,
- wait until the pod's own readiness probe path answers 200, and check the liveness
  probe path too, over HTTPS without verifying the certificate when the probe's scheme
  says so (as the kubelet does); `url` is then an https:// one.

Like the kubelet, `RunningPod.update()` (or a `follow()` thread calling it) writes new
ConfigMap and Secret content into the same volume directories with the kubelet's atomic
swap: the files live in a fresh `..<timestamp>` directory and the `..data` symlink is
renamed over, so a reader never sees half of an update. Service DNS names have no
resolver here either: `services` maps an in-cluster URL (`http://name.ns.svc:5000`) to the
loopback URL of the process standing in for that Service, rewritten like the mount paths.

What it cannot show: the image contents, the security context, resource limits.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, free_port, http_status, wait_until

Object = Mapping[str, Any]


class PodSpecError(ValueError):
    """The pod template uses something this runner cannot reproduce faithfully."""


def referenced(pod: Object, *, optional: bool = True) -> tuple[set[str], set[str]]:
    """The ConfigMaps and Secrets a pod template reads (volumes, projected sources, env);
    `optional=False` leaves out the sources marked `optional: true`."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    for volume in pod.get("volumes") or []:
        sources = [volume, *((volume.get("projected") or {}).get("sources") or [])]
        for source in sources:
            if "configMap" in source and (optional or not source["configMap"].get("optional")):
                config_maps.add(source["configMap"]["name"])
            if "secret" in source and (optional or not source["secret"].get("optional")):
                secret = source["secret"]
                secrets.add(secret.get("secretName") or secret["name"])
    for container in pod.get("containers") or []:
        for entry in container.get("env") or []:
            source = entry.get("valueFrom") or {}
            if "configMapKeyRef" in source:
                config_maps.add(source["configMapKeyRef"]["name"])
            if "secretKeyRef" in source:
                secrets.add(source["secretKeyRef"]["name"])
    return config_maps, secrets


Finder = Callable[[str, str, str], Object | None]  # (kind, namespace, name) -> the object


def inputs(
    find: Finder, namespace: str, deployment: Object
) -> tuple[list[Object], list[Object]] | None:
    """The ConfigMaps and Secrets the pod template reads; None while one is missing
    (the kubelet would wait for it too), unless it is optional."""
    pod = deployment["spec"]["template"]["spec"]
    config_map_names, secret_names = referenced(pod)
    required = referenced(pod, optional=False)
    config_maps = {name: find("ConfigMap", namespace, name) for name in sorted(config_map_names)}
    secrets = {name: find("Secret", namespace, name) for name in sorted(secret_names)}
    if any(config_maps[name] is None for name in required[0]) or any(
        secrets[name] is None for name in required[1]
    ):
        return None
    return (
        [o for o in config_maps.values() if o is not None],
        [o for o in secrets.values() if o is not None],
    )


def _by_name(objects: Sequence[Object]) -> dict[str, Object]:
    return {obj["metadata"]["name"]: obj for obj in objects}


Files = dict[str, tuple[bytes, int | None]]  # relative path -> (content, mode)
_GENERATION = itertools.count(1)


def _keys(
    data: Mapping[str, bytes], items: Sequence[Object] | None, mode: int | None, what: str
) -> Files:
    if items is None:
        selected = [(key, key, None) for key in data]
    else:
        selected = [(item["key"], item["path"], item.get("mode")) for item in items]
    files: Files = {}
    for key, relative, item_mode in selected:
        if key not in data:
            raise PodSpecError(f"{what}: the volume refers to key {key!r}, which it does not have")
        files[relative] = (data[key], item_mode if item_mode is not None else mode)
    return files


def _config_map_data(config_map: Object) -> dict[str, bytes]:
    data = {k: v.encode() for k, v in (config_map.get("data") or {}).items()}
    return data | {k: base64.b64decode(v) for k, v in (config_map.get("binaryData") or {}).items()}


def _secret_data(secret: Object) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def _volume_files(
    volume: Object, config_maps: Mapping[str, Object], secrets: Mapping[str, Object]
) -> Files | None:
    """The files of a ConfigMap, Secret or projected volume; None for PVC and emptyDir."""
    if "configMap" in volume:
        source = volume["configMap"]
        config_map = config_maps.get(source["name"])
        if config_map is None:
            raise PodSpecError(f"ConfigMap {source['name']} was not provided")
        return _keys(
            _config_map_data(config_map),
            source.get("items"),
            source.get("defaultMode", 0o644),
            f"ConfigMap {source['name']}",
        )
    if "secret" in volume:
        source = volume["secret"]
        secret = secrets.get(source["secretName"])
        if secret is None:
            raise PodSpecError(f"Secret {source['secretName']} was not provided")
        return _keys(
            _secret_data(secret),
            source.get("items"),
            source.get("defaultMode", 0o644),
            f"Secret {source['secretName']}",
        )
    if "projected" in volume:
        projected = volume["projected"]
        default = projected.get("defaultMode", 0o644)
        files: Files = {}
        for source in projected.get("sources") or []:
            if "secret" in source:
                ref = source["secret"]
                obj = secrets.get(ref["name"])
                data = _secret_data(obj) if obj is not None else None
            elif "configMap" in source:
                ref = source["configMap"]
                obj = config_maps.get(ref["name"])
                data = _config_map_data(obj) if obj is not None else None
            else:
                raise PodSpecError(f"unsupported projected source in {source}")
            if data is None and ref.get("optional"):
                continue  # as the kubelet: an optional source that is absent adds nothing
            if data is None:
                raise PodSpecError(f"{ref['name']} (projected) was not provided")
            files |= _keys(data, ref.get("items"), default, ref["name"])
        return files
    if "persistentVolumeClaim" in volume or "emptyDir" in volume:
        return None
    raise PodSpecError(f"unsupported volume type in {volume}")


def _publish(directory: Path, files: Files, transform: Callable[[bytes], bytes]) -> None:
    """Write `files` as the kubelet does: into a fresh `..<timestamp>` directory, with each
    top-level name a symlink through `..data`, which is then swapped atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}.{next(_GENERATION)}"
    data_dir = directory / stamp
    data_dir.mkdir()
    for relative, (content, mode) in files.items():
        target = data_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(transform(content))
        if mode is not None:
            target.chmod(mode)
    link = directory / "..data"
    previous = os.readlink(link) if link.is_symlink() else None
    temporary = directory / "..data_tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(stamp)
    temporary.rename(link)  # the atomic step
    for top in {Path(relative).parts[0] for relative in files}:
        entry = directory / top
        if not entry.is_symlink():
            entry.symlink_to(Path("..data") / top)
    if previous is not None:
        old = directory / previous
        for path in sorted(old.rglob("*"), reverse=True):
            path.chmod(0o700)
            path.rmdir() if path.is_dir() else path.unlink()
        old.rmdir()


def _rewrite(
    text: str, mounts: Mapping[str, Path], services: Mapping[str, str] | None = None
) -> str:
    """Replace container paths by local ones in one pass (a local path may itself start
    with a mount path, e.g. /tmp). Longest first: /etc/berth/config before /etc/berth.
    Then Service URLs by the loopback URLs standing in for them."""
    for service, local in (services or {}).items():
        text = text.replace(service, local)
    if not mounts:
        return text
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])", re.MULTILINE)
    return pattern.sub(lambda match: str(mounts[match.group(1)]), text)


@dataclasses.dataclass
class RunningPod:
    url: str
    process: ManagedProcess
    root: Path
    mounts: dict[str, Path]  # container mount path -> local directory
    argv: list[str]
    env: dict[str, str]
    pod: Object = dataclasses.field(default_factory=dict)
    services: dict[str, str] = dataclasses.field(default_factory=dict)
    # The CA of the serving certificate the pod mounts (a kubernetes.io/tls Secret's
    # ca.crt): what a client in the cluster verifies this pod's HTTPS with.
    ca_pem: str | None = None
    updates: int = 0
    _stop_following: threading.Event | None = None
    _follower: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def context(self) -> ssl.SSLContext | None:
        """A client context trusting the pod's CA only (None: the pod speaks plain HTTP)."""
        if not self.url.startswith("https://"):
            return None
        if self.ca_pem is None:
            raise PodSpecError("the pod serves HTTPS but mounts no Secret with a ca.crt")
        return ssl.create_default_context(cadata=self.ca_pem)

    def cert_dir(self, directory: Path) -> Path:
        """`directory` holding the pod's CA as ca.crt: skopeo's --cert-dir, certs.d."""
        if self.ca_pem is None:
            raise PodSpecError("the pod mounts no Secret with a ca.crt")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_text(self.ca_pem)
        return directory

    @property
    def metrics_url(self) -> str | None:
        """Where the pod's /metrics listener is, when it has one (BERTH_METRICS_ADDR)."""
        addr = self.env.get("BERTH_METRICS_ADDR")
        return f"http://{addr}" if addr else None

    def update(self, config_maps: Sequence[Object], secrets: Sequence[Object]) -> bool:
        """What the kubelet does when a mounted ConfigMap or Secret changes: swap in the
        new content atomically. Returns whether anything changed."""
        maps, secs = _by_name(config_maps), _by_name(secrets)
        pending: list[tuple[Path, Files, Callable[[bytes], bytes]]] = []
        for volume in self.pod.get("volumes") or []:
            files = _volume_files(volume, maps, secs)
            if files is None:
                continue
            directory = self.root / "volumes" / volume["name"]
            rewrite = self._transform(volume)
            current = {
                relative: (rewrite(content), mode) for relative, (content, mode) in files.items()
            }
            if current == _read(directory, files):
                continue
            pending.append((directory, files, rewrite))
        # Counted before the files appear: the pod may read them (and get ready) at once.
        if pending:
            self.updates += 1
        for directory, files, rewrite in pending:
            _publish(directory, files, rewrite)
        return bool(pending)

    def _transform(self, volume: Object) -> Callable[[bytes], bytes]:
        if "configMap" not in volume:
            return lambda content: content
        # What a pod reads from ConfigMaps refers to container paths: point them here.
        return lambda content: _rewrite(content.decode(), self.mounts, self.services).encode()

    def follow(
        self,
        fetch: Callable[[], tuple[Sequence[Object], Sequence[Object]]],
        interval: float = 0.5,
    ) -> None:
        """Keep the volumes current, as the kubelet's sync loop does (much more often)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.update(*fetch())
                except Exception as exc:  # a failed read is retried, as the kubelet does
                    print(f"podspec_runner: update failed, retrying: {exc}", file=sys.stderr)

        self._stop_following = stop
        self._follower = threading.Thread(target=loop, name="kubelet-sync", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        if self._stop_following is not None:
            self._stop_following.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
        self.process.stop()

    def log_tail(self, lines: int = 80) -> str:
        return self.process.log_tail(lines)


def _read(directory: Path, files: Files) -> Files | None:
    found: Files = {}
    for relative, (_, mode) in files.items():
        try:
            found[relative] = ((directory / relative).read_bytes(), mode)
        except OSError:
            return None
    return found


def _serving_ca(pod: Object, secrets: Mapping[str, Object]) -> str | None:
    for volume in pod.get("volumes") or []:
        name = (volume.get("secret") or {}).get("secretName")
        secret = secrets.get(name) if name else None
        if secret and secret.get("type") == "kubernetes.io/tls":
            ca = (secret.get("data") or {}).get("ca.crt")
            if ca:
                return base64.b64decode(ca).decode()
    return None


def _env(
    container: Object, config_maps: Mapping[str, Object], secrets: Mapping[str, Object]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        source = entry.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            raw = (secrets[ref["name"]].get("data") or {})[ref["key"]]
            env[entry["name"]] = base64.b64decode(raw).decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = (config_maps[ref["name"]].get("data") or {})[ref["key"]]
        else:
            raise PodSpecError(f"unsupported env source {source}")
    if container.get("envFrom"):
        raise PodSpecError("envFrom is not supported by the runner")
    return env


def start(
    deployment: Object,
    config_maps: Sequence[Object],
    secrets: Sequence[Object],
    root: Path,
    *,
    container_name: str | None = None,
    ready_timeout: float = 30.0,
    port: int | None = None,
    services: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    fetch: Callable[[], tuple[Sequence[Object], Sequence[Object]]] | None = None,
    follow_interval: float = 1.0,
) -> RunningPod:
    """Start the Deployment's container as a local process; stop() it when done.

    `port` fixes the loopback port (so that peers can be told it before it starts);
    `services` maps in-cluster Service URLs to the loopback URLs standing in for them;
    `wait_ready=False` waits for the liveness probe only (a pod that runs but is not
    ready, as the kubelet keeps it); `fetch` keeps the volumes current from the start,
    before the pod is ready, as the kubelet does (inputs read while the operator was
    writing them may not agree with each other, and a pod waiting for them to agree
    would otherwise never see the update).
    """
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    container = next((c for c in containers if container_name in (None, c["name"])), None)
    if container is None:
        raise PodSpecError(f"no container {container_name!r} in the pod template")
    maps, secs = _by_name(config_maps), _by_name(secrets)

    volumes_dir = root / "volumes"
    local = {volume["name"]: volumes_dir / volume["name"] for volume in pod.get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise PodSpecError("subPath mounts are not supported by the runner")
        mounts[mount["mountPath"].rstrip("/")] = local[mount["name"]]

    port = port or free_port()
    readiness = (container.get("readinessProbe") or {}).get("httpGet") or {}
    liveness = (container.get("livenessProbe") or {}).get("httpGet") or {}
    scheme = str(readiness.get("scheme", "HTTP")).lower()
    url = f"{scheme}://127.0.0.1:{port}"
    # The kubelet's HTTPS probes do not verify the certificate.
    probing = ssl._create_unverified_context() if scheme == "https" else None
    running = RunningPod(
        url,
        ManagedProcess(f"pod {deployment['metadata']['name']}", ["true"], root / "pod.log"),
        root,
        mounts,
        [],
        {},
        pod=pod,
        services=dict(services or {}),
        ca_pem=_serving_ca(pod, secs),
    )
    for volume in pod.get("volumes") or []:
        if _volume_files(volume, maps, secs) is None:
            local[volume["name"]].mkdir(parents=True, exist_ok=True)
    running.update(config_maps, secrets)

    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise PodSpecError("the container has no command: the image's entrypoint is unknown here")
    argv = [_rewrite(arg, mounts) for arg in argv]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable

    env = {k: _rewrite(v, mounts) for k, v in _env(container, maps, secs).items()}
    env["BERTH_HTTP_ADDR"] = f"127.0.0.1:{port}"
    if any(p.get("name") == "metrics" for p in container.get("ports") or []):
        # The pod's metrics port, like its registry port: a free one on loopback.
        env["BERTH_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    # The loopback address stands in for the Service's DNS name, as the temp dirs stand
    # in for the mounts: token realms and Location headers must point at where we are.
    env["BERTH_EXTERNAL_URL"] = url
    process_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "TMPDIR": str(mounts.get("/tmp", root)),
        **env,
    }
    process = ManagedProcess(
        f"pod {deployment['metadata']['name']}",
        argv,
        root / "pod.log",
        env=process_env,
        cwd=root,
    )
    running.process, running.argv, running.env = process, argv, env
    process.start()
    if fetch is not None:
        running.follow(fetch, interval=follow_interval)
    try:
        ready_path = readiness.get("path", "/v2/")
        if not wait_ready:
            ready_path = liveness.get("path", "/v2/")
        wait_until(
            lambda: http_status(url + ready_path, context=probing) == 200,
            timeout=ready_timeout,
            what=f"{'readiness' if wait_ready else 'liveness'} probe GET {ready_path}",
            process=process,
        )
        if liveness.get("path"):
            status = http_status(url + liveness["path"], context=probing)
            if status != 200:
                raise PodSpecError(f"liveness probe GET {liveness['path']} answered {status}")
    except BaseException:
        running.stop()
        raise
    return running
