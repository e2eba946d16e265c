"""Deletes through the manifest service: what they refuse is decided in the delete's
own transaction, so a push racing the delete cannot slip between a check and it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from registry_server.protocol import digests, errors, manifests
from registry_server.protocol.tag_rules import TagRules
from registry_server.protocol.versions import Stamp
from registry_server.services.manifests import ManifestService
from registry_server.storage.records import TagRecord
from registry_server.storage.sqlite_index import SqliteIndex

CONFIG = b"{}"


def _image(n: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_MANIFEST,
            "config": {
                "mediaType": manifests.OCI_EMPTY_CONFIG,
                "digest": str(digests.of_bytes(CONFIG)),
                "size": len(CONFIG),
            },
            "layers": [],
            "annotations": {"n": str(n)},
        }
    ).encode()


def _listing(digest: str, size: int) -> bytes:
    """An index of one platform: the image ``digest``."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifests.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": manifests.OCI_MANIFEST,
                    "digest": digest,
                    "size": size,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()


@pytest.fixture
async def service(tmp_path: Path) -> ManifestService:
    index = SqliteIndex(tmp_path / "index.db")
    await index.link_blob("r", str(digests.of_bytes(CONFIG)), len(CONFIG))
    return ManifestService(index, 1 << 20, tag_rules=lambda _: TagRules(immutable=("v*",)))


async def test_a_delete_racing_the_first_push_of_an_immutable_tag_never_removes_it(
    service: ManifestService,
) -> None:
    """The check ran before the delete's transaction: the delete saw no tag yet, queued
    behind the push and removed what the push had just made (found by review)."""
    for n in range(20):
        tag = f"v{n}"
        pushed, deleted = await asyncio.gather(
            service.put("r", tag, _image(n), None),
            service.delete("r", tag),
            return_exceptions=True,
        )
        assert not isinstance(pushed, BaseException)
        assert isinstance(deleted, errors.RegistryError), deleted  # refused either way
        assert deleted.error in (errors.TAG_IMMUTABLE, errors.MANIFEST_UNKNOWN)
        assert await service.index.resolve_tag("r", tag) is not None


async def test_a_platform_manifest_goes_after_its_index(service: ManifestService) -> None:
    body = _image(1)
    image = await service.put("r", str(digests.of_bytes(body)), body, None)
    listed = await service.put("r", "multi", _listing(image.digest, len(body)), None)
    with pytest.raises(errors.RegistryError) as caught:
        await service.delete("r", image.digest)
    assert caught.value.error is errors.MANIFEST_LISTED and caught.value.status == 409
    await service.delete("r", listed.digest)
    await service.delete("r", image.digest)


async def test_a_replicated_delete_that_spares_the_manifest_records_no_delete(
    tmp_path: Path,
) -> None:
    """An index here lists it, so a peer's delete leaves it: the tag record must not say
    it went, or a rebuild drops a platform an index needs (found by review)."""
    index = SqliteIndex(tmp_path / "index.db")
    await index.link_blob("r", str(digests.of_bytes(CONFIG)), len(CONFIG))
    record = TagRecord(tmp_path)
    service = ManifestService(index, 1 << 20, record=record)
    body = _image(1)
    image = await service.put("r", str(digests.of_bytes(body)), body, None)
    listing = _listing(image.digest, len(body))
    await service.put("r", str(digests.of_bytes(listing)), listing, None)  # untagged
    await service.delete("r", image.digest, stamp=Stamp(1, "us"))
    assert await index.get_manifest("r", image.digest) is not None
    assert image.digest in record.replay("r").manifests
    await index.close()
