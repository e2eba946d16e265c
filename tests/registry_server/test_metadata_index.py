"""One test suite for every metadata index backend: SQLite, and PostgreSQL on the
throwaway server of tests/support/postgres.py (marked integration: a real server)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import pytest

from registry_server.protocol import errors
from registry_server.protocol.quotas import Quota, Usage
from registry_server.protocol.versions import Stamp
from registry_server.storage import sqlite_index
from registry_server.storage.index import MetadataIndex, NewManifest, Overtaken
from registry_server.storage.postgres_index import PostgresIndex
from registry_server.storage.sqlite_index import SqliteIndex

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgresql", marks=pytest.mark.integration),
]

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
B1, B2, B3 = ("sha256:" + c * 64 for c in "abc")


async def open_index(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, *args: Any
) -> MetadataIndex:
    """A fresh index of ``backend`` (``args``: region, consumers)."""
    if backend == "sqlite":
        return SqliteIndex(tmp_path / "index.db", *args)
    dsn = request.getfixturevalue("postgres_dsn")
    return await PostgresIndex.connect(dsn, *args)


@pytest.fixture(params=BACKENDS)
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataIndex]:
    idx = await open_index(request.param, request, tmp_path)
    yield idx
    await idx.close()


def manifest(
    digest: str,
    *,
    subject: str | None = None,
    artifact_type: str | None = None,
    blobs: tuple[str, ...] = (),
    children: tuple[str, ...] = (),
) -> NewManifest:
    return NewManifest(
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        content=b"{}" + digest.encode(),
        artifact_type=artifact_type,
        subject=subject,
        annotations=None,
        blob_refs=blobs,
        child_refs=children,
    )


async def test_manifest_and_tags(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["v1", "latest"])
    assert await index.resolve_tag("r", "v1") == D1
    rec = await index.get_manifest("r", D1)
    assert rec is not None and rec.content == b"{}" + D1.encode()
    assert rec.size == len(rec.content)
    head = await index.get_manifest("r", D1, content=False)
    assert head is not None and head.content is None
    assert await index.get_manifest("other", D1) is None
    # Moving a tag.
    await index.put_manifest("r", manifest(D2), ["latest"])
    assert await index.resolve_tag("r", "latest") == D2
    assert await index.list_tags("r", None, None) == ["latest", "v1"]


async def test_tag_pagination(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), [f"t{i:03d}" for i in range(50)])
    assert await index.list_tags("r", 3, None) == ["t000", "t001", "t002"]
    assert await index.list_tags("r", 2, "t047") == ["t048", "t049"]
    assert await index.list_tags("r", 0, None) == []
    assert await index.list_tags("unknown", None, None) is None


async def test_the_tag_list_version_changes_with_every_tag_write(index: MetadataIndex) -> None:
    """Every write that adds, moves or removes a tag changes the version a cached tag
    list is held to: local and replicated pushes, deletes of tags and of manifests, and
    retention's expiry. Writes that touch no tag leave it."""
    assert await index.tag_list_version("r") is None
    seen = []

    async def changed() -> bool:
        version = await index.tag_list_version("r")
        assert version is not None
        fresh = version not in seen
        seen.append(version)
        return fresh

    await index.put_manifest("r", manifest(D1), ["a"])
    assert await changed()
    await index.put_manifest("r", manifest(D2), [])  # by digest: no tag
    assert not await changed()
    await index.put_manifest("r", manifest(D2), ["a"])  # moved
    assert await changed()
    (state,) = await index.tag_states("r")
    # Replicated, older than this region's clock but new for its tag.
    assert await index.put_manifest("r", manifest(D1), ["b"], Stamp(1, "us")) == ["b"]
    assert await changed()
    assert await index.put_manifest("r", manifest(D1), ["a"], Stamp(1, "us")) == []  # lost
    assert not await changed()
    assert await index.delete_tag("r", "b")
    assert await changed()
    assert await index.expire_tag("r", "a", state.version)
    assert await changed()
    await index.put_manifest("r", manifest(D3), ["c", "d"])
    assert await changed()
    assert await index.delete_manifest("r", D3)
    assert await changed()
    assert await index.list_tags("r", None, None) == []
    # Another repository's writes are its own.
    await index.put_manifest("other", manifest(D1), ["x"])
    assert not await changed()


async def test_delete_manifest_removes_its_tags(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["a", "b"])
    await index.put_manifest("r", manifest(D2), ["c"])
    assert await index.delete_manifest("r", D1)
    assert not await index.delete_manifest("r", D1)
    assert await index.list_tags("r", None, None) == ["c"]
    assert await index.get_manifest("r", D1) is None


async def test_delete_tag_keeps_manifest(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["a"])
    assert await index.delete_tag("r", "a")
    assert not await index.delete_tag("r", "a")
    assert await index.get_manifest("r", D1) is not None


