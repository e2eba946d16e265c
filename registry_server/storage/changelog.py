"""The change log: what replication peers and webhook endpoints consume, in ``seq`` order
(shared by every SQL metadata index; no I/O here).

A local change is recorded in the same transaction as the change itself. Each consumer
(a peer, a webhook endpoint) has a cursor: the last ``seq`` it has, and when a replica
that has it configured last registered or moved it (``seen``). Entries every consumer
has are trimmed: those configured here, and those another replica configured within
the last day (with several replicas, a rolling update that adds an endpoint must not
have the old replicas trim what the new one has not sent yet; one removed everywhere
stops holding the log after a day). ``seq`` must grow in the order entries become
visible, so that a consumer paging past ``seq`` never misses one committed later with a
lower number: SQLite's single writer gives that for free (AUTOINCREMENT in commit
order); PostgreSQL's concurrent writers record entries without a ``seq`` and
``number`` gives the committed ones their numbers afterwards, one numbering at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from registry_server.protocol.versions import Stamp
from registry_server.storage.index import Change
from registry_server.storage.sqltx import Query, Tx, in_marks


def record(
    consumers: Sequence[str],
    repo: str,
    op: str,
    tag: str | None,
    digest: str | None,
    version: Stamp,
    actor: str | None = None,
) -> Tx[None]:
    if consumers:  # nobody would read it
        yield Query(
            "INSERT INTO changes(repo, op, tag, digest, version, origin, created, actor)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (repo, op, tag, digest, version.version, version.origin, time.time(), actor),
        )


# How long a consumer another replica configured keeps holding the log here.
CONFIGURED_ELSEWHERE_SECONDS = 24 * 3600.0


def register(consumers: Sequence[str]) -> Tx[None]:
    """Give new consumers a cursor at the end of the log (anti-entropy backfills what came
    before; a webhook endpoint starts with what happens from now on)."""
    now = time.time()
    # In one order everywhere: replicas starting together lock the rows alike.
    for consumer in sorted(set(consumers)):
        yield Query(
            "INSERT INTO peer_cursors(peer, seq, seen) SELECT ?, COALESCE(MAX(seq), 0), ?"
            " FROM changes WHERE true ON CONFLICT (peer) DO UPDATE SET seen = excluded.seen",
            (consumer, now),
        )


def pending(consumer: str, limit: int) -> Tx[list[Change]]:
    rows = yield Query(
        "SELECT c.seq, c.repo, c.op, c.tag, c.digest, c.version, c.origin, c.created,"
        " c.actor FROM changes c JOIN peer_cursors p ON p.peer = ? WHERE c.seq > p.seq"
        " ORDER BY c.seq LIMIT ?",
        (consumer, limit),
    )
    return [Change(*r) for r in rows.rows]


def ack(consumers: Sequence[str], consumer: str, seq: int) -> Tx[None]:
    now = time.time()
    yield Query(
        "UPDATE peer_cursors SET seq = ?, seen = ? WHERE peer = ? AND seq < ?",
        (seq, now, consumer, seq),
    )
    if not consumers:
        return
    # Entries every consumer has are no longer needed: those configured here, and those
    # another replica configured lately.
    yield Query(
        "DELETE FROM changes WHERE seq <= (SELECT MIN(seq) FROM peer_cursors"
        f" WHERE peer IN ({in_marks(len(consumers))}) OR seen > ?)",
        (*consumers, now - CONFIGURED_ELSEWHERE_SECONDS),
    )


def stats(consumer: str) -> Tx[tuple[int, float | None]]:
    """(undelivered entries, creation time of the oldest); an entry not yet numbered
    (``seq`` NULL, PostgreSQL) is undelivered too."""
    row = (
        yield Query(
            "SELECT COUNT(*), MIN(c.created) FROM changes c JOIN peer_cursors p ON p.peer = ?"
            " WHERE c.seq > p.seq OR c.seq IS NULL",
            (consumer,),
        )
    ).first()
    assert row is not None
    return int(row[0]), (float(row[1]) if row[1] is not None else None)


def number() -> Tx[int]:
    """Number the committed entries that have none yet (PostgreSQL), after every number
    given before, in insertion order; returns how many.

    A transaction's entries become visible only when it commits, in whatever order
    concurrent transactions commit, so ``seq`` cannot be given at insertion: an entry
    numbered 7 might appear after a consumer already moved past 8. Here numbers are given
    only to entries already committed, under the head row's lock, and each numbering
    reads (in a statement after taking that lock) everything the previous one committed:
    numbers only ever grow in the order entries become visible to consumers. Entries of
    one repository are inserted under its row lock, so insertion order is their commit
    order too.
    """
    if (yield Query("SELECT 1 FROM changes WHERE seq IS NULL LIMIT 1")).first() is None:
        return 0
    head = (yield Query("SELECT last FROM change_head WHERE id = 0 FOR UPDATE")).first()
    assert head is not None
    base = int(head[0])
    numbered = yield Query(
        "UPDATE changes SET seq = ? + b.n FROM (SELECT id, row_number() OVER (ORDER BY id) AS n"
        " FROM changes WHERE seq IS NULL) b WHERE changes.id = b.id AND changes.seq IS NULL",
        (base,),
    )
    if numbered.rowcount:
        yield Query("UPDATE change_head SET last = ? WHERE id = 0", (base + numbered.rowcount,))
    return numbered.rowcount
