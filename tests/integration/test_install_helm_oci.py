"""The Berth chart as an OCI artifact in a Berth registry: package, push, pull, template.

Registries store Helm charts beside images; this stores our own chart in our own
server with the real helm CLI, plain HTTP, anonymously and with a login through the
token flow, and installs nothing but renders the pulled chart to the same manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from berth_dev import generate
from tests.support.processes import RegistryProcess
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]
HELM_CONFIG_MEDIA_TYPE = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER_MEDIA_TYPE = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"


class Helm:
    """The helm CLI with its state (registry logins, caches) in a directory of its own."""

    def __init__(self, home: Path) -> None:
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [str(require_tool("helm")), *args],
            capture_output=True,
            text=True,
            input=input,
            env=self.env,
            timeout=120,
        )
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout + result.stderr


def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((generate.CHART_DIR / "Chart.yaml").read_text())
    return loaded


def round_trip(helm: Helm, registry: RegistryProcess, tmp_path: Path) -> None:
    version = chart()["version"]
    packaged = helm("package", str(generate.CHART_DIR), "--destination", str(tmp_path))
    archive = tmp_path / f"berth-{version}.tgz"
    assert archive.exists(), packaged
    with tarfile.open(archive) as tar:
        assert "berth/crds/registries.berth.dev.yaml" in tar.getnames()

    pushed = helm("push", str(archive), f"oci://{registry.host}/charts", "--plain-http")
    assert f"Pushed: {registry.host}/charts/berth:{version}" in pushed
    reference = f"oci://{registry.host}/charts/berth"

    pulled_dir = tmp_path / "pulled"
    pulled_dir.mkdir()
    helm("pull", reference, "--version", version, "--plain-http", "--destination", str(pulled_dir))
    assert (pulled_dir / archive.name).read_bytes() == archive.read_bytes()

    shown = yaml.safe_load(helm("show", "chart", reference, "--version", version, "--plain-http"))
    assert shown["name"] == "berth" and shown["appVersion"] == chart()["appVersion"]

    args = ["--namespace", generate.NAMESPACE, "--include-crds"]
    from_registry = helm(
        "template", generate.RELEASE, reference, "--version", version, "--plain-http", *args
    )
    local = helm("template", generate.RELEASE, str(generate.CHART_DIR), *args)
    assert _documents(from_registry) == _documents(local)


def _documents(text: str) -> list[object]:
    # `helm pull`/`template` may print "Pulled: ..." and "Digest: ..." lines to stderr.
    lines = [line for line in text.splitlines() if not line.startswith(("Pulled:", "Digest:"))]
    return [d for d in yaml.safe_load_all("\n".join(lines)) if d]


def manifest_of(registry: RegistryProcess, repository: str, tag: str) -> Any:
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_chart_round_trip_through_berth(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    round_trip(Helm(tmp_path / "helm"), registry, tmp_path)
    manifest = manifest_of(registry, "charts/berth", chart()["version"])
    assert manifest["config"]["mediaType"] == HELM_CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [HELM_LAYER_MEDIA_TYPE]


def test_chart_round_trip_with_login(registry_process: Start, tmp_path: Path) -> None:
    password = "chart-publisher-secret"
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(6)).decode()
    htpasswd.write_text(f"publisher:{hashed}\n")
    registry = registry_process("berth", config={"auth": {"htpasswd": str(htpasswd)}})
    helm = Helm(tmp_path / "helm")
    login = helm(
        "registry",
        "login",
        registry.host,
        "--plain-http",
        "--username",
        "publisher",
        "--password-stdin",
        input=password,
    )
    assert "Login Succeeded" in login
    round_trip(helm, registry, tmp_path)
