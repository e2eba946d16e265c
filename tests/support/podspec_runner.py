"""Run the registry server exactly as the operator's pod template says, without a kubelet.

No kubelet runs on these machines, so this is the honest substitute for "the pod starts":
take the Deployment, ConfigMaps and Secrets the operator wrote (as read back from the API
server), and

- materialise every volume into a temp dir the way the kubelet would (ConfigMap and
  Secret keys as files, honouring `items` and `defaultMode`; PVC and emptyDir as empty
  directories),
- map each container mount path to its temp dir, and rewrite those paths wherever the pod
  refers to them: command, args, env values and the files materialised from ConfigMaps
  (a mount namespace would make the rewrite unnecessary; this is its stand-in),
- start the container's command with its env, `python` replaced by this interpreter,
  BERTH_HTTP_ADDR pointing at a free loopback port and BERTH_EXTERNAL_URL at that port
  (standing in for the Service's DNS name),
- wait until the pod's own readiness probe path answers 200, and check the liveness
  probe path too.

What it cannot show: the image contents, the security context, resource limits.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, free_port, http_status, wait_until

Object = Mapping[str, Any]


class PodSpecError(ValueError):
    """The pod template uses something this runner cannot reproduce faithfully."""


@dataclasses.dataclass
class RunningPod:
    url: str
    process: ManagedProcess
    root: Path
    mounts: dict[str, Path]  # container mount path -> local directory
    argv: list[str]
    env: dict[str, str]

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self, lines: int = 80) -> str:
        return self.process.log_tail(lines)


def _by_name(objects: Sequence[Object]) -> dict[str, Object]:
    return {obj["metadata"]["name"]: obj for obj in objects}


def _write_keys(
    directory: Path,
    data: Mapping[str, bytes],
    items: Sequence[Object] | None,
    mode: int | None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if items is None:
        selected = [(key, key, None) for key in data]
    else:
        selected = [(item["key"], item["path"], item.get("mode")) for item in items]
    for key, relative, item_mode in selected:
        if key not in data:
            raise PodSpecError(f"volume refers to key {key!r}, which the object does not have")
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[key])
        chosen = item_mode if item_mode is not None else mode
        if chosen is not None:
            target.chmod(chosen)


def _materialise(
    volume: Object,
    directory: Path,
    config_maps: Mapping[str, Object],
    secrets: Mapping[str, Object],
) -> None:
    if "configMap" in volume:
        source = volume["configMap"]
        config_map = config_maps.get(source["name"])
        if config_map is None:
            raise PodSpecError(f"ConfigMap {source['name']} was not provided")
        data = {k: v.encode() for k, v in (config_map.get("data") or {}).items()}
        data |= {k: base64.b64decode(v) for k, v in (config_map.get("binaryData") or {}).items()}
        _write_keys(directory, data, source.get("items"), source.get("defaultMode", 0o644))
    elif "secret" in volume:
        source = volume["secret"]
        secret = secrets.get(source["secretName"])
        if secret is None:
            raise PodSpecError(f"Secret {source['secretName']} was not provided")
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        _write_keys(directory, data, source.get("items"), source.get("defaultMode", 0o644))
    elif "persistentVolumeClaim" in volume or "emptyDir" in volume:
        directory.mkdir(parents=True, exist_ok=True)
    else:
        raise PodSpecError(f"unsupported volume type in {volume}")


def _rewrite(text: str, mounts: Mapping[str, Path]) -> str:
    """Replace container paths by local ones in one pass (a local path may itself start
    with a mount path, e.g. /tmp). Longest first: /etc/berth/config before /etc/berth."""
    if not mounts:
        return text
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])", re.MULTILINE)
    return pattern.sub(lambda match: str(mounts[match.group(1)]), text)


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
) -> RunningPod:
    """Start the Deployment's container as a local process; stop() it when done."""
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    container = next((c for c in containers if container_name in (None, c["name"])), None)
    if container is None:
        raise PodSpecError(f"no container {container_name!r} in the pod template")
    maps, secs = _by_name(config_maps), _by_name(secrets)

    volumes_dir = root / "volumes"
    local: dict[str, Path] = {}
    for volume in pod.get("volumes") or []:
        local[volume["name"]] = volumes_dir / volume["name"]
        _materialise(volume, local[volume["name"]], maps, secs)

    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise PodSpecError("subPath mounts are not supported by the runner")
        mounts[mount["mountPath"].rstrip("/")] = local[mount["name"]]

    # What a pod reads from ConfigMaps refers to container paths: point them here.
    for volume in pod.get("volumes") or []:
        if "configMap" in volume:
            for path in local[volume["name"]].rglob("*"):
                if path.is_file():
                    mode = path.stat().st_mode
                    path.chmod(mode | 0o200)
                    path.write_text(_rewrite(path.read_text(), mounts))
                    path.chmod(mode)

    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise PodSpecError("the container has no command: the image's entrypoint is unknown here")
    argv = [_rewrite(arg, mounts) for arg in argv]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable

    port = free_port()
    env = {k: _rewrite(v, mounts) for k, v in _env(container, maps, secs).items()}
    url = f"http://127.0.0.1:{port}"
    env["BERTH_HTTP_ADDR"] = f"127.0.0.1:{port}"
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
    process.start()
    running = RunningPod(url, process, root, mounts, argv, env)
    try:
        readiness = (container.get("readinessProbe") or {}).get("httpGet") or {}
        liveness = (container.get("livenessProbe") or {}).get("httpGet") or {}
        ready_path = readiness.get("path", "/v2/")
        wait_until(
            lambda: http_status(url + ready_path) == 200,
            timeout=ready_timeout,
            what=f"readiness probe GET {ready_path}",
            process=process,
        )
        if liveness.get("path"):
            status = http_status(url + liveness["path"])
            if status != 200:
                raise PodSpecError(f"liveness probe GET {liveness['path']} answered {status}")
    except BaseException:
        running.stop()
        raise
    return running