async def test_immutable_tags_are_created_but_never_moved(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["v1", "latest"], immutable=["v1"])
    await index.put_manifest("r", manifest(D1), ["v1"], immutable=["v1"])  # same: fine
    with pytest.raises(errors.RegistryError) as caught:
        await index.put_manifest("r", manifest(D2), ["latest", "v1"], immutable=["v1"])
    assert caught.value.error is errors.TAG_IMMUTABLE
    # The refused push changed nothing: not the other tag, not the manifest.
    assert await index.resolve_tag("r", "latest") == D1
    assert await index.get_manifest("r", D2) is None


async def test_an_immutable_tag_guards_its_manifest_and_the_children_of_its_index(
    index: MetadataIndex,
) -> None:
    def guard(tag: str) -> bool:
        return tag.startswith("v")

    await index.put_manifest("r", manifest(D1), [])
    await index.put_manifest("r", manifest(D2, children=(D1,)), ["v1"])
    await index.put_manifest("r", manifest(D3), ["latest"])
    for digest in (D1, D2):  # the platform manifest, and the index itself
        with pytest.raises(errors.RegistryError) as caught:
            await index.delete_manifest("r", digest, immutable=guard)
        assert caught.value.error is errors.TAG_IMMUTABLE
        assert caught.value.detail == {"tag": "v1", "digest": D2}
    assert await index.get_manifest("r", D1) is not None
    assert await index.delete_manifest("r", D3, immutable=guard)
    assert await index.delete_manifest("r", D2)  # no guard: a replicated delete


async def test_a_manifest_an_index_lists_is_not_deleted_before_the_index(
    index: MetadataIndex,
) -> None:
    """Deleting a platform manifest left its tagged index served and broken, and GC took
    the platform's layers (found by review). A replicated delete was decided by its
    region and keeps its own rule (a newer index spares the child)."""
    await index.put_manifest("r", manifest(D1), [])
    await index.put_manifest("r", manifest(D2, children=(D1,)), ["multi"])
    with pytest.raises(errors.RegistryError) as caught:
        await index.delete_manifest("r", D1)
    assert caught.value.error is errors.MANIFEST_LISTED
    assert caught.value.detail == {"digest": D1, "index": D2}
    assert await index.get_manifest("r", D1) is not None
    assert await index.delete_manifest("r", D2)  # the index first ...
    assert await index.delete_manifest("r", D1)  # ... then its platform


async def test_a_manifest_delete_says_which_tags_it_removed(index: MetadataIndex) -> None:
    """What the tag record is told: the tags the delete's own transaction removed (read
    before it, a tag moved onto the manifest meanwhile stayed live in the record, and a
    rebuild brought the deleted image back)."""
    await index.put_manifest("r", manifest(D1), ["a", "b"])
    await index.put_manifest("r", manifest(D2), ["c"])
    removed: list[str] = ["stale"]
    assert await index.delete_manifest("r", D1, tombstoned=removed)
    assert sorted(removed) == ["a", "b"]
    assert await index.delete_manifest("r", D2)  # without the list, as before


async def test_deleting_an_immutable_tag_is_refused_in_the_transaction(
    index: MetadataIndex,
) -> None:
    assert not await index.delete_tag("r", "v1", immutable=True)  # none: nothing to refuse
    await index.put_manifest("r", manifest(D1), ["v1", "latest"])
    with pytest.raises(errors.RegistryError) as caught:
        await index.delete_tag("r", "v1", immutable=True)
    assert caught.value.error is errors.TAG_IMMUTABLE
    assert await index.resolve_tag("r", "v1") == D1
    assert await index.delete_tag("r", "latest")


async def test_an_immutable_tag_pushed_in_two_regions_keeps_the_first_push(
    index: MetadataIndex,
) -> None:
    await index.put_manifest("r", manifest(D1), ["v1"], immutable=["v1"])
    (mine,) = await index.tag_states("r")
    later = Stamp(mine.version + 10, "us")
    earlier = Stamp(mine.version - 10, "us")
    # A later push elsewhere does not move it here ...
    assert await index.put_manifest("r", manifest(D2), ["v1"], later, immutable=["v1"]) == []
    assert await index.resolve_tag("r", "v1") == D1
    # ... an earlier one does (the other region keeps it too): both end with the first.
    assert await index.put_manifest("r", manifest(D2), ["v1"], earlier, immutable=["v1"]) == ["v1"]
    assert await index.resolve_tag("r", "v1") == D2
    # Without the rule the last writer wins, as for every other tag.
    assert await index.put_manifest("r", manifest(D3), ["v1"], later) == ["v1"]


async def test_expire_tag_only_at_the_version_seen(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["a"])
    (seen,) = await index.tag_states("r")
    await index.put_manifest("r", manifest(D2), ["a"])  # pushed again meanwhile
    assert not await index.expire_tag("r", "a", seen.version)
    assert await index.resolve_tag("r", "a") == D2
    (now,) = await index.tag_states("r")
    assert await index.expire_tag("r", "a", now.version)
    assert await index.resolve_tag("r", "a") is None
    assert not await index.expire_tag("unknown", "a", now.version)


