"""Cross-repository mounts: a blob is linked only when its bytes are there, at the size
the source repository recorded (checked once, under the index's write lock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry_server.protocol import digests
from registry_server.services.blobs import BlobService
from registry_server.services.gc import GarbageCollector
from registry_server.storage.blobstore import BlobStore, blob_path
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.index import NewManifest
from registry_server.storage.sqlite_index import SqliteIndex

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _anyone(repo: str) -> bool:
    return True


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[BlobService]:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        yield BlobService(BlobStore(FilesystemDriver(tmp_path / "storage")), index)
    finally:
        await index.close()


async def test_a_mount_links_only_bytes_that_are_there_at_the_recorded_size(
    blobs: BlobService, tmp_path: Path
) -> None:
    data = b"a layer several repositories share"
    digest = digests.of_bytes(data)
    await blobs.upload_whole("team/a", digest, _body(data))

    assert await blobs.mount("team/b", digest, "team/a", _anyone)
    assert await blobs.index.blob_size("team/b", str(digest)) == len(data)

    stored = tmp_path / "storage" / blob_path(digest)
    stored.write_bytes(data[:-1])  # damaged behind the index's back: another size
    assert not await blobs.mount("team/c", digest, "team/a", _anyone)
    stored.unlink()  # lost
    assert not await blobs.mount("team/c", digest, None, _anyone)
    assert await blobs.index.blob_size("team/c", str(digest)) is None  # nothing linked


async def test_a_blob_the_repository_holds_is_mounted_as_it_is(
    blobs: BlobService, tmp_path: Path
) -> None:
    """A mount of a blob already linked in the target (from itself, or from a repository
    the caller may not pull) is a 201, not a session to upload the bytes again; unless
    its bytes are lost."""
    data = b"a layer team/a has"
    digest = digests.of_bytes(data)
    await blobs.upload_whole("team/a", digest, _body(data))

    async def team_a_only(repo: str) -> bool:
        return repo == "team/a"

    async def no_one(repo: str) -> bool:
        return False

    assert await blobs.mount("team/a", digest, "team/a", _anyone)
    assert await blobs.mount("team/a", digest, "secret/x", team_a_only)
    assert await blobs.mount("team/a", digest, None, team_a_only)
    assert not await blobs.mount("team/a", digest, None, no_one)  # may push, not pull
    (tmp_path / "storage" / blob_path(digest)).unlink()
    assert not await blobs.mount("team/a", digest, "team/a", _anyone)


async def test_a_mount_of_a_blob_the_repository_holds_restarts_its_grace(
    blobs: BlobService,
) -> None:
    """Deleting a manifest on a full volume releases its blobs to the next collection; a
    client that then mounts one (into the repository that holds it) is about to push a
    manifest using it, so the mount links it again, as an upload would (found by review)."""
    data = b"a layer an image used"
    digest = digests.of_bytes(data)
    await blobs.upload_whole("team/a", digest, _body(data))
    image = "sha256:" + "1" * 64
    await blobs.index.put_manifest(
        "team/a",
        NewManifest(image, OCI_MANIFEST, b"{}", None, None, None, [str(digest)], []),
        ["v1"],
        required_blobs=[str(digest)],
    )
    await asyncio.sleep(0.01)
    assert await blobs.index.delete_manifest("team/a", image, release=True)  # released
    assert await blobs.mount("team/a", digest, None, _anyone)
    report = await GarbageCollector(blobs.store, blobs.index, 3600, 86400).run_once()
    assert report.blobs_deleted == 0
    assert await blobs.store.size(digest) == len(data)
