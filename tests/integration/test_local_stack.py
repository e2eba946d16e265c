"""`make run` non-interactively: the local stack comes up, serves a push and a pull
with the credentials it prints, and stops cleanly on SIGINT (what Ctrl-C sends).

It runs `python -m berth_dev` as a user would, with its own control plane; the push
and pull are berth_dev.smoke, the same check `make e2e-kind` runs against a cluster.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from berth_dev import smoke
from berth_dev.generate import REPO_ROOT
from registry_operator.rendering import names
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

STARTUP_TIMEOUT = 300.0


def wait_for_ready_file(process: subprocess.Popen[bytes], path: Path, log: Path) -> Any:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the stack exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the stack was not up after {STARTUP_TIMEOUT:.0f}s:\n{log.read_text()}")
        time.sleep(0.5)
    return json.loads(path.read_text())


def leftovers(workdir: str) -> list[int]:
    """Processes that belong to the stack: their command line, environment or working
    directory names its workdir (control plane flags, KUBECONFIG, the pods' roots).
    Found by scanning /proc, so a process id reused by someone else is never taken."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc = Path("/proc") / entry
        try:
            texts = [(proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()]
            texts.append(os.readlink(proc / "cwd").encode())
        except OSError:
            continue
        if any(workdir.encode() in text for text in texts):
            found.append(int(entry))
    return found


def stop_after_failure(process: subprocess.Popen[bytes], ready: Path) -> None:
    """Whatever happened, leave nothing running: ask the stack, then make sure."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if ready.exists():
        for pid in leftovers(json.loads(ready.read_text())["workdir"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pull_secret_credentials(kubectl: list[str], namespace: str) -> tuple[str, str]:
    """The robot credentials of the dockerconfigjson Secret Berth wrote into `namespace`."""
    selector = names.access_selector("main", "registries")
    listed = subprocess.run(
        [*kubectl, "get", "secrets", "-n", namespace, "-l", selector, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    (secret,) = json.loads(listed.stdout)["items"]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    # One credential under every host of the registry (node proxy, Service).
    entries = list(config["auths"].values())
    assert entries and all(entry == entries[0] for entry in entries)
    return entries[0]["username"], entries[0]["password"]


def test_local_stack_serves_push_and_pull_and_stops_cleanly(tmp_path: Path) -> None:
    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "skopeo"):
        require_tool(tool)
    ready, log = tmp_path / "ready.json", tmp_path / "stack.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            # The process stand-in: the node mode (the default where a node can run) is
            # what the node tests prove, and one node per machine may be up already.
            [sys.executable, "-m", "berth_dev", "--mode", "processes", "--ready-file", str(ready)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        info = wait_for_ready_file(process, ready, log)
        (registry,) = info["registries"]
        assert (registry["namespace"], registry["name"]) == ("registries", "main")
        assert registry["host"] in log.read_text(), "the endpoint is printed"
        assert registry["password"] in log.read_text(), "the credentials are printed"

        # HTTPS with the generated certificate, verified with the CA the banner names.
        assert registry["url"].startswith("https://") and registry["cert_dir"] in log.read_text()
        certs = Path(registry["cert_dir"])
        result = smoke.round_trip(
            registry["host"],
            registry["username"],
            registry["password"],
            workdir=tmp_path,
            cert_dir=certs,
        )
        assert result.pulled == result.pushed

        # Wrong credentials are refused: the pod really runs the operator's auth config.
        with pytest.raises(smoke.SmokeError, match="push"):
            smoke.round_trip(
                registry["host"], registry["username"], "wrong", workdir=tmp_path, cert_dir=certs
            )

        # The sample Repository grants team-a pull access: the Secret Berth wrote there
        # pulls team-a/api from the running server, and pushes nothing.
        kubectl = [info["kubectl"], f"--kubeconfig={info['kubeconfig']}"]
        robot_user, robot_password = pull_secret_credentials(kubectl, "team-a")
        smoke.check_puller(result, robot_user, robot_password, workdir=tmp_path, cert_dir=certs)

        # The cluster side, as `kubectl get registries` shows it to the user.
        table = subprocess.run(
            [*kubectl, "get", "registries", "-A"], capture_output=True, text=True, check=True
        ).stdout
        assert "main" in table and "registries" in table
        # The operator ran with the chart's ClusterRole and was never refused.
        operator_log = Path(info["workdir"]) / "logs" / "operator.log"
        refused = [line for line in operator_log.read_text().splitlines() if "forbidden" in line]
        assert not refused, "\n".join(refused)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        stop_after_failure(process, ready)
    assert "SIGINT: stopping" in log.read_text()
    assert leftovers(info["workdir"]) == [], "processes left behind"
    assert not Path(info["workdir"]).exists(), "the temporary workdir is removed"