async def test_delete_untagged_manifest_spares_what_is_still_held(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["a"])
    await index.put_manifest("r", manifest(D2), [])
    await index.put_manifest("r", manifest(D3, children=(D2,)), [])
    assert len(await index.delete_untagged_manifest("r", D1)) == 0  # tagged
    assert len(await index.delete_untagged_manifest("r", D2)) == 0  # an index lists it
    # The index goes, and with it its child that nothing else holds.
    assert len(await index.delete_untagged_manifest("r", D3)) == 2
    assert len(await index.delete_untagged_manifest("r", D3)) == 0
    assert await index.get_manifest("r", D2) is None
    assert await index.get_manifest("r", D1) is not None


async def _listed(index: MetadataIndex, since: float) -> list[str]:
    return await index.untagged_manifests("r", since)


async def test_untagged_manifests_are_those_nothing_has_held_for_a_while(
    index: MetadataIndex,
) -> None:
    """What the retention of untagged manifests may take: nothing holds them (a tag, an
    index, a subject present), counted from when the last thing let go of them."""
    await index.put_manifest("r", manifest(D1), ["a"])
    await index.put_manifest("r", manifest(D2), [])
    await index.put_manifest("r", manifest(D3, children=(D2,)), [])
    await index.put_manifest("r", manifest(B1, subject=D1, artifact_type="sig"), [])
    await index.put_manifest("r", manifest(B2), [])
    later = time.time() + 60
    # Tagged, listed by an index, a referrer of a manifest present: held.
    assert await _listed(index, later) == sorted([D3, B2])
    assert await _listed(index, time.time() - 60) == []  # pushed within the minute
    assert await index.untagged_manifests("unknown", later) == []

    await asyncio.sleep(0.05)
    before = time.time()
    await asyncio.sleep(0.05)
    # Let go of just now: the tag moved off D1 (and so its referrer's subject stays),
    # the index that listed D2 deleted, B2 pushed again by digest.
    await index.put_manifest("r", manifest(B3), ["a"])
    assert await index.delete_manifest("r", D3)
    await index.put_manifest("r", manifest(B2), [])
    assert await _listed(index, before) == []
    assert await _listed(index, later) == sorted([D1, D2, B2])
    # The subject deleted: its referrer is let go of then.
    await asyncio.sleep(0.05)
    before = time.time()
    await asyncio.sleep(0.05)
    assert await index.delete_manifest("r", D1)
    assert B1 not in await _listed(index, before)
    assert B1 in await _listed(index, later)
    # A deleted tag lets go too.
    await asyncio.sleep(0.05)
    before = time.time()
    await asyncio.sleep(0.05)
    assert await index.delete_tag("r", "a")
    assert B3 not in await _listed(index, before)
    assert B3 in await _listed(index, later)


async def test_deleting_an_untagged_manifest_checks_its_age_again(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), [])
    await asyncio.sleep(0.05)
    seen = time.time()
    assert await _listed(index, seen) == [D1]
    await index.put_manifest("r", manifest(D1), [])  # pushed again since: it stays
    assert await index.delete_untagged_manifest("r", D1, seen) == []
    assert await index.delete_untagged_manifest("r", D1, time.time() + 60) == [D1]
    # A referrer whose subject is present stays, however old.
    await index.put_manifest("r", manifest(D2), [])
    await index.put_manifest("r", manifest(D3, subject=D2), [])
    assert await index.delete_untagged_manifest("r", D3, time.time() + 60) == []


async def test_an_untagged_index_leaves_a_platform_pushed_again_since(
    index: MetadataIndex,
) -> None:
    """A build pushing a platform again by digest, its new index on the way, must not
    lose it to the retention of the old index that listed it (found by review)."""
    await index.put_manifest("r", manifest(D1), [])
    await index.put_manifest("r", manifest(D2), [])
    await index.put_manifest("r", manifest(D3, children=(D1, D2)), [])
    await asyncio.sleep(0.05)
    seen = time.time()
    await asyncio.sleep(0.05)
    await index.put_manifest("r", manifest(D1), [])  # pushed again: the new index's
    assert await index.delete_untagged_manifest("r", D3, seen) == [D3, D2]
    assert await index.get_manifest("r", D1) is not None


def test_manifests_from_before_released_count_as_let_go_of_at_the_upgrade(
    tmp_path: Path,
) -> None:
    """SQLite: the column added to an older database stamps its rows with the upgrade
    (found by review: aged from their push, yesterday's rollback image went at once)."""
    path = tmp_path / "index.db"

    async def setup() -> None:
        index = SqliteIndex(path)
        await index.put_manifest("r", manifest(D1), [])
        await index.close()

    asyncio.run(setup())
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE manifests DROP COLUMN released")  # as before the upgrade
    conn.execute("UPDATE manifests SET created = created - 30 * 86400")
    conn.commit()
    conn.close()

    async def after() -> None:
        index = SqliteIndex(path)
        try:
            assert await index.untagged_manifests("r", time.time() - 86400) == []
            assert await index.untagged_manifests("r", time.time() + 60) == [D1]
            await index.put_manifest("r", manifest(D2), [])  # a new one: by its push
            assert await index.untagged_manifests("r", time.time() - 86400) == []
        finally:
            await index.close()

    asyncio.run(after())


