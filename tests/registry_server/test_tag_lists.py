"""Tag lists kept per repository (services/tag_lists.py) and served by the discovery
service: the same answers as the index's own listing, never stale across workers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from registry_server.protocol import errors
from registry_server.services.discovery import DiscoveryService
from registry_server.services.tag_lists import TagListCache
from registry_server.storage.index import NewManifest
from registry_server.storage.sqlite_index import SqliteIndex

D1, D2 = ("sha256:" + c * 64 for c in "12")


def _manifest(digest: str) -> NewManifest:
    media_type = "application/vnd.oci.image.manifest.v1+json"
    return NewManifest(digest, media_type, b"{}" + digest.encode(), None, None, None, (), ())


async def test_pages_are_the_index_own_answers(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    rng = random.Random(7)
    alphabet = "abcAB019_.-"
    names = {"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(300)}
    names = {n for n in names if n[0] not in ".-"}
    await index.put_manifest("r", _manifest(D1), sorted(names))
    service = DiscoveryService(index)
    probes = [None, "", "a", "B", "zzz", *rng.sample(sorted(names), 20)]
    try:
        for n in (None, 0, 1, 7, 1000):
            for last in probes:
                page = await service.tags("r", n, last)
                assert page.items == await index.list_tags("r", n, last), (n, last)
        whole = await service.tags("r", None, None)
        assert whole.body is not None
        assert json.loads(whole.body) == {"name": "r", "tags": sorted(names)}
        with pytest.raises(errors.RegistryError):
            await service.tags("unknown", None, None)
    finally:
        await index.close()


async def test_a_list_changed_by_another_worker_is_never_served_stale(tmp_path: Path) -> None:
    # Two workers: two processes' indexes on one database, each with its own service.
    first, second = SqliteIndex(tmp_path / "index.db"), SqliteIndex(tmp_path / "index.db")
    reader, writer = DiscoveryService(first), DiscoveryService(second)
    try:
        await second.put_manifest("r", _manifest(D1), ["a", "b"])
        assert (await reader.tags("r", None, None)).items == ["a", "b"]
        assert (await reader.tags("r", None, None)).items == ["a", "b"]  # kept
        await second.put_manifest("r", _manifest(D2), ["c"])
        assert (await reader.tags("r", None, None)).items == ["a", "b", "c"]
        assert (await writer.tags("r", 2, None)).items == ["a", "b"]
        await second.delete_tag("r", "a")
        assert (await reader.tags("r", 5, None)).items == ["b", "c"]
        assert await second.delete_manifest("r", D1)
        page = await reader.tags("r", None, None)
        assert page.items == ["c"] and page.body == b'{"name": "r", "tags": ["c"]}'
    finally:
        await first.close()
        await second.close()


def test_the_kept_lists_are_bounded_by_their_names() -> None:
    cache = TagListCache(max_names=10)
    cache.put("a", (1, 1), ["x"] * 6)
    cache.put("b", (2, 1), ["y"] * 3)
    assert cache.get("a", (1, 1)) is not None  # a is now the most recently used
    cache.put("c", (3, 1), ["z"] * 4)  # 13 names: b, the least recently used, goes
    assert cache.get("b", (2, 1)) is None
    assert cache.get("a", (1, 1)) is not None and cache.get("c", (3, 1)) is not None
    assert cache.get("a", (1, 2)) is None  # another version: not this list
    big = cache.put("d", (4, 1), ["w"] * 11)  # larger than the bound: served, not kept
    assert big.names and cache.get("d", (4, 1)) is None
    assert cache.get("a", (1, 1)) is not None
