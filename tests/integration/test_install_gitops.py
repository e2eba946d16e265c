"""GitOps properties (docs/gitops.md) on a running stack: the samples applied again,
client-side and server-side, change nothing while the operator keeps reconciling; the
operator never writes a `spec`; health is readable from the conditions, through the
very Argo CD health check the docs give.

The stack (berth_dev.stack) has a control plane of its own, so its cluster-wide
operator never meets the objects of other tests; its resync timer runs every 2 s, so
"nothing changes" is checked across several reconciles, not just one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from berth_dev import stack as dev_stack
from berth_dev.generate import REPO_ROOT
from tests.support.tools import in_ci, require_tool

pytestmark = pytest.mark.integration

RESYNC_SECONDS = 2
SETTLE_SECONDS = 3 * RESYNC_SECONDS
CHILD_KINDS = (
    "configmaps,secrets,services,persistentvolumeclaims,"
    "deployments.apps,ingresses.networking.k8s.io"
)
# Who may own fields under spec: whoever applied the manifests, never the operator.
APPLIERS = {"kubectl-client-side-apply", "kubectl", "gitops"}

Snapshot = dict[tuple[str, str, str], tuple[str, int | None]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dev_stack.LocalStack]:
    for tool in dev_stack.CONTROL_PLANE_TOOLS:
        require_tool(tool)
    running = dev_stack.LocalStack(
        tmp_path_factory.mktemp("gitops-stack"),
        operator_args=[f"--resync-seconds={RESYNC_SECONDS}"],
        log=lambda _: None,
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def kubectl(stack: dev_stack.LocalStack, *args: str) -> str:
    return stack.plane.kubectl(*args).stdout


def get(stack: dev_stack.LocalStack, *args: str) -> Any:
    return json.loads(kubectl(stack, "get", *args, "-o", "json"))


def snapshot(stack: dev_stack.LocalStack) -> Snapshot:
    """resourceVersion and generation of everything the samples and the operator made."""
    items = get(stack, "registries,repositories", "-A")["items"]
    items += get(stack, CHILD_KINDS, "-A", "-l", "app.kubernetes.io/managed-by=berth-operator")[
        "items"
    ]
    items += get(stack, "namespaces", "registries", "team-a")["items"]
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): (
            o["metadata"]["resourceVersion"],
            o["metadata"].get("generation"),
        )
        for o in items
    }


def changed(before: Snapshot, after: Snapshot) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k)
    ]


def settled(stack: dev_stack.LocalStack) -> Snapshot:
    """A snapshot taken once two in a row, a resync period apart, agree."""
    previous = snapshot(stack)
    for _ in range(10):
        time.sleep(SETTLE_SECONDS)
        current = snapshot(stack)
        if current == previous:
            return current
        previous = current
    pytest.fail("the objects never stopped changing:\n" + "\n".join(changed(previous, current)))


def test_applying_the_samples_again_changes_nothing(stack: dev_stack.LocalStack) -> None:
    before = settled(stack)
    assert ("Deployment", "registries", "main") in before, sorted(before)

    output = kubectl(stack, "apply", "-f", str(stack.samples))
    assert all(line.endswith(" unchanged") for line in output.splitlines()), output
    time.sleep(SETTLE_SECONDS)
    assert changed(before, snapshot(stack)) == []

    # A GitOps controller applying server-side takes the fields over (its managedFields
    # entry is new, so resourceVersions move); after that, nothing. It takes two
    # applies: a Namespace whose applied configuration owns no field has its
    # managedFields emptied by the first, and the API server fills them in again (as
    # "before-first-apply") on the second. That is the API server, not Berth.
    ssa = ("apply", "--server-side", "--field-manager=gitops", "--force-conflicts")
    for _ in range(2):
        kubectl(stack, *ssa, "-f", str(stack.samples))
    taken_over = settled(stack)
    kubectl(stack, *ssa, "-f", str(stack.samples))
    time.sleep(SETTLE_SECONDS)
    assert changed(taken_over, snapshot(stack)) == []
    generations = {k: v[1] for k, v in before.items() if k[0] in ("Registry", "Repository")}
    assert generations == {k: v[1] for k, v in taken_over.items() if k in generations}


def spec_owners(obj: Mapping[str, Any]) -> set[str]:
    owners = set()
    for entry in obj["metadata"].get("managedFields") or []:
        if "f:spec" in (entry.get("fieldsV1") or {}):
            owners.add(entry["manager"])
    return owners


def test_the_operator_never_writes_spec(stack: dev_stack.LocalStack) -> None:
    settled(stack)
    objects = get(stack, "registries,repositories", "-A", "--show-managed-fields")["items"]
    assert {o["kind"] for o in objects} == {"Registry", "Repository"}
    for obj in objects:
        owners = spec_owners(obj)
        assert owners and owners <= APPLIERS, f"{obj['kind']} spec owned by {owners}"
    registry = next(o for o in objects if o["kind"] == "Registry")
    status_writers = {
        e["manager"]
        for e in registry["metadata"]["managedFields"]
        if e.get("subresource") == "status"
    }
    assert status_writers == {"berth"}


# --- health, through the Argo CD check of docs/gitops.md ----------------------------


def argocd_health_script() -> str:
    text = (REPO_ROOT / "docs" / "gitops.md").read_text()
    blocks = re.findall(r"```lua\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "docs/gitops.md has one Lua health check"
    return str(blocks[0])


def lua_literal(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        pairs = (f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


def lua() -> str:
    found = shutil.which("lua5.4")
    if found is None:
        message = "lua5.4 is missing (Debian package lua5.4, installed by make tools)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def argocd_health(obj: Mapping[str, Any], tmp_path: Path) -> tuple[str, str]:
    """Run the health check as Argo CD does: `obj` a global, the script's result read."""
    harness = tmp_path / "harness.lua"
    harness.write_text(
        f"obj = {lua_literal(dict(obj))}\n"
        f"local check = assert(load({lua_literal(argocd_health_script())}, 'health', 't'))\n"
        "local hs = check()\n"
        "io.write(hs.status, '\\n', hs.message or '', '\\n')\n"
    )
    result = subprocess.run([lua(), str(harness)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    status, message = result.stdout.split("\n", 1)
    return status, message.strip()


def wait_for_status(stack: dev_stack.LocalStack, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        obj: dict[str, Any] = get(stack, "registry", name, "-n", "registries")
        if (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]:
            return obj
        time.sleep(0.5)
    pytest.fail(f"Registry {name} got no status for its generation")


def test_health_from_conditions(stack: dev_stack.LocalStack, tmp_path: Path) -> None:
    # No kubelet runs the registry pod here, so the sample is honestly not Ready yet.
    main = wait_for_status(stack, "main")
    ready = next(c for c in main["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"]
    status, message = argocd_health(main, tmp_path)
    assert status == "Progressing" and ready["reason"] in message

    # The sample Repository: its pull Secret is written, so it is Healthy.
    repository = get(stack, "repository", "team-a-api", "-n", "registries")
    assert argocd_health(repository, tmp_path)[0] == "Healthy", repository.get("status")

    # A spec the operator refuses to serve is Degraded, with the reason shown.
    unservable = {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "Registry",
        "metadata": {"name": "unservable", "namespace": "registries"},
        # A key prefix climbing out of its place: the CRD admits it, the operator does not.
        "spec": {
            "storage": {
                "s3": {"bucket": "images", "credentialsSecretRef": {"name": "s3"}, "prefix": "a/.."}
            },
            "metadata": {"postgresql": {"connectionSecretRef": {"name": "berth-db"}}},
        },
    }
    stack.plane.kubectl("apply", "-f", "-", input=json.dumps(unservable))
    broken = wait_for_status(stack, "unservable")
    assert argocd_health(broken, tmp_path)[0] == "Degraded"

    # Ready True is Healthy; a status behind the spec or no status at all is not.
    healthy = json.loads(json.dumps(main))
    for condition in healthy["status"]["conditions"]:
        if condition["type"] == "Ready":
            condition.update(status="True", reason="Available", message="1/1 ready")
    assert argocd_health(healthy, tmp_path) == ("Healthy", "1/1 ready")
    stale = json.loads(json.dumps(healthy))
    stale["metadata"]["generation"] = stale["status"]["observedGeneration"] + 1
    assert argocd_health(stale, tmp_path)[0] == "Progressing"
    fresh = {"metadata": {"name": "new", "generation": 1}}
    assert argocd_health(fresh, tmp_path)[0] == "Progressing"


def test_operator_was_never_refused(stack: dev_stack.LocalStack) -> None:
    assert stack.operator is not None
    log = stack.operator.log_path.read_text()
    refused = [line for line in log.splitlines() if "forbidden" in line.lower()]
    assert not refused, "\n".join(refused)