async def test_an_index_child_still_tagged_stays(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), ["amd64"])
    await index.put_manifest("r", manifest(D2), [])
    await index.put_manifest("r", manifest(D3, children=(D1, D2)), [])
    assert len(await index.delete_untagged_manifest("r", D3)) == 2  # D3 and D2; D1 is tagged
    assert await index.get_manifest("r", D1) is not None


async def test_catalog_order_and_pagination(index: MetadataIndex) -> None:
    for name in ["b/x", "a", "c", "a/y"]:
        await index.link_blob(name, B1, 10)
    assert await index.list_repositories(None, None) == ["a", "a/y", "b/x", "c"]
    assert await index.list_repositories(2, "a/y") == ["b/x", "c"]


async def test_referrers(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), [])
    await index.put_manifest("r", manifest(D2, subject=D1, artifact_type="sig"), [])
    await index.put_manifest("r", manifest(D3, subject=D1, artifact_type="sbom"), [])
    found = await index.referrers("r", D1)
    assert [(m.digest, m.artifact_type) for m in found] == [(D2, "sig"), (D3, "sbom")]
    assert await index.referrers("other", D1) == []


async def test_blob_links(index: MetadataIndex) -> None:
    await index.link_blob("r", B1, 42)
    assert await index.blob_size("r", B1) == 42
    assert await index.blob_size("s", B1) is None
    assert await index.missing_blobs("r", [B1, B2]) == [B2]
    assert await index.repositories_with_blob(B1) == ["r"]
    assert await index.unlink_blob("r", B1)
    assert not await index.unlink_blob("r", B1)
    assert await index.blob_size("r", B1) is None


async def test_missing_manifests(index: MetadataIndex) -> None:
    await index.put_manifest("r", manifest(D1), [])
    assert await index.missing_manifests("r", [D1, D2]) == [D2]
    assert await index.missing_manifests("nope", [D1]) == [D1]


async def test_unreferenced_blobs(index: MetadataIndex) -> None:
    await index.link_blob("r", B1, 1)
    await index.link_blob("r", B2, 1)
    await index.put_manifest("r", manifest(D1, blobs=(B2,)), [])
    await index.unlink_blob("r", B1)
    await index.unlink_blob("r", B2)
    await index.link_blob("s", B3, 1)  # linked, but no manifest wants it
    # B2 is still referenced by a manifest; B1 and B3 are garbage once the grace is over.
    assert sorted(await index.unreferenced_blobs(older_than=1e12)) == [B1, B3]
    assert await index.unreferenced_blobs(older_than=0) == []
    assert not await index.forget_blob(B3, older_than=0)  # linked within the grace period
    assert await index.blob_size("s", B3) == 1
    assert await index.forget_blob(B1, older_than=1e12)
    assert not await index.forget_blob(B2, older_than=1e12)
    assert await index.forget_blob(B3, older_than=1e12)
    assert await index.blob_size("s", B3) is None  # its link went with it


