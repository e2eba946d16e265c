"""Berth server processes with their metadata in PostgreSQL (the throwaway server of
tests/support/postgres.py): the OCI conformance suite, skopeo round trips, two
servers on one database and one storage root taking pushes at once, and an outage of
the database."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_conformance import run_conformance
from tests.support.clients import Registry, sha256, skopeo, wait_for
from tests.support.images import make_oci_index_layout, make_oci_layout, read_blob, tagged_digest
from tests.support.postgres import PostgresServer, require_server
from tests.support.processes import RegistryProcess

pytestmark = pytest.mark.integration

Start = Callable[..., RegistryProcess]


def postgres_config(dsn: str, workdir: Path, pool_size: int = 8) -> dict[str, object]:
    """The metadata block naming the database, the DSN in a file (as a mounted Secret)."""
    dsn_file = workdir / "metadata-dsn"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    return {
        "metadata": {
            "driver": "postgresql",
            "postgresql": {"dsn_file": str(dsn_file), "pool_size": pool_size},
        },
        "gc": {"interval_seconds": 0},
    }


def test_conformance_on_postgresql(
    registry_process: Start, postgres_dsn: str, tmp_path: Path
) -> None:
    registry = registry_process("berth", config=postgres_config(postgres_dsn, tmp_path))
    run_conformance(registry, tmp_path)
    # The index really is the database: nothing under the storage root, rows in there.
    assert not (registry.root / "index.db").exists()
    with psycopg.connect(postgres_dsn) as conn:
        (repositories,) = conn.execute("SELECT COUNT(*) FROM repositories").fetchone() or (0,)
    assert repositories > 0


def test_skopeo_round_trips_on_postgresql(
    registry_process: Start, postgres_dsn: str, tmp_path: Path
) -> None:
    registry = registry_process("berth", config=postgres_config(postgres_dsn, tmp_path))
    api = Registry(registry.url)
    source, back = tmp_path / "source", tmp_path / "back"
    digest = make_oci_layout(source, "v1", layers=3, layer_size=64 * 1024)
    remote = f"docker://{registry.host}/pg/image:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{source}:v1", remote)
    assert api.tags("pg/image") == ["v1"]
    skopeo("copy", "--src-tls-verify=false", remote, f"oci:{back}:v1")
    assert tagged_digest(back, "v1") == digest
    assert read_blob(back, digest) == read_blob(source, digest)

    multi, multi_back = tmp_path / "multi", tmp_path / "multi-back"
    index = make_oci_index_layout(multi, "v1", ("linux/amd64", "linux/arm64/v8"), layers=2)
    remote = f"docker://{registry.host}/pg/multi:v1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{multi}:v1", remote)
    skopeo("copy", "--all", "--src-tls-verify=false", remote, f"oci:{multi_back}:v1")
    assert tagged_digest(multi_back, "v1") == index


def test_two_servers_on_one_database_take_pushes_at_once(
    registry_process: Start,
    postgres_dsn: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two server processes, one database and one storage root (as replicas share a
    store): clients push to both at once, to their own tags and to the same ones; every
    tag lands, both servers serve the same state, and every blob hashes to its digest."""
    shared = tmp_path_factory.mktemp("shared-root")
    config = postgres_config(postgres_dsn, tmp_path)
    env = {"BERTH_STORAGE_ROOT": str(shared)}
    servers = [registry_process("berth", config=config, env=env) for _ in range(2)]
    apis = [Registry(s.url) for s in servers]
    contested = ["latest", "stable"]

    def push(n: int) -> tuple[str, str, str]:
        api = apis[n % 2]
        repo = f"team-{n % 3}/app"
        layer = os.urandom(2048) + str(n).encode()
        digest, _ = api.push_image(repo, f"build-{n}", [layer])
        for tag in contested:  # the same tags moved by both servers at once
            manifest = api.manifest(repo, digest)
            assert manifest.status == 200, manifest
            response = api.put_manifest(repo, tag, manifest.body)
            assert response.status == 201, response
        return repo, f"build-{n}", digest

    with ThreadPoolExecutor(8) as pool:
        pushed = list(pool.map(push, range(48)))

    for repo, tag, digest in pushed:
        for api in apis:
            response = api.manifest(repo, tag)
            assert response.status == 200, (repo, tag, response)
            assert sha256(response.body) == digest
    for repo in {r for r, _, _ in pushed}:
        own = sorted(t for r, t, _ in pushed if r == repo)
        expected = sorted([*own, *contested])
        assert apis[0].tags(repo) == apis[1].tags(repo) == expected
        for tag in contested:  # both servers agree where a contested tag ended
            first, second = (api.manifest(repo, tag) for api in apis)
            assert first.status == second.status == 200
            assert sha256(first.body) == sha256(second.body)
            assert sha256(first.body) in {d for r, _, d in pushed if r == repo}
    for repo, _, digest in pushed:
        layers = apis[1].manifest(repo, digest).json()["layers"]
        for layer in layers:
            assert sha256(apis[0].blob(repo, layer["digest"])) == layer["digest"]
    assert apis[0].catalog() == apis[1].catalog() == sorted({r for r, _, _ in pushed})


def test_readiness_and_requests_follow_a_database_outage(
    registry_process: Start, tmp_path: Path
) -> None:
    """With its database down a replica leaves the Service (/readyz 503 naming the index,
    /healthz still 200 so it is not restarted), answers requests with errors in the
    registry's format instead of hanging, and serves again once the database is back."""
    server = PostgresServer(require_server()).start()
    try:
        dsn = server.create_database()
        registry = registry_process("berth", config=postgres_config(dsn, tmp_path))
        api = Registry(registry.url, timeout=30)
        digest, _ = api.push_image("team/app", "v1", layers=[b"layer"])
        assert api.get("/readyz").status == 200

        server.halt()
        ready = wait_for(lambda: (r := api.get("/readyz")).status == 503 and r, timeout=15)
        assert ready.body.startswith(b"index unavailable:"), ready
        assert api.get("/healthz").status == 200
        started = time.monotonic()
        refused = api.manifest("team/app", "v1")
        assert refused.status == 503 and refused.header("Retry-After"), refused
        assert "metadata database" in refused.json()["errors"][0]["message"], refused
        assert time.monotonic() - started < 20

        server.resume()
        wait_for(lambda: api.get("/readyz").status == 200, timeout=60)
        assert sha256(api.manifest("team/app", "v1").body) == digest
        api.push_image("team/app", "v2", layers=[b"after the outage"])
    finally:
        server.stop()
