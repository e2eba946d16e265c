"""The operator as a subprocess on the test control plane, as the chart runs it.

`python -m registry_operator` with the control plane's kubeconfig and its own liveness
endpoint on a free port; `start()` returns once that endpoint answers. Tests add flags
(`--standalone`, peering, timings) and environment as they need.

`stop()` first deletes the Registries and Repositories created since the operator was
first started and waits (bounded) until they are gone, together with older ones already
being deleted, so that their finalizers are processed by this operator, not left, in
namespaces still terminating, for the next module's operator to resume in a burst. Slow
or failed cleanup is logged (a warning, and a line in the operator's log), never raised.
`stop(clean_up=False)` and `kill()` (a crash) clean nothing up; a restart after `kill()`
keeps the first start's view of what is not ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .control_plane import ControlPlane
from .processes import ManagedProcess, free_port, http_status, wait_until
from .tools import REPO_ROOT

# Deleted in this order: Repositories first, so the Registries' deletions do not set off
# reconciles of Repositories that are about to go anyway.
CLEANUP_RESOURCES = ("repositories.berth.dev", "registries.berth.dev")
CLEANUP_TIMEOUT = 120.0  # a Registry whose namespace is terminating can take a minute

logger = logging.getLogger(__name__)


class CleanupWarning(UserWarning):
    """Test objects were not all gone when they should have been (the run goes on)."""


def delete_berth_objects(plane: ControlPlane, namespace: str, timeout: float = 30.0) -> None:
    """Delete the namespace's Repositories and Registries and wait, up to `timeout`
    seconds, until they are gone; warn (never raise) if they are not.

    For a namespace about to be deleted: while it is still active, a running operator
    lifts a Registry's finalizer in about a second. In a terminating namespace the same
    deletion can take a minute (the operator's writes and events there are refused and
    retried), loading the operator under the tests that follow. Without an operator
    (or without finalizers) there is nothing to wait for.
    """
    try:
        result = plane.kubectl(
            "delete",
            ",".join(CLEANUP_RESOURCES),
            "--all",
            "--namespace",
            namespace,
            "--ignore-not-found",
            f"--timeout={timeout:.0f}s",
            check=False,
            timeout=timeout + 30,
        )
    except (subprocess.SubprocessError, OSError) as err:
        message = f"deleting the Berth objects of {namespace} failed: {err}"
    else:
        if result.returncode == 0:
            return
        message = f"the Berth objects of {namespace} are not gone: {result.stderr.strip()}"
    logger.warning(message)
    warnings.warn(message, CleanupWarning, stacklevel=2)


def _object_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}"


class OperatorProcess:
    def __init__(
        self,
        plane: ControlPlane,
        workdir: Path,
        args: Sequence[str] = ("--standalone",),
        *,
        name: str = "berth-operator",
        env: Mapping[str, str] | None = None,
        cleanup_timeout: float = CLEANUP_TIMEOUT,
    ) -> None:
        self.plane = plane
        self.cleanup_timeout = cleanup_timeout
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.process = ManagedProcess(
            name,
            [sys.executable, "-m", "registry_operator", *args, "--liveness", self.liveness],
            workdir / f"{name}.log",
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig), **(env or {})},
            cwd=REPO_ROOT,
        )
        # UIDs of the Berth objects that existed before the first start: not ours to delete.
        # None until then, or when they could not be listed (then nothing is cleaned up).
        self._preexisting: frozenset[str] | None = None
        self._started = False

    def start(self, timeout: float = 60) -> OperatorProcess:
        if not self._started:  # a restart (after kill()) keeps the first snapshot
            self._started = True
            try:
                self._preexisting = frozenset(o["metadata"]["uid"] for o in self._berth_objects())
            except (subprocess.SubprocessError, OSError, ValueError, KeyError) as err:
                self._note(f"cannot list Berth objects, no cleanup at stop: {err}", warn=True)
        self.process.start()
        try:
            wait_until(
                lambda: http_status(self.liveness) == 200,
                timeout=timeout,
                what="the operator's liveness endpoint",
                process=self.process,
            )
        except BaseException:
            self.process.stop()  # no operator left running behind a failed start
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def rss_kib(self) -> tuple[int, int]:
        """(current, peak) resident memory of the operator process in KiB (Linux)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is cleaned up."""
        self.process.kill()

    def stop(self, *, clean_up: bool = True) -> None:
        """Delete what was created since the first start (see the module docstring) while
        the operator still runs to process the finalizers, then stop it.
        `clean_up=False` stops it as it is."""
        if clean_up:
            try:
                self.clean_up()
            except Exception as err:  # never fail a run over cleanup
                self._note(f"cleanup failed: {err!r}", warn=True)
        self.process.stop()

    def clean_up(self) -> None:
        """Delete the Registries and Repositories created since the first start and wait,
        up to `cleanup_timeout` seconds, until they (and older ones already being deleted)
        are gone; warn if some are not."""
        if self._preexisting is None or not self._started:
            return
        preexisting = self._preexisting
        started = time.monotonic()
        # Ours, and any older ones already being deleted (their finalizer is ours now).
        targets = [
            o
            for o in self._berth_objects()
            if o["metadata"]["uid"] not in preexisting or o["metadata"].get("deletionTimestamp")
        ]
        if not targets:
            return
        if not self.process.running:
            left = ", ".join(sorted(_object_key(o) for o in targets))
            self._note(f"not running at stop, left for the next operator: {left}", warn=True)
            return
        uids = {o["metadata"]["uid"] for o in targets}
        to_delete = [
            {
                "apiVersion": o["apiVersion"],
                "kind": o["kind"],
                "metadata": {k: o["metadata"][k] for k in ("namespace", "name")},
            }
            for o in targets
            if not o["metadata"].get("deletionTimestamp")
        ]
        if to_delete:
            self.plane.kubectl(
                "delete",
                "--wait=false",
                "--ignore-not-found",
                "-f",
                "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": to_delete}),
                timeout=self.cleanup_timeout,
            )
        deadline = started + self.cleanup_timeout
        while True:
            remaining = [o for o in self._berth_objects() if o["metadata"]["uid"] in uids]
            if not remaining or time.monotonic() > deadline or not self.process.running:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        summary = f"{len(targets)} objects ({len(to_delete)} deleted here)"
        if remaining:
            left = ", ".join(
                f"{_object_key(o)} (finalizers {o['metadata'].get('finalizers') or []})"
                for o in remaining
            )
            state = "running" if self.process.running else "exited"
            self._note(
                f"{summary}: {len(remaining)} still there after {elapsed:.1f}s "
                f"(operator {state}): {left}",
                warn=True,
            )
        else:
            self._note(f"{summary} gone in {elapsed:.1f}s")

    def _berth_objects(self) -> list[dict[str, Any]]:
        """Every Registry and Repository in the cluster (Repositories first)."""
        result = self.plane.kubectl(
            "get", ",".join(CLEANUP_RESOURCES), "--all-namespaces", "-o", "json", timeout=30
        )
        items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
        order = {"Repository": 0, "Registry": 1}
        return sorted(items, key=lambda o: order.get(o["kind"], 2))

    def _note(self, message: str, *, warn: bool = False) -> None:
        """Say it in the operator's log (which tells a module's whole story) and ours."""
        text = f"{self.process.name} cleanup: {message}"
        try:
            with self.process.log_path.open("a") as file:
                file.write(f"--- {text}\n")
        except OSError:
            pass
        if warn:
            logger.warning(text)
            warnings.warn(text, CleanupWarning, stacklevel=3)
        else:
            logger.info(text)

    def log(self, lines: int = 80) -> str:
        return self.process.log_tail(lines)


def wait_for(
    check: Callable[[], Any], operator: OperatorProcess, what: str, timeout: float = 30
) -> Any:
    """Poll ``check`` until it returns something truthy and return that; on timeout fail
    with the operator's log, which is what tells why it did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}\n--- operator log ---\n{operator.log()}"
            )
        time.sleep(0.05)


@contextlib.contextmanager
def operator_running(plane: ControlPlane, workdir: Path, *args: str) -> Iterator[OperatorProcess]:
    """An operator (`--standalone` and `args`) for a test module, stopped afterwards."""
    running = OperatorProcess(plane, workdir, ("--standalone", *args)).start()
    try:
        yield running
    finally:
        running.stop()


def registry_condition(
    kube: Any, namespace: str, name: str, condition_type: str
) -> Mapping[str, Any]:
    """One condition of a Registry's status as the API server has it ({} when absent);
    `kube` is the operator's API client (registry_operator.kube.client.Client)."""
    body = kube.find("berth.dev/v1alpha1", "Registry", namespace, name) or {}
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == condition_type), {})