async def test_a_manifest_needs_its_blobs_and_children_when_written(
    index: MetadataIndex,
) -> None:
    await index.link_blob("r", B1, 1)
    await index.put_manifest("r", manifest(D1, blobs=(B1,)), [], required_blobs=[B1])
    for required in ({"required_blobs": [B1, B2]}, {"required_manifests": [D1, D2]}):
        with pytest.raises(errors.RegistryError) as caught:
            await index.put_manifest("r", manifest(D3), ["v1"], **required)  # type: ignore[arg-type]
        assert caught.value.error is errors.MANIFEST_BLOB_UNKNOWN
        assert caught.value.detail == {"digests": [B2 if "required_blobs" in required else D2]}
    assert await index.get_manifest("r", D3) is None
    assert await index.list_tags("r", None, None) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_persists_across_reopen(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: Any
) -> None:
    first = await open_index(backend, request, tmp_path)
    await first.put_manifest("r", manifest(D1), ["v1"])
    await first.close()
    second = await open_index(backend, request, tmp_path)  # the same database
    assert await second.resolve_tag("r", "v1") == D1
    assert second.instance_id == first.instance_id
    await second.close()
    if backend == "sqlite":  # another database, another id
        assert (
            SqliteIndex(tmp_path_factory.mktemp("other") / "i.db").instance_id != first.instance_id
        )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_change_log_in_order_per_consumer(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    index = await open_index(backend, request, tmp_path, "eu", ["us", "hook"])
    try:
        await index.put_manifest("r", manifest(D1), ["a", "b"], actor="ci")
        await index.put_manifest("r", manifest(D2), [])  # untagged: logged as a manifest
        await index.delete_tag("r", "a", actor="ci")
        await index.put_manifest("s", manifest(D3), ["c"], Stamp(5, "us"))  # replicated: not
        changes = await index.pending_changes("us", 10)
        assert [(c.repo, c.op, c.tag, c.digest) for c in changes] == [
            ("r", "tag", "a", D1),
            ("r", "tag", "b", D1),
            ("r", "manifest", None, D2),
            ("r", "delete_tag", "a", None),
        ]
        seqs = [c.seq for c in changes]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        # Versions grow with the clock; a delete's beats the tag it removes.
        assert changes[3].version > changes[0].version and changes[0].origin == "eu"
        assert await index.queue_stats("us") == (4, changes[0].created)
        assert [c.seq for c in await index.pending_changes("us", 2)] == seqs[:2]
        await index.ack_change("us", seqs[1])
        assert [c.seq for c in await index.pending_changes("us", 10)] == seqs[2:]
        assert (await index.queue_stats("us"))[0] == 2
        assert len(await index.pending_changes("hook", 10)) == 4  # cursors are per consumer
        await index.ack_change("hook", seqs[3])
        await index.ack_change("us", seqs[3])
        assert await index.queue_stats("us") == (0, None)
        assert await index.pending_changes("hook", 10) == []
        # Retention's removals are logged as local operations.
        assert await index.expire_tag("r", "b", changes[1].version)
        (expired,) = await index.pending_changes("us", 10)
        assert (expired.op, expired.tag, expired.seq > seqs[3]) == ("expire_tag", "b", True)
    finally:
        await index.close()


async def test_a_database_from_before_the_actor_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, repo TEXT NOT NULL,"
        " op TEXT NOT NULL, tag TEXT, digest TEXT, version INTEGER NOT NULL,"
        " origin TEXT NOT NULL, created REAL NOT NULL)"
    )
    conn.execute(
        "INSERT INTO changes(repo, op, tag, digest, version, origin, created)"
        " VALUES ('r', 'tag', 'v1', ?, 1, 'eu', 0)",
        (D1,),
    )
    conn.commit()
    conn.close()
    index = SqliteIndex(path, "eu", ["us"])
    again = SqliteIndex(path, "eu", ["us"])  # a second worker opening it: nothing to add
    try:
        await index.put_manifest("r", manifest(D2), ["v2"], actor="ci")
        # The new peer starts at the end of the log; what came before is anti-entropy's.
        assert [(c.tag, c.actor) for c in await index.pending_changes("us", 10)] == [("v2", "ci")]
    finally:
        await index.close()
        await again.close()


def _schema_without(*columns: str) -> str:
    """The SQLite schema as a database made before ``columns`` of repositories were."""
    old = sqlite_index._SCHEMA
    for column in columns:
        line = next(x for x in old.splitlines() if x.strip().startswith(column + " "))
        old = old.replace(line + "\n", "")
    # Without comments, so that the last column left can lose its comma.
    old = "\n".join(x for x in old.splitlines() if not x.strip().startswith("--"))
    return old.replace(",\n);", "\n);")


async def test_a_database_from_before_the_tag_count_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        _schema_without("tags_changed", "stored_bytes", "tag_count", "manifest_count")
    )
    assert "tags_changed" not in {r[1] for r in conn.execute("PRAGMA table_info(repositories)")}
    conn.close()
    index = SqliteIndex(path)
    try:
        await index.put_manifest("r", manifest(D1), ["a"])
        first = await index.tag_list_version("r")
        await index.delete_tag("r", "a")
        assert first is not None and await index.tag_list_version("r") != first
    finally:
        await index.close()


async def test_a_database_from_before_usage_counts_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(_schema_without("stored_bytes", "tag_count", "manifest_count"))
    conn.execute("INSERT INTO repositories(id, name, created) VALUES (1, 'r', 0)")
    conn.executemany(
        "INSERT INTO blobs(digest, size, created) VALUES (?, ?, 0)", [(B1, 100), (B2, 200)]
    )
    conn.executemany(
        "INSERT INTO manifests(repo_id, digest, media_type, size, content, created)"
        " VALUES (1, ?, 'x', 10, x'00', 0)",
        [(D1,), (D2,)],
    )
    conn.executemany(
        "INSERT INTO manifest_refs(repo_id, digest, child, kind) VALUES (1, ?, ?, 'blob')",
        [(D1, B1), (D1, B2), (D2, B2)],
    )
    conn.execute(
        "INSERT INTO tags(repo_id, name, digest, updated, version, origin)"
        " VALUES (1, 'v1', ?, 0, 1, '')",
        (D1,),
    )
    conn.commit()
    conn.close()
    index = SqliteIndex(path)
    again = SqliteIndex(path)  # a second worker: counted once, not twice
    try:
        assert await index.usage("r") == Usage("r", 320, 1, 2)
        await index.delete_manifest("r", D1)  # B2 stays: D2 still references it
        assert await index.usage("r") == Usage("r", 210, 0, 1) == await index.recount_usage("r")
    finally:
        await index.close()
        await again.close()


async def _linked(index: MetadataIndex, repo: str, *sizes: tuple[str, int]) -> None:
    for digest, size in sizes:
        await index.link_blob(repo, digest, size)


