"""Retention over a real index: which tags and manifests go, logged for notifications
only, and never sent to peers in a way that could delete what was pushed there since."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from registry_server import maintenance
from registry_server.protocol import digests
from registry_server.protocol.tag_rules import NO_RULES, Retention, TagRules
from registry_server.protocol.versions import Stamp
from registry_server.services.blobs import BlobService
from registry_server.services.manifests import ManifestService
from registry_server.services.retention import RetentionService
from registry_server.storage.blobstore import BlobStore
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.index import LOCAL_OPS
from registry_server.storage.records import TagRecord
from registry_server.storage.sqlite_index import SqliteIndex
from tests.registry_server.test_metadata_index import D1, D2, D3, manifest

D4, D5 = ("sha256:" + c * 64 for c in "45")


async def test_removes_old_tags_then_their_manifests_and_logs_both(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    try:
        await index.put_manifest("app", manifest(D1), ["v1"])
        await index.put_manifest("app", manifest(D2), ["old", "shared"])
        await index.put_manifest("app", manifest(D3), ["mid"])
        await index.put_manifest("app", manifest(D2), ["shared"])  # newer: D2 stays held
        await index.put_manifest("app", manifest(D4), ["new"])
        await index.put_manifest("other", manifest(D5), ["x", "y", "z"])
        rules = {"app": TagRules(retention=Retention(2, ("v*",)))}
        woken: list[int] = []
        service = RetentionService(
            index, lambda repo: rules.get(repo, NO_RULES), lambda: woken.append(1)
        )
        assert (await service.run_once()).tags_removed == 2
        assert await index.list_tags("app", None, None) == ["new", "shared", "v1"]
        assert await index.get_manifest("app", D3) is None  # untagged by retention
        assert await index.get_manifest("app", D2) is not None  # still tagged "shared"
        assert await index.list_tags("other", None, None) == ["x", "y", "z"]
        assert woken
        logged = [(c.op, c.tag, c.digest) for c in await index.pending_changes("us", 100)]
        assert sorted(logged[-3:-1]) == [("expire_tag", "mid", None), ("expire_tag", "old", None)]
        assert logged[-1] == ("expire_manifest", None, D3)
        # A second round finds nothing more to do.
        report = await service.run_once()
        assert (report.tags_removed, report.manifests_deleted) == (0, 0)
    finally:
        await index.close()


async def test_untagged_manifests_go_once_nothing_held_them_for_the_days(tmp_path: Path) -> None:
    """An overwritten tag's image and a push never tagged go after ``untagged_days``; a
    tagged image, an index's platforms and a signature of a kept image stay."""
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    record = TagRecord(tmp_path)
    clock = [time.time()]
    try:
        await index.put_manifest("app", manifest(D1), ["latest"])
        await index.put_manifest("app", manifest(D2), ["latest"])  # D1 let go of
        await index.put_manifest("app", manifest(D3), [])  # pushed by digest only
        await index.put_manifest("app", manifest(D4), [])
        await index.put_manifest("app", manifest(D5, children=(D4,)), ["multi"])
        sig = "sha256:" + "6" * 64
        await index.put_manifest("app", manifest(sig, subject=D2, artifact_type="sig"), [])
        rules = TagRules(retention=Retention(None, (), 7.0))
        service = RetentionService(index, lambda repo: rules, record=record, wall=lambda: clock[0])
        assert (await service.run_once()).manifests_deleted == 0  # not a week yet
        clock[0] += 7 * 86400 + 1
        report = await service.run_once()
        assert (report.tags_removed, report.manifests_deleted) == (0, 2)
        assert await index.get_manifest("app", D1) is None
        assert await index.get_manifest("app", D3) is None
        for kept in (D2, D4, D5, sig):
            assert await index.get_manifest("app", kept) is not None
        logged = [(c.op, c.digest) for c in await index.pending_changes("us", 100)]
        assert sorted(logged[-2:]) == sorted([("expire_manifest", D1), ("expire_manifest", D3)])
        # Written to the tag record: a rebuild of the index does not bring them back.
        lines = [json.loads(line) for line in record.path("app").read_text().split()]
        deletes = [line["digest"] for line in lines if line.get("op") == "delete_manifest"]
        assert sorted(deletes) == sorted([D1, D3])
    finally:
        await index.close()


