"""The PostgreSQL index under what SQLite never sees: many writers at once, each with
connections of its own (as replicas have), and replicas migrating together.

Each `PostgresIndex` here has its own pool, so its transactions are other server
backends' transactions, as another replica's would be. The behaviour every backend
shares is in test_metadata_index.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from registry_server.protocol import errors
from registry_server.protocol.quotas import Usage
from registry_server.storage import postgres_index, postgres_schema
from registry_server.storage.index import Change, NewManifest
from registry_server.storage.postgres_index import PostgresIndex

pytestmark = pytest.mark.integration


def manifest(digest: str, blobs: tuple[str, ...] = ()) -> NewManifest:
    return NewManifest(
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        content=b"{}" + digest.encode(),
        artifact_type=None,
        subject=None,
        annotations=None,
        blob_refs=blobs,
        child_refs=(),
    )


def digest(n: int, kind: str = "m") -> str:
    return "sha256:" + f"{kind}{n:x}".encode().hex().ljust(64, "0")[:64]


@pytest.fixture
async def replicas(postgres_dsn: str) -> AsyncIterator[list[PostgresIndex]]:
    """Three indexes on one database, as three replicas with consumers us and hook."""
    opened = [
        await PostgresIndex.connect(postgres_dsn, "eu", ["us", "hook"], pool_size=4)
        for _ in range(3)
    ]
    try:
        yield opened
    finally:
        for index in opened:
            await index.close()


def test_replicas_migrating_at_once_make_one_schema(postgres_dsn: str) -> None:
    made: list[PostgresIndex] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            made.append(PostgresIndex(postgres_dsn, "eu", ["us"]))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failed == [] and len(made) == 6
    assert len({index.instance_id for index in made}) == 1  # one database, one id
    with psycopg.connect(postgres_dsn) as conn:
        applied = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert applied == [(v,) for v, _ in postgres_schema.MIGRATIONS]
        assert conn.execute("SELECT peer FROM peer_cursors").fetchall() == [("us",)]


def test_a_newer_schema_is_refused(postgres_dsn: str) -> None:
    PostgresIndex(postgres_dsn)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("INSERT INTO schema_version(version, applied) VALUES (99, 0)")
    with pytest.raises(RuntimeError, match="schema version 99"):
        PostgresIndex(postgres_dsn)


def _migrated_up_to(conn: psycopg.Connection[Any], count: int) -> None:
    """The database as a server of the first ``count`` migrations left it."""
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
        " applied DOUBLE PRECISION NOT NULL)"
    )
    for version, script in postgres_schema.MIGRATIONS[:count]:
        conn.execute(script)
        conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))


async def test_a_database_from_before_usage_counts_what_it_holds(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        _migrated_up_to(conn, 4)
        conn.execute("INSERT INTO repositories(id, name, created) VALUES (1, 'r', 0)")
        for blob, size in ((digest(1, "b"), 100), (digest(2, "b"), 200)):
            conn.execute("INSERT INTO blobs VALUES (%s, %s, 0)", (blob, size))
        for m in (digest(1), digest(2)):
            conn.execute(
                "INSERT INTO manifests(repo_id, digest, media_type, size, content, created)"
                " VALUES (1, %s, 'x', 10, '\\x00', 0)",
                (m,),
            )
        for m, blob in ((1, 1), (1, 2), (2, 2)):
            conn.execute(
                "INSERT INTO manifest_refs VALUES (1, %s, %s, 'blob')",
                (digest(m), digest(blob, "b")),
            )
        conn.execute("INSERT INTO tags VALUES (1, 'v1', %s, 0, 1, '')", (digest(1),))
    index = await PostgresIndex.connect(postgres_dsn)
    try:
        assert await index.usage("r") == Usage("r", 320, 1, 2)
        await index.delete_manifest("r", digest(1))  # the shared blob stays counted
        assert await index.usage("r") == Usage("r", 210, 0, 1) == await index.recount_usage("r")
    finally:
        await index.close()


async def test_an_entry_committed_late_is_not_skipped(
    replicas: list[PostgresIndex], postgres_dsn: str
) -> None:
    """A change logged by a transaction that commits after a later one was already read
    still reaches the consumer: seq is given at visibility, not at insertion."""
    first, second, _ = replicas
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as slow:
        # A writer that logged its change (taking the next id) but has not committed.
        await slow.execute(
            "INSERT INTO changes(repo, op, tag, digest, version, origin, created)"
            " VALUES ('slow', 'tag', 'v1', %s, 1, 'eu', 0)",
            (digest(1),),
        )
        await first.put_manifest("fast", manifest(digest(2)), ["v1"])
        (fast,) = await second.pending_changes("us", 10)
        assert fast.repo == "fast"
        await second.ack_change("us", fast.seq)
        await slow.commit()
    (late,) = await second.pending_changes("us", 10)
    assert late.repo == "slow" and late.seq > fast.seq


async def test_concurrent_writers_lose_no_log_entry_and_versions_grow_per_tag(
    replicas: list[PostgresIndex],
) -> None:
    """Replicas push and delete tags of a few repositories at once while a consumer pages
    through the log: it gets every change once, in an order where each tag's versions
    grow, and the last one it gets for a tag is the tag's state."""
    rng = random.Random(12)
    repos, tags = ["a", "b", "c"], ["t1", "t2"]
    logged = 0
    done = asyncio.Event()
    consumed: list[Change] = []

    async def writer(index: PostgresIndex, n: int) -> None:
        nonlocal logged
        for i in range(40):
            repo, tag = rng.choice(repos), rng.choice(tags)
            if rng.random() < 0.2:
                if await index.delete_tag(repo, tag):
                    logged += 1
            else:
                await index.put_manifest(repo, manifest(digest(n * 1000 + i)), [tag])
                logged += 1

    async def consumer(index: PostgresIndex) -> None:
        while True:
            finished = done.is_set()
            page = await index.pending_changes("us", 7)
            consumed.extend(page)
            if page:
                await index.ack_change("us", page[-1].seq)
            elif finished:
                return
            await asyncio.sleep(0)

    reading = asyncio.create_task(consumer(replicas[0]))
    await asyncio.gather(*(writer(index, n) for n, index in enumerate(replicas)))
    done.set()
    await asyncio.wait_for(reading, 60)

    assert len(consumed) == logged
    seqs = [c.seq for c in consumed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    last: dict[tuple[str, str], Change] = {}
    for change in consumed:
        key = (change.repo, change.tag or "")
        if key in last:
            assert change.version > last[key].version, (last[key], change)
        last[key] = change
    for (repo, tag), change in last.items():
        expected = change.digest if change.op == "tag" else None
        assert await replicas[1].resolve_tag(repo, tag) == expected


async def test_collection_never_takes_a_blob_a_committed_manifest_needs(
    replicas: list[PostgresIndex],
) -> None:
    """A push that needs a blob and a collection of that blob, at once from two replicas:
    either the push fails (blob unknown) or the blob stays; never a manifest without it."""
    pusher, collector, _ = replicas
    outcomes: set[str] = set()
    for n in range(30):
        blob, image = digest(n, "b"), digest(n, "i")
        await pusher.link_blob("r", blob, 1)
        removed: list[str] = []

        async def remove(b: str = blob, into: list[str] = removed) -> None:
            await asyncio.sleep(0.005)  # the file's removal takes time, under the lock
            into.append(b)

        async def push(b: str = blob, i: str = image) -> str:
            try:
                await pusher.put_manifest("r", manifest(i, (b,)), [], required_blobs=[b])
            except errors.RegistryError as exc:
                assert exc.error is errors.MANIFEST_BLOB_UNKNOWN
                return "refused"
            return "stored"

        pushed, forgotten = await asyncio.gather(
            push(), collector.forget_blob(blob, older_than=1e12, remove=remove)
        )
        stored = await collector.get_manifest("r", image) is not None
        recorded = blob in await collector.recorded_blobs([blob])
        assert (pushed == "stored") == stored
        assert not (stored and not recorded), "a committed manifest lost its blob"
        assert forgotten == bool(removed) == (not recorded)
        outcomes.add(f"{pushed}/{'forgotten' if forgotten else 'kept'}")
    # Only the two serial outcomes; in practice both occur over the rounds.
    assert outcomes <= {"stored/kept", "refused/forgotten"}


async def test_one_tag_pushed_from_every_replica_ends_on_the_newest_version(
    replicas: list[PostgresIndex],
) -> None:
    await asyncio.gather(
        *(
            index.put_manifest("r", manifest(digest(n * 100 + i)), ["latest"])
            for i in range(10)
            for n, index in enumerate(replicas)
        )
    )
    changes = await replicas[0].pending_changes("us", 100)
    assert len(changes) == 30
    versions = [c.version for c in changes]
    assert versions == sorted(versions) and len(set(versions)) == 30
    (state,) = await replicas[1].tag_states("r")
    assert (state.digest, state.version) == (changes[-1].digest, changes[-1].version)


async def test_manifests_from_before_released_count_as_let_go_of_at_the_upgrade(
    postgres_dsn: str,
) -> None:
    """Untagged retention turned on right after the upgrade must not take an image whose
    tag moved yesterday because it was pushed a month ago (found by review)."""
    with psycopg.connect(postgres_dsn) as conn:
        _migrated_up_to(conn, 7)
        conn.execute("INSERT INTO repositories(id, name, created) VALUES (1, 'r', 0)")
        conn.execute(
            "INSERT INTO manifests(repo_id, digest, media_type, size, content, created)"
            " VALUES (1, %s, 'x', 1, '\\x00', %s)",
            (digest(1), time.time() - 30 * 86400),
        )
    index = await PostgresIndex.connect(postgres_dsn)
    try:
        assert await index.untagged_manifests("r", time.time() - 86400) == []
        assert await index.untagged_manifests("r", time.time() + 60) == [digest(1)]
        await index.put_manifest("r", manifest(digest(2)), [])  # a new one: by its push
        assert await index.untagged_manifests("r", time.time() + 60) == [digest(1), digest(2)]
    finally:
        await index.close()


def test_a_migration_waiting_for_a_table_lets_go_and_tries_again(postgres_dsn: str) -> None:
    """An ALTER TABLE queued behind another replica's long transaction would hold up
    every query on that table: it waits a bounded time, lets go, and tries again."""
    with psycopg.connect(postgres_dsn) as conn:
        _migrated_up_to(conn, 7)
    with psycopg.connect(postgres_dsn) as holder, psycopg.connect(postgres_dsn) as migrating:
        holder.execute("LOCK TABLE manifests IN ACCESS SHARE MODE")  # a reader's lock
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            postgres_index.migrate(migrating, lock_timeout=0.2, attempts=2)
        assert time.monotonic() - started < 5
        # Meanwhile another reader is not held up behind a waiting ALTER TABLE.
        with psycopg.connect(postgres_dsn) as reader:
            reader.execute("SET statement_timeout = '2s'")
            reader.execute("SELECT count(*) FROM manifests").fetchone()
        holder.rollback()
        postgres_index.migrate(migrating, lock_timeout=0.2, attempts=2)
        versions = migrating.execute("SELECT max(version) FROM schema_version").fetchone()
        assert versions == (postgres_schema.LATEST,)


def test_pooled_connections_notice_a_server_cut_off_without_a_reset() -> None:
    """Without keepalives or a user timeout, a query on a connection whose server was
    lost without a reset hung for the kernel's retransmissions, about 15 minutes (found
    by review). What the DSN sets itself stands."""
    from psycopg.conninfo import conninfo_to_dict

    from registry_server.storage.postgres_index import pool_dsn

    given = conninfo_to_dict(pool_dsn("postgresql://berth@db/berth"))
    assert given["keepalives"] == "1" and given["tcp_user_timeout"] == "30000"
    assert given["connect_timeout"] == "30"
    own = conninfo_to_dict(pool_dsn("host=db dbname=berth keepalives_idle=60 connect_timeout=5"))
    assert own["keepalives_idle"] == "60" and own["connect_timeout"] == "5"


async def test_a_long_publish_holds_neither_a_request_connection_nor_a_transaction(
    postgres_dsn: str,
) -> None:
    """The publish of a large layer (an S3 copy of minutes) held a pooled connection in
    an open transaction: a burst of them took every connection from the requests and
    /readyz, and a server's idle_in_transaction_session_timeout ended the copy (found by
    review). A publish that fails lets go of the blob's lock."""
    index = await PostgresIndex.connect(postgres_dsn, "eu", [], pool_size=1)
    copying, copied = asyncio.Event(), asyncio.Event()
    blob = digest(7, "b")

    async def slow_publish() -> None:
        copying.set()
        await copied.wait()

    async def failing_publish() -> None:
        raise OSError("the store is gone")

    try:
        with pytest.raises(OSError):
            await index.link_blob("r", blob, 3, failing_publish)
        linking = asyncio.create_task(index.link_blob("r", blob, 3, slow_publish))
        await copying.wait()
        # The request pool's only connection is free: reads and writes go on.
        async with asyncio.timeout(5):
            await index.ping()
            await index.link_blob("r", digest(8, "b"), 3)
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE state = 'idle in transaction' AND datname = current_database()"
            )
            assert (await cur.fetchone()) == (0,)
        copied.set()
        await linking
        assert await index.blob_size("r", blob) == 3
    finally:
        copied.set()
        await index.close()


async def test_a_write_cancelled_while_letting_go_of_a_blob_leaves_no_lock_behind(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled in its unlock (an election term lost mid-collection), a guarded write
    gave its connection back to the pool still holding the blob's lock: every other
    session wanting that blob waited (found by review)."""
    first = await PostgresIndex.connect(postgres_dsn, "eu", [], pool_size=1)
    second = await PostgresIndex.connect(postgres_dsn, "eu", [], pool_size=1)
    blob = digest(9, "b")
    real = postgres_index._unlock_blobs

    async def cancelled(conn: Any, name: str | None) -> None:
        raise asyncio.CancelledError

    try:
        monkeypatch.setattr(postgres_index, "_unlock_blobs", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await first.link_blob("r", blob, 3, publish=_nothing)
        monkeypatch.setattr(postgres_index, "_unlock_blobs", real)
        async with asyncio.timeout(5):  # the lock went with the closed connection
            await second.link_blob("s", blob, 3, publish=_nothing)
            await first.link_blob("t", blob, 3, publish=_nothing)
    finally:
        await first.close()
        await second.close()


async def _nothing() -> None:
    return None