async def _same_as_recount(index: MetadataIndex, repo: str) -> Usage:
    kept = await index.usage(repo)
    assert kept is not None and kept == await index.recount_usage(repo)
    return kept


async def test_usage_counts_each_blob_once_per_repository(index: MetadataIndex) -> None:
    await _linked(index, "r", (B1, 100), (B2, 200), (B3, 400))
    m1, m2 = manifest(D1, blobs=(B1, B2)), manifest(D2, blobs=(B2, B3))
    c1, c2 = len(m1.content), len(m2.content)
    await index.put_manifest("r", m1, ["v1"])
    assert await _same_as_recount(index, "r") == Usage("r", 300 + c1, 1, 1)
    await index.put_manifest("r", m2, ["v2"])  # B2 is shared: counted once
    assert await _same_as_recount(index, "r") == Usage("r", 700 + c1 + c2, 2, 2)
    await index.put_manifest("r", m1, ["latest", "v1"])  # again, one more tag
    assert await _same_as_recount(index, "r") == Usage("r", 700 + c1 + c2, 3, 2)
    # Another repository holding a layer of this one counts it too.
    await _linked(index, "s", (B1, 100))
    await index.put_manifest("s", manifest(D3, blobs=(B1,)), ["v1"])
    assert await _same_as_recount(index, "s") == Usage("s", 100 + len(manifest(D3).content), 1, 1)
    # Deletes give back exactly what is no longer referenced.
    assert await index.delete_manifest("r", D1)
    assert await _same_as_recount(index, "r") == Usage("r", 600 + c2, 1, 1)
    assert await index.delete_tag("r", "v2")
    assert await _same_as_recount(index, "r") == Usage("r", 600 + c2, 0, 1)
    assert len(await index.delete_untagged_manifest("r", D2)) == 1
    assert await _same_as_recount(index, "r") == Usage("r", 0, 0, 0)
    assert [u.repository for u in await index.usages(None, None)] == ["r", "s"]
    assert await index.usages(1, "r") == [await index.usage("s")]
    assert await index.usage("nope") is None and await index.recount_usage("nope") is None


async def test_a_push_over_the_quota_is_refused_and_leaves_nothing(
    index: MetadataIndex,
) -> None:
    await _linked(index, "r", (B1, 100), (B2, 200), (B3, 400))
    m1 = manifest(D1, blobs=(B1, B2))
    quota = Quota(storage=300 + len(m1.content) + 50, tags=2)
    await index.put_manifest("r", m1, ["v1"], quota=quota)
    before = await _same_as_recount(index, "r")
    with pytest.raises(errors.RegistryError) as caught:
        await index.put_manifest("r", manifest(D2, blobs=(B3,)), ["v2"], quota=quota)
    assert caught.value.error is errors.QUOTA_EXCEEDED and caught.value.status == 403
    assert "storage quota exceeded: repository r" in str(caught.value.message)
    assert await index.get_manifest("r", D2) is None
    assert await index.resolve_tag("r", "v2") is None
    assert await _same_as_recount(index, "r") == before
    # Tags: a second fits, a third does not; moving one is no growth.
    await index.put_manifest("r", m1, ["v2"], quota=quota)
    with pytest.raises(errors.RegistryError, match="tag quota exceeded"):
        await index.put_manifest("r", m1, ["v3"], quota=quota)
    small = manifest(D3, blobs=(B1,))
    with pytest.raises(errors.RegistryError, match="storage quota"):
        await index.put_manifest("r", small, ["v2"], quota=quota)  # its own bytes are growth
    # A lowered quota: what adds nothing still goes; a replicated change is not refused.
    tight = Quota(storage=1, tags=1)
    await index.put_manifest("r", m1, ["v2"], quota=tight)
    await index.put_manifest("r", small, ["v9"], Stamp(10**15, "us"), quota=tight)
    assert await index.resolve_tag("r", "v9") == D3