async def test_a_retention_tombstone_keeps_the_tags_own_version(tmp_path: Path) -> None:
    """Another region that pushed the tag again meanwhile wins; the same push replayed by
    a peer (or by anti-entropy) does not bring the tag back."""
    index = SqliteIndex(tmp_path / "index.db", "eu", ["us"])
    try:
        await index.put_manifest("r", manifest(D1), ["old"])
        (state,) = await index.tag_states("r")
        assert await index.expire_tag("r", "old", state.version)
        (tombstone,) = await index.tag_states("r")
        assert tombstone.digest is None
        assert (tombstone.version, tombstone.origin) == (state.version, state.origin)
        same = Stamp(state.version, state.origin)
        await index.put_manifest("r", manifest(D1), ["old"], stamp=same)
        assert await index.resolve_tag("r", "old") is None
        await index.put_manifest("r", manifest(D2), ["old"], stamp=Stamp(state.version + 1, "us"))
        assert await index.resolve_tag("r", "old") == D2
        ops = [c.op for c in await index.pending_changes("us", 10)]
        assert ops == ["tag", "expire_tag"]  # the replicator skips LOCAL_OPS
        assert set(ops) - {"tag"} <= LOCAL_OPS
    finally:
        await index.close()


async def test_retention_writes_its_removals_to_the_tag_record(tmp_path: Path) -> None:
    """The record the SQLite index is rebuilt from hears of retention's removals: `check`
    finds record and index agreeing after a round (it reported each expired tag), and a
    rebuild does not bring back an expired tag whose layers were collected (review)."""
    index = SqliteIndex(tmp_path / "index.db")
    store = BlobStore(FilesystemDriver(tmp_path))
    service = ManifestService(index, 1 << 20, record=TagRecord(tmp_path))
    blobs = BlobService(store, index)
    for number, tag in enumerate(("v1", "v2", "v3")):
        config = f'{{"n": {number}}}'.encode()
        digest = digests.of_bytes(config)
        await blobs.upload_whole("r", digest, _one(config))
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": str(digest),
                    "size": len(config),
                },
                "layers": [],
            }
        ).encode()
        await service.put("r", tag, body, None)
    rules = TagRules(retention=Retention(1, ()))
    retention = RetentionService(index, lambda _: rules, record=TagRecord(tmp_path))
    report = await retention.run_once()
    assert (report.tags_removed, report.manifests_deleted) == (2, 2)
    assert await index.list_tags("r", None, None) == ["v3"]
    await index.close()
    assert maintenance.check(tmp_path) == []
    assert TagRecord(tmp_path).replay("r").live_tags().keys() == {"v3"}
    assert len(TagRecord(tmp_path).replay("r").manifests) == 1


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_untagged_retention_leaves_the_pull_through_caches_repositories(
    tmp_path: Path,
) -> None:
    """An image a cache holds because nodes pull it by digest has no tag: its eviction
    goes by pulls, which retention does not see (found by review)."""
    index = SqliteIndex(tmp_path / "index.db")
    try:
        for repo in ("docker.io/library/nginx", "team/app"):
            await index.put_manifest(repo, manifest(D1), [])
        rules = TagRules(retention=Retention(None, (), 1.0))
        service = RetentionService(
            index,
            lambda repo: rules,
            wall=lambda: time.time() + 2 * 86400,
            cached=lambda repo: repo.startswith("docker.io/"),
        )
        assert (await service.run_once()).manifests_deleted == 1
        assert await index.get_manifest("docker.io/library/nginx", D1) is not None
        assert await index.get_manifest("team/app", D1) is None
    finally:
        await index.close()
