"""oras against a real berth process: push, pull, attach and discover through referrers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import OCI_INDEX, Registry, oras, sha256
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]

BUNDLE = "application/vnd.berth.test.bundle"
SIGNATURE = "application/vnd.berth.test.signature"
SBOM = "application/vnd.berth.test.sbom"


def _json(result: Any) -> Any:
    return json.loads(result.stdout)


def _push_bundle(workdir: Path, ref: str) -> tuple[str, dict[str, bytes]]:
    files = {
        "readme.txt": b"hello from berth\n",
        "data.bin": bytes(range(256)) * 400,
    }
    for name, content in files.items():
        (workdir / name).write_bytes(content)
    pushed = _json(
        oras(
            "push",
            "--plain-http",
            "--artifact-type",
            BUNDLE,
            "--format",
            "json",
            ref,
            "readme.txt:text/plain",
            "data.bin:application/octet-stream",
            cwd=workdir,
        )
    )
    return str(pushed["digest"]), files


def test_push_and_pull(registry_process: Start, tmp_path: Path) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    ref = f"{registry.host}/oras/bundle:v1"
    digest, files = _push_bundle(tmp_path, ref)

    raw = oras("manifest", "fetch", "--plain-http", ref).stdout.encode()
    assert sha256(raw) == digest
    manifest = json.loads(raw)
    assert manifest["artifactType"] == BUNDLE
    assert {layer["digest"] for layer in manifest["layers"]} == {sha256(c) for c in files.values()}
    assert api.manifest("oras/bundle", "v1").body == raw
    assert oras("repo", "tags", "--plain-http", f"{registry.host}/oras/bundle").stdout.split() == [
        "v1"
    ]

    out = tmp_path / "out"
    oras("pull", "--plain-http", "-o", out, f"{registry.host}/oras/bundle@{digest}")
    for name, content in files.items():
        assert (out / name).read_bytes() == content


@pytest.mark.parametrize(
    "distribution_spec", [None, "v1.1-referrers-api"], ids=["auto", "referrers-api"]
)
def test_attach_discover_and_pull_signature(
    registry_process: Start, tmp_path: Path, distribution_spec: str | None
) -> None:
    registry = registry_process("berth")
    api = Registry(registry.url)
    repo = "oras/signed"
    ref = f"{registry.host}/{repo}:v1"
    subject, _ = _push_bundle(tmp_path, ref)
    spec = ["--distribution-spec", distribution_spec] if distribution_spec else []

    (tmp_path / "sig.json").write_bytes(b'{"signature": "not really"}')
    (tmp_path / "sbom.json").write_bytes(b'{"packages": []}')
    signature = _json(
        oras(
            "attach",
            "--plain-http",
            *spec,
            "--artifact-type",
            SIGNATURE,
            "--annotation",
            "berth.test/kind=signature",
            "--format",
            "json",
            ref,
            "sig.json:application/json",
            cwd=tmp_path,
        )
    )["digest"]
    sbom = _json(
        oras(
            "attach",
            "--plain-http",
            *spec,
            "--artifact-type",
            SBOM,
            "--format",
            "json",
            ref,
            "sbom.json:application/json",
            cwd=tmp_path,
        )
    )["digest"]

    # oras discover (through the referrers API: the server answers it, so no fallback).
    found = _json(oras("discover", "--plain-http", *spec, "--format", "json", "--depth", "1", ref))
    assert found["digest"] == subject
    by_digest = {r["digest"]: r for r in found["referrers"]}
    assert set(by_digest) == {signature, sbom}
    assert by_digest[signature]["artifactType"] == SIGNATURE
    assert by_digest[signature]["annotations"]["berth.test/kind"] == "signature"
    assert by_digest[sbom]["artifactType"] == SBOM
    only = _json(
        oras(
            "discover",
            "--plain-http",
            *spec,
            "--artifact-type",
            SIGNATURE,
            "--format",
            "json",
            ref,
        )
    )
    assert [r["digest"] for r in only["referrers"]] == [signature]

    # The referrers API itself, raw.
    response = api.get(f"/v2/{repo}/referrers/{subject}")
    assert response.status == 200, response
    assert response.header("Content-Type") == OCI_INDEX
    assert {m["digest"] for m in response.json()["manifests"]} == {signature, sbom}
    filtered = api.get(f"/v2/{repo}/referrers/{subject}?artifactType={SIGNATURE}")
    assert filtered.header("OCI-Filters-Applied") == "artifactType"
    assert [m["digest"] for m in filtered.json()["manifests"]] == [signature]
    # OCI-Subject made oras use the referrers API: no fallback "sha256-<hex>" tag index.
    assert api.tags(repo) == ["v1"]

    out = tmp_path / "pulled-signature"
    oras("pull", "--plain-http", "-o", out, f"{registry.host}/{repo}@{signature}")
    assert (out / "sig.json").read_bytes() == b'{"signature": "not really"}'
    attached = json.loads(
        oras("manifest", "fetch", "--plain-http", f"{registry.host}/{repo}@{signature}").stdout
    )
    assert attached["subject"]["digest"] == subject
    assert attached["artifactType"] == SIGNATURE