async def test_concurrent_pushes_never_pass_the_quota(index: MetadataIndex) -> None:
    blobs = ["sha256:" + f"{n:064x}" for n in range(10)]
    digests = ["sha256:" + f"{n + 100:064x}" for n in range(10)]
    await _linked(index, "r", *((b, 300) for b in blobs))
    size = 300 + len(manifest(digests[0]).content)
    quota = Quota(storage=2 * size + size // 2)

    async def push(n: int) -> bool:
        try:
            await index.put_manifest(
                "r", manifest(digests[n], blobs=(blobs[n],)), [f"t{n}"], quota=quota
            )
        except errors.RegistryError as exc:
            assert exc.error is errors.QUOTA_EXCEEDED
            return False
        return True

    pushed = await asyncio.gather(*(push(n) for n in range(10)))
    assert sum(pushed) == 2
    assert await _same_as_recount(index, "r") == Usage("r", 2 * size, 2, 2)


def _open_once(path: str, answer: Connection) -> None:
    try:
        SqliteIndex(Path(path))
    except Exception as exc:  # reported to the parent, which asserts on it
        answer.send(repr(exc))
    else:
        answer.send("")


def test_workers_creating_a_new_index_together_all_start(tmp_path: Path) -> None:
    """With `http.workers` > 1 every worker opens the same new index.db at once; switching
    it to WAL raced ("database is locked") and killed a worker about once in 75 starts.

    Forked processes of their own, each answering on a pipe, not a multiprocessing Pool:
    a Pool forked from this (threaded) test process once hung in its terminate."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(40):
        path = str(tmp_path / f"{round_}" / "index.db")
        pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
        workers = [ctx.Process(target=_open_once, args=(path, send)) for _, send in pipes]
        for worker in workers:
            worker.start()
        answers = []
        for (receive, _), worker in zip(pipes, workers, strict=True):
            assert receive.poll(30), "a worker did not answer"
            answers.append(receive.recv())
            worker.join(30)
        assert answers == ["", "", ""]


async def test_the_ui_listings_page_search_and_time_pushes(index: MetadataIndex) -> None:
    for repo in ("team-a/api", "team-a/web", "team_b/x", "other"):
        await index.put_manifest(repo, manifest(D1), ["v1"])
    await index.put_manifest("team-a/api", manifest(D2), ["v2", "a"])
    listed = await index.repository_listing(None, None)
    assert [u.repository for u, _ in listed] == ["other", "team-a/api", "team-a/web", "team_b/x"]
    assert all(pushed is not None and pushed > 1e9 for _, pushed in listed)
    assert [u.repository for u, _ in await index.repository_listing(2, "other")] == [
        "team-a/api",
        "team-a/web",
    ]
    # "_" and "%" are the name's own characters, not LIKE's wildcards.
    assert [u.repository for u, _ in await index.repository_listing(None, None, "_")] == [
        "team_b/x"
    ]
    assert [u.repository for u, _ in await index.repository_listing(None, None, "a/")] == [
        "team-a/api",
        "team-a/web",
    ]
    assert await index.repository_listing(None, None, "%") == []
    details = await index.tag_details("team-a/api", 2, None)
    assert details is not None and [(t.name, t.digest) for t in details] == [("a", D2), ("v1", D1)]
    more = await index.tag_details("team-a/api", 2, "v1")
    assert more is not None and [t.name for t in more] == ["v2"]
    assert await index.tag_details("nope", 10, None) is None


async def test_a_replicated_delete_spares_a_child_an_index_here_lists(
    index: MetadataIndex,
) -> None:
    """A peer deleted D; an index listing D was pushed here meanwhile. The region that
    deleted D refuses to delete a listed manifest, so it did not know that index: the
    delete leaves D, tagged index or not, older or newer (found by review: the index
    broke and D's layers went with the next collection). The index deleted, D goes."""
    await index.put_manifest("r", manifest(D1, blobs=(B1,)), [])
    await index.put_manifest("r", manifest(D2, children=(D1,)), ["t"])
    await index.put_manifest("r", manifest(D3, children=(D1,)), [])
    (tagged,) = await index.tag_states("r")
    for shift in (-1000, 1000):
        assert await index.delete_manifest("r", D1, stamp=Stamp(tagged.version + shift, "us"))
        assert await index.get_manifest("r", D1) is not None
    assert await index.resolve_tag("r", "t") == D2
    later = Stamp(tagged.version + 2000, "us")
    assert await index.delete_manifest("r", D2, stamp=later)
    assert await index.delete_manifest("r", D3, stamp=later)
    assert await index.delete_manifest("r", D1, stamp=later)
    assert await index.get_manifest("r", D1) is None


async def test_a_referrer_deleted_by_digest_is_remembered_until_stored_again(
    index: MetadataIndex,
) -> None:
    """A referrer has no tag whose tombstone would keep it deleted: its delete is kept
    (with the delete's stamp) and compared with the referrer's clock version when first
    stored, so that a peer's older copy is not taken back, while a copy stored after
    the delete is, and so is a push of it here."""
    await index.put_manifest("r", manifest(D1), ["v1"])
    await index.put_manifest("r", manifest(D2, subject=D1), [])
    (tagged,) = await index.tag_states("r")
    (stored,) = await index.referrer_states("r")
    assert (stored.digest, stored.deleted) == (D2, None)
    assert stored.stored is not None and stored.stored > tagged.version  # the next tick
    record = await index.get_manifest("r", D2, content=False)
    assert record is not None and record.stored_version == stored.stored
    delete = Stamp(stored.stored + 10, "us")
    assert await index.delete_manifest("r", D2, stamp=delete)
    assert [(s.digest, s.stored, s.deleted) for s in await index.referrer_states("r")] == [
        (D2, None, delete)
    ]
    # A peer's copy stored before the delete is overtaken, nothing stored; so is one
    # from a peer that does not say when it was stored.
    for older in (delete.version - 1, None):
        with pytest.raises(Overtaken):
            await index.put_manifest(
                "r", manifest(D2, subject=D1), [], replicated=True, stored_version=older
            )
        assert await index.get_manifest("r", D2) is None
    # One stored after it stands, with the version it was first stored at; the
    # tombstone goes.
    later = delete.version + 5
    await index.put_manifest(
        "r", manifest(D2, subject=D1), [], replicated=True, stored_version=later
    )
    assert [(s.digest, s.stored, s.deleted) for s in await index.referrer_states("r")] == [
        (D2, later, None)
    ]
    # A replicated delete older than that copy leaves it; a newer one takes it.
    assert await index.delete_manifest("r", D2, stamp=Stamp(later - 1, "us"))
    assert await index.get_manifest("r", D2) is not None
    assert await index.delete_manifest("r", D2, stamp=Stamp(later + 1, "us"))
    assert await index.get_manifest("r", D2) is None
    # A local push of it again forgets the delete, and is later than anything seen.
    await index.put_manifest("r", manifest(D2, subject=D1), [])
    (again,) = await index.referrer_states("r")
    assert again.deleted is None and again.stored is not None and again.stored > later + 1
    # A local push of it once more moves its version up (a delete on its way loses).
    await index.put_manifest("r", manifest(D2, subject=D1), [])
    (pushed,) = await index.referrer_states("r")
    assert pushed.stored is not None and pushed.stored > again.stored
    # A local delete is remembered too; a manifest that is no referrer leaves nothing;
    # expiry takes referrer tombstones, counted from the delete's own time.
    assert await index.delete_manifest("r", D2)
    assert await index.delete_manifest("r", D1)
    (local,) = await index.referrer_states("r")
    assert local.stored is None and local.deleted is not None
    assert await index.expire_tombstones(time.time() - 60) == 0
    assert await index.expire_tombstones(time.time() + 1) >= 1
    assert await index.referrer_states("r") == []


async def test_a_referrer_a_peer_sends_again_keeps_the_later_stored_version(
    index: MetadataIndex,
) -> None:
    await index.put_manifest("r", manifest(D1), ["v1"])
    await index.put_manifest("r", manifest(D2, subject=D1), [], replicated=True, stored_version=7)
    await index.put_manifest("r", manifest(D2, subject=D1), [], replicated=True, stored_version=5)
    assert [s.stored for s in await index.referrer_states("r")] == [7]
    await index.put_manifest("r", manifest(D2, subject=D1), [], replicated=True, stored_version=9)
    assert [s.stored for s in await index.referrer_states("r")] == [9]


async def test_a_tag_push_of_a_referrer_older_than_its_delete_is_overtaken(
    index: MetadataIndex,
) -> None:
    """It lost on its tag but stored the manifest row again: the referrer was back in
    its subject's list, held and deleted at once (found by review)."""
    await index.put_manifest("r", manifest(D1), ["v1"])
    await index.put_manifest("r", manifest(D2, subject=D1), [])
    (stored,) = await index.referrer_states("r")
    assert stored.stored is not None
    delete = Stamp(stored.stored + 10, "us")
    assert await index.delete_manifest("r", D2, stamp=delete)
    with pytest.raises(Overtaken):
        await index.put_manifest(
            "r", manifest(D2, subject=D1), ["sig"], Stamp(delete.version - 1, "eu")
        )
    assert await index.referrers("r", D1) == []
    # A tag push after the delete stands, and the referrer with it.
    await index.put_manifest(
        "r", manifest(D2, subject=D1), ["sig"], Stamp(delete.version + 1, "eu")
    )
    assert [m.digest for m in await index.referrers("r", D1)] == [D2]
    assert await index.resolve_tag("r", "sig") == D2


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_consumer_another_replica_configures_holds_the_log(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A rolling update adds an endpoint: the replica still on the old configuration
    trimmed the log past what the new endpoint had not been sent (found by review). A
    consumer nobody has configured for a day no longer holds it."""
    new = await open_index(backend, request, tmp_path, "eu", ["ci", "audit"])
    old = await open_index(backend, request, tmp_path, "eu", ["ci"])
    try:
        await old.put_manifest("r", manifest(D1), ["a"])
        await old.put_manifest("r", manifest(D2), ["b"])
        pending = await old.pending_changes("ci", 10)
        await old.ack_change("ci", pending[-1].seq)  # the old replica delivers to ci
        assert [c.tag for c in await new.pending_changes("audit", 10)] == ["a", "b"]
        if backend == "sqlite":
            conn = sqlite3.connect(tmp_path / "index.db")
            conn.execute("UPDATE peer_cursors SET seen = 0 WHERE peer = 'audit'")
            conn.commit()
            conn.close()
        else:
            dsn = request.getfixturevalue("postgres_dsn")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE peer_cursors SET seen = 0 WHERE peer = 'audit'")
        await old.put_manifest("r", manifest(D3), ["c"])
        pending = await old.pending_changes("ci", 10)
        await old.ack_change("ci", pending[-1].seq)
        assert await new.pending_changes("audit", 10) == []  # removed everywhere a day ago
    finally:
        await old.close()
        await new.close()
