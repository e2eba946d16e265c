"""Repositories, manifests, tags, tombstones and versions: the transactions and reads
every SQL metadata index shares (``sqltx``; no I/O here).

Writes that touch a repository's tags or manifests start with ``repository`` (found or
created, then locked where the dialect needs it), so each check-then-write below sees
every earlier writer of that repository committed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Sequence

from registry_server.protocol import errors, quotas, versions
from registry_server.protocol.quotas import Quota
from registry_server.protocol.versions import Stamp
from registry_server.storage import changelog, index_usage
from registry_server.storage.index import (
    RETENTION_ACTOR,
    ManifestRecord,
    NewManifest,
    Overtaken,
    ReferrerState,
    TagDetail,
    TagState,
)
from registry_server.storage.sqltx import Dialect, Query, Tx, in_marks

# Rows per multi-row INSERT (SQLite allows 32766 parameters per statement).
_ROWS_PER_INSERT = 1000


# -- repositories and the clock --------------------------------------------------------


def repository_id(repo: str) -> Tx[int | None]:
    row = (yield Query("SELECT id FROM repositories WHERE name = ?", (repo,))).first()
    return None if row is None else int(row[0])


def repository(dialect: Dialect, repo: str, create: bool) -> Tx[int | None]:
    """The repository's id for a write (created when asked), locked where needed."""
    repo_id = yield from repository_id(repo)
    if repo_id is None and create:
        inserted = yield Query(
            "INSERT INTO repositories(name, created) VALUES (?, ?)"
            " ON CONFLICT (name) DO NOTHING RETURNING id",
            (repo, time.time()),
        )
        row = inserted.first()
        # None: another writer created it meanwhile (and committed: it is visible now).
        repo_id = int(row[0]) if row is not None else (yield from repository_id(repo))
    if repo_id is not None and dialect.lock_repository:
        yield Query(dialect.lock_repository, (repo_id,))
    return repo_id


def _clock(dialect: Dialect, repo_id: int) -> Query:
    if dialect.per_repository_clock:
        return Query("SELECT clock FROM repositories WHERE id = ?", (repo_id,))
    return Query("SELECT last FROM clock WHERE id = 0")


def _set_clock(dialect: Dialect, repo_id: int, version: int) -> Query:
    if dialect.per_repository_clock:
        return Query(
            "UPDATE repositories SET clock = ? WHERE id = ? AND clock < ?",
            (version, repo_id, version),
        )
    return Query("UPDATE clock SET last = ? WHERE id = 0 AND last < ?", (version, version))


def stamp(dialect: Dialect, repo_id: int, region: str, given: Stamp | None) -> Tx[Stamp]:
    """A local change's next version, or a replicated change's own (the clock observes it)."""
    if given is None:
        last = (yield _clock(dialect, repo_id)).first()
        version = versions.tick(int(last[0]) if last else 0, int(time.time() * 1000))
        yield _set_clock(dialect, repo_id, version)
        return Stamp(version, region)
    yield _set_clock(dialect, repo_id, given.version)
    return given


def current(repo_id: int, tag: str) -> Tx[Stamp | None]:
    """A tag's state: its version, or its tombstone's."""
    rows = (
        yield Query(
            "SELECT version, origin FROM tags WHERE repo_id = ? AND name = ?"
            " UNION ALL SELECT version, origin FROM tombstones WHERE repo_id = ? AND name = ?",
            (repo_id, tag, repo_id, tag),
        )
    ).rows
    return max((Stamp(int(v), str(o)) for v, o in rows), default=None)


def tag_list_version(repo: str) -> Tx[tuple[int, int] | None]:
    """What a repository's tag list is valid for: its id and its count of tag changes
    (kept by a trigger on the tags table, whichever code writes the row)."""
    row = (yield Query("SELECT id, tags_changed FROM repositories WHERE name = ?", (repo,))).first()
    return None if row is None else (int(row[0]), int(row[1]))


def tombstone(repo_id: int, tag: str, version: Stamp, deleted: float | None = None) -> Tx[None]:
    # Expiry counts from the change's own time, so every region forgets it together
    # (retention, a local decision, counts from when it removed the tag).
    when = versions.physical_ms(version.version) / 1000 if deleted is None else deleted
    yield Query("DELETE FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag))
    yield Query(
        "INSERT INTO tombstones(repo_id, name, version, origin, deleted) VALUES (?,?,?,?,?)"
        " ON CONFLICT (repo_id, name) DO UPDATE SET version = excluded.version,"
        " origin = excluded.origin, deleted = excluded.deleted",
        (repo_id, tag, version.version, version.origin, when),
    )


# -- manifests and tags ----------------------------------------------------------------


def _missing_required(
    dialect: Dialect,
    repo_id: int,
    required_blobs: Sequence[str],
    required_manifests: Sequence[str],
) -> Tx[list[str]]:
    """What a manifest needs that the repository lacks. The blobs found stay locked
    (where the dialect locks) until the transaction ends, so GC cannot take them away
    between this check and the commit."""
    found: set[str] = set()
    wanted_blobs = list(dict.fromkeys(required_blobs))
    for start in range(0, len(wanted_blobs), 500):
        batch = wanted_blobs[start : start + 500]
        rows = (
            yield Query(
                "SELECT l.digest FROM blob_links l JOIN blobs b ON b.digest = l.digest"
                f" WHERE l.repo_id = ? AND l.digest IN ({in_marks(len(batch))})"
                + dialect.share_blob_rows,
                (repo_id, *batch),
            )
        ).rows
        found.update(str(r[0]) for r in rows)
    missing = [d for d in required_blobs if d not in found]
    for digest in required_manifests:
        row = (
            yield Query(
                "SELECT 1 FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, digest)
            )
        ).first()
        if row is None:
            missing.append(digest)
    return missing


def _replicated_wins(
    repo_id: int, tag: str, digest: str, incoming: Stamp, immutable: bool
) -> Tx[bool]:
    """Whether a replicated tag change applies: the last writer wins, except that an
    immutable tag pushed in two regions at once keeps its first push everywhere."""
    if immutable:
        row = (
            yield Query(
                "SELECT digest, version, origin FROM tags WHERE repo_id = ? AND name = ?",
                (repo_id, tag),
            )
        ).first()
        if row is not None and str(row[0]) != digest:
            return incoming < Stamp(int(row[1]), str(row[2]))
    return versions.wins(incoming, (yield from current(repo_id, tag)))


def put_manifest(
    dialect: Dialect,
    region: str,
    consumers: Sequence[str],
    repo: str,
    manifest: NewManifest,
    tags: Sequence[str],
    given: Stamp | None,
    immutable: Collection[str],
    required_blobs: Sequence[str],
    required_manifests: Sequence[str],
    actor: str | None,
    quota: Quota | None = None,
    replicated: bool = False,
    stored_version: int | None = None,
) -> Tx[list[str]]:
    local = given is None
    logged = local and not replicated  # a peer's by-digest send is not forwarded again
    repo_id = yield from repository(dialect, repo, create=True)
    assert repo_id is not None
    referrer = manifest.subject is not None
    if referrer and (replicated or not local):
        deleted = yield from _referrer_deleted(repo_id, manifest.digest)
        # A copy stored before this referrer was deleted (here, or in the region the
        # delete came from) was overtaken by the delete; so is one from a peer that does
        # not say when it was stored (an earlier version's anti-entropy brought deleted
        # referrers back), and a tag push of it older than the delete.
        incoming = stored_version if replicated else given.version if given else None
        if deleted is not None and (incoming is None or deleted > incoming):
            raise Overtaken(manifest.digest)
    # Under the repository's lock: no concurrent push counts between this and the check.
    limited = local and quota is not None and (quota.storage, quota.tags) != (None, None)
    before = (yield from index_usage.usage_of(repo_id)) if limited else None
    # Checked in the transaction: GC (or a delete) cannot take a blob or child away
    # between the check and the write and leave the manifest dangling.
    missing = yield from _missing_required(dialect, repo_id, required_blobs, required_manifests)
    if missing:
        raise errors.RegistryError(errors.MANIFEST_BLOB_UNKNOWN, detail={"digests": missing[:20]})
    for tag in immutable if local else ():  # in the transaction: of two pushes, one wins
        row = (
            yield Query("SELECT digest FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag))
        ).first()
        if row is not None and row[0] != manifest.digest:
            raise errors.RegistryError(errors.TAG_IMMUTABLE, detail={"tag": tag, "digest": row[0]})
    now = time.time()
    inserted = yield Query(
        "INSERT INTO manifests(repo_id, digest, media_type, size, content,"
        " artifact_type, subject, annotations, created) VALUES (?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT DO NOTHING",
        (
            repo_id,
            manifest.digest,
            manifest.media_type,
            len(manifest.content),
            manifest.content,
            manifest.artifact_type,
            manifest.subject,
            manifest.annotations,
            now,
        ),
    )
    if inserted.rowcount == 0 and not tags:
        # Pushed again by digest (its tag or index to follow): a fresh start for the
        # retention of untagged manifests, which must not take it meanwhile.
        yield Query(
            "UPDATE manifests SET released = ? WHERE repo_id = ? AND digest = ?",
            (now, repo_id, manifest.digest),
        )
    refs = [(repo_id, manifest.digest, d, "blob") for d in manifest.blob_refs] + [
        (repo_id, manifest.digest, d, "manifest") for d in manifest.child_refs
    ]
    for start in range(0, len(refs), _ROWS_PER_INSERT):
        batch = refs[start : start + _ROWS_PER_INSERT]
        yield Query(
            "INSERT INTO manifest_refs(repo_id, digest, child, kind) VALUES "
            + ",".join(["(?,?,?,?)"] * len(batch))
            + " ON CONFLICT DO NOTHING",
            [value for row in batch for value in row],
        )
    # A referrer's version from the peer that stored it first: observed by the clock, so
    # that a delete made here after it is later.
    carried = stored_version if replicated and referrer else None
    version = yield from stamp(
        dialect, repo_id, region, Stamp(carried, "") if carried is not None else given
    )
    refreshed = False
    if referrer:
        refreshed = yield from _stored_referrer(
            repo_id, manifest.digest, carried if carried is not None else version.version
        )
    applied: list[str] = []
    for tag in tags:
        if not local and not (
            yield from _replicated_wins(repo_id, tag, manifest.digest, version, tag in immutable)
        ):
            continue
        yield Query("DELETE FROM tombstones WHERE repo_id = ? AND name = ?", (repo_id, tag))
        yield Query(
            "INSERT INTO tags(repo_id, name, digest, updated, version, origin)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (repo_id, name) DO UPDATE SET"
            " digest = excluded.digest, updated = excluded.updated,"
            " version = excluded.version, origin = excluded.origin",
            (repo_id, tag, manifest.digest, now, version.version, version.origin),
        )
        applied.append(tag)
        if local:
            yield from changelog.record(
                consumers, repo, "tag", tag, manifest.digest, version, actor
            )
    # A referrer pushed again by digest is sent again: a region that deleted it before
    # takes it back (its stored version is now the later).
    if logged and not tags and (inserted.rowcount > 0 or refreshed):
        yield from changelog.record(
            consumers, repo, "manifest", None, manifest.digest, version, actor
        )
    if before is not None and quota is not None:
        # Counted by the triggers as the rows went in; refusing rolls all of it back.
        after = yield from index_usage.usage_of(repo_id)
        reason = quota.exceeded_by(before, after)
        if reason is not None:
            raise quotas.refused(reason, after, quota)
    return applied


def _refuse_immutable(repo_id: int, digest: str, immutable: Callable[[str], bool]) -> Tx[None]:
    """The manifest, and every index above it, must carry no immutable tag."""
    seen: set[str] = set()
    frontier = [digest]
    while frontier:
        here = frontier.pop()
        if here in seen:
            continue
        seen.add(here)
        tags = yield Query(
            "SELECT name FROM tags WHERE repo_id = ? AND digest = ?", (repo_id, here)
        )
        for (tag,) in tags.rows:
            if immutable(str(tag)):
                raise errors.RegistryError(
                    errors.TAG_IMMUTABLE, detail={"tag": str(tag), "digest": here}
                )
        parents = yield Query(
            "SELECT digest FROM manifest_refs"
            " WHERE repo_id = ? AND child = ? AND kind = 'manifest'",
            (repo_id, here),
        )
        frontier.extend(str(parent) for (parent,) in parents.rows)


def _release_blobs(repo_id: int, digest: str) -> Tx[None]:
    """Let the collector take a deleted manifest's blobs without waiting out the grace
    period: those last linked before the manifest was pushed. Only while the volume is
    full, when every push is refused: otherwise such a blob may be one a push in flight
    uploaded, whose manifest is still to come (found by review). One linked since keeps
    its grace. (Still-referenced blobs stay: the collector checks references itself.)"""
    yield Query(
        "UPDATE blobs SET created = 0 WHERE digest IN (SELECT child FROM manifest_refs"
        " WHERE repo_id = ? AND digest = ? AND kind = 'blob')"
        " AND created <= (SELECT created FROM manifests WHERE repo_id = ? AND digest = ?)",
        (repo_id, digest, repo_id, digest),
    )


def _listed_here(repo_id: int, digest: str) -> Tx[bool]:
    """Whether an index here lists ``digest``. The region that deleted it refuses to
    delete a manifest an index lists, so such an index is one it did not know of: pushed
    here meanwhile. The delete must not break it (its child's layers would go with the
    next collection); deleting that index lets the child go."""
    row = (
        yield Query(
            "SELECT 1 FROM manifest_refs WHERE repo_id = ? AND child = ? AND kind = 'manifest'"
            " LIMIT 1",
            (repo_id, digest),
        )
    ).first()
    return row is not None


def delete_manifest(
    dialect: Dialect,
    region: str,
    consumers: Sequence[str],
    repo: str,
    digest: str,
    given: Stamp | None,
    actor: str | None,
    immutable: Callable[[str], bool] | None,
    release: bool = False,
    tombstoned: list[str] | None = None,
) -> Tx[bool]:
    local = given is None
    removed = [] if tombstoned is None else tombstoned
    removed.clear()  # a transaction run again starts over
    repo_id = yield from repository(dialect, repo, create=False)
    if repo_id is None:
        return False
    if immutable is not None:
        yield from _refuse_immutable(repo_id, digest, immutable)
    exists = (
        yield Query(
            f"SELECT m.subject, {_STORED_VERSION} FROM manifests m"
            " WHERE m.repo_id = ? AND m.digest = ?",
            (repo_id, digest),
        )
    ).first()
    if exists is None:
        return False
    referrer = exists[0] is not None
    if local:  # in the transaction: an index pushed meanwhile counts
        listing = yield Query(
            "SELECT digest FROM manifest_refs"
            " WHERE repo_id = ? AND child = ? AND kind = 'manifest' LIMIT 1",
            (repo_id, digest),
        )
        index = listing.first()
        if index is not None:
            raise errors.RegistryError(
                errors.MANIFEST_LISTED, detail={"digest": digest, "index": str(index[0])}
            )
    version = yield from stamp(dialect, repo_id, region, given)
    tags = yield Query(
        "SELECT name, version, origin FROM tags WHERE repo_id = ? AND digest = ?",
        (repo_id, digest),
    )
    surviving = False
    for name, tag_version, tag_origin in tags.rows:
        if versions.wins(version, Stamp(int(tag_version), str(tag_origin))):
            yield from tombstone(repo_id, str(name), version)
            removed.append(str(name))
        else:
            surviving = True  # a newer tag elsewhere still wants this manifest
    if not local and not surviving:
        surviving = yield from _listed_here(repo_id, digest)
    if not local and referrer and int(exists[1]) > version.version:
        surviving = True  # a referrer stored (again) after the delete stands
    if surviving:
        return True
    if release:
        yield from _release_blobs(repo_id, digest)
    yield Query("DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, digest))
    yield Query("DELETE FROM manifest_refs WHERE repo_id = ? AND digest = ?", (repo_id, digest))
    if referrer:
        # A referrer has no tag to carry its delete: anti-entropy compares this instead.
        # It expires from the delete's own time, in every region alike.
        yield Query(
            "INSERT INTO referrer_tombstones(repo_id, digest, version, origin, deleted)"
            " VALUES (?,?,?,?,?) ON CONFLICT (repo_id, digest) DO UPDATE SET"
            " version = excluded.version, origin = excluded.origin, deleted = excluded.deleted",
            (
                repo_id,
                digest,
                version.version,
                version.origin,
                versions.physical_ms(version.version) / 1000,
            ),
        )
    if local:
        yield from changelog.record(
            consumers, repo, "delete_manifest", None, digest, version, actor
        )
    return True


def delete_tag(
    dialect: Dialect,
    region: str,
    consumers: Sequence[str],
    repo: str,
    tag: str,
    given: Stamp | None,
    actor: str | None,
    immutable: bool = False,
) -> Tx[bool]:
    local = given is None
    repo_id = yield from repository(dialect, repo, create=not local)
    if repo_id is None:
        return False
    found = yield Query("SELECT digest FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag))
    row = found.first()
    if local and row is None:
        return False
    if local and immutable and row is not None:  # decided here: a racing push of it wins
        raise errors.RegistryError(errors.TAG_IMMUTABLE, detail={"tag": tag, "digest": row[0]})
    exists = row is not None
    version = yield from stamp(dialect, repo_id, region, given)
    if not local and not versions.wins(version, (yield from current(repo_id, tag))):
        return exists
    yield from tombstone(repo_id, tag, version)
    if local:
        yield from changelog.record(consumers, repo, "delete_tag", tag, None, version, actor)
    return True


def expire_tag(
    dialect: Dialect, consumers: Sequence[str], repo: str, tag: str, version: int
) -> Tx[bool]:
    repo_id = yield from repository(dialect, repo, create=False)
    if repo_id is None:
        return False
    row = (
        yield Query(
            "SELECT version, origin FROM tags WHERE repo_id = ? AND name = ?", (repo_id, tag)
        )
    ).first()
    if row is None or int(row[0]) != version:
        return False  # pushed again (or deleted) since it was chosen: keep it
    own = Stamp(int(row[0]), str(row[1]))
    yield from tombstone(repo_id, tag, own, deleted=time.time())
    yield from changelog.record(consumers, repo, "expire_tag", tag, None, own, RETENTION_ACTOR)
    return True


# When something last held a manifest: its push, or the last tag, index or subject that
# let go of it (``released``, stamped by triggers; the migration that added it stamped
# every existing row, so it may be older than the push: the later counts).
def _held_at(alias: str) -> str:
    return (
        f"CASE WHEN {alias}.released > {alias}.created"
        f" THEN {alias}.released ELSE {alias}.created END"
    )


# What holds a manifest: a tag, an index listing it. With ``_HELD_SINCE``, also having
# been held (or pushed) after a time, and referring to a manifest still present.
_HELD = (
    "SELECT 1 FROM tags WHERE repo_id = ? AND digest = ?"
    " UNION ALL SELECT 1 FROM manifest_refs"
    " WHERE repo_id = ? AND child = ? AND kind = 'manifest'"
)
_HELD_SINCE = (
    " UNION ALL SELECT 1 FROM manifests m WHERE m.repo_id = ? AND m.digest = ?"
    f" AND ({_held_at('m')} >= ? OR EXISTS (SELECT 1 FROM manifests s"
    " WHERE s.repo_id = m.repo_id AND s.digest = m.subject))"
)


def untagged_manifests(repo: str, older_than: float) -> Tx[list[str]]:
    """Manifests of ``repo`` that nothing has held since ``older_than``: no tag points at
    them, no index lists them, none refers (as a subject) to a manifest present, and none
    was pushed, or lost its last tag, index or subject after that time."""
    result = yield Query(
        "SELECT m.digest FROM manifests m JOIN repositories r ON r.id = m.repo_id"
        f" WHERE r.name = ? AND {_held_at('m')} < ?"
        " AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = m.repo_id"
        " AND t.digest = m.digest)"
        " AND NOT EXISTS (SELECT 1 FROM manifest_refs f WHERE f.repo_id = m.repo_id"
        " AND f.child = m.digest AND f.kind = 'manifest')"
        " AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repo_id = m.repo_id"
        " AND s.digest = m.subject)"
        " ORDER BY m.digest",
        (repo, older_than),
    )
    return [str(row[0]) for row in result.rows]


def delete_untagged_manifest(
    dialect: Dialect,
    region: str,
    consumers: Sequence[str],
    repo: str,
    digest: str,
    held_since: float | None = None,
) -> Tx[list[str]]:
    repo_id = yield from repository(dialect, repo, create=False)
    if repo_id is None:
        return []
    deleted: list[str] = []
    pending = [digest]
    while pending:
        here = pending.pop()
        # Checked again in this transaction: held since the caller looked (a push of it
        # again, a tag), it stays.
        since = held_since is not None and here == digest
        held = yield Query(
            _HELD + (_HELD_SINCE if since else "") + " LIMIT 1",
            (repo_id, here, repo_id, here) + ((repo_id, here, held_since) if since else ()),
        )
        if held.first() is not None:
            continue
        # With their ages as they are before this index lets go of them.
        children = yield Query(
            f"SELECT f.child, {_held_at('m')} FROM manifest_refs f"
            " LEFT JOIN manifests m ON m.repo_id = f.repo_id AND m.digest = f.child"
            " WHERE f.repo_id = ? AND f.digest = ? AND f.kind = 'manifest'",
            (repo_id, here),
        )
        gone = yield Query(
            "DELETE FROM manifests WHERE repo_id = ? AND digest = ?", (repo_id, here)
        )
        if not gone.rowcount:
            continue
        yield Query("DELETE FROM manifest_refs WHERE repo_id = ? AND digest = ?", (repo_id, here))
        version = yield from stamp(dialect, repo_id, region, None)
        yield from changelog.record(
            consumers, repo, "expire_manifest", None, here, version, RETENTION_ACTOR
        )
        deleted.append(here)
        # An index's platforms go with it, but for one pushed again since (a new index
        # listing it on its way; without an age limit, any).
        pending.extend(
            str(child)
            for child, held_at in children.rows
            if held_since is None or held_at is None or held_at < held_since
        )
    return deleted


def expire_tombstones(older_than: float) -> Tx[int]:
    tags = yield Query("DELETE FROM tombstones WHERE deleted < ?", (older_than,))
    referrers = yield Query("DELETE FROM referrer_tombstones WHERE deleted < ?", (older_than,))
    return tags.rowcount + referrers.rowcount


def _referrer_deleted(repo_id: int, digest: str) -> Tx[int | None]:
    """The version of the referrer's delete by digest (None: not deleted)."""
    row = (
        yield Query(
            "SELECT version FROM referrer_tombstones WHERE repo_id = ? AND digest = ?",
            (repo_id, digest),
        )
    ).first()
    return None if row is None else int(row[0])


def _stored_referrer(repo_id: int, digest: str, version: int) -> Tx[bool]:
    """A referrer stored (again) at ``version``: its stored version moves up to it and
    a delete of it is forgotten. True when it moved."""
    moved = yield Query(
        "UPDATE manifests SET stored_version = ? WHERE repo_id = ? AND digest = ?"
        " AND (stored_version IS NULL OR stored_version < ?)",
        (version, repo_id, digest, version),
    )
    yield Query(
        "DELETE FROM referrer_tombstones WHERE repo_id = ? AND digest = ? AND version <= ?",
        (repo_id, digest, version),
    )
    return bool(moved.rowcount)


# A referrer's stored version, for one stored before it was kept: its creation time.
_STORED_VERSION = "COALESCE(m.stored_version, CAST(m.created * 1000 AS BIGINT) * 65536)"


# -- reads -----------------------------------------------------------------------------


def get_manifest(repo: str, digest: str, content: bool) -> Tx[ManifestRecord | None]:
    column = "m.content" if content else "NULL"
    row = (
        yield Query(
            f"SELECT m.digest, m.media_type, m.size, {column}, m.artifact_type, m.subject,"
            f" m.annotations, {_STORED_VERSION} FROM manifests m"
            " JOIN repositories r ON r.id = m.repo_id"
            " WHERE r.name = ? AND m.digest = ?",
            (repo, digest),
        )
    ).first()
    return ManifestRecord(*row) if row else None


def resolve_tag(repo: str, tag: str) -> Tx[str | None]:
    row = (
        yield Query(
            "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id"
            " WHERE r.name = ? AND t.name = ?",
            (repo, tag),
        )
    ).first()
    return str(row[0]) if row else None


def list_tags(dialect: Dialect, repo: str, n: int | None, last: str | None) -> Tx[list[str] | None]:
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return None
    rows = yield Query(
        "SELECT name FROM tags WHERE repo_id = ? AND name > ? ORDER BY name LIMIT ?",
        (repo_id, last or "", dialect.limit(n)),
    )
    return [str(r[0]) for r in rows.rows]


def tag_details(
    dialect: Dialect, repo: str, n: int | None, last: str | None
) -> Tx[list[TagDetail] | None]:
    """Tags in lexical order after ``last`` with their digest and push time."""
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return None
    rows = yield Query(
        "SELECT name, digest, updated FROM tags WHERE repo_id = ? AND name > ?"
        " ORDER BY name LIMIT ?",
        (repo_id, last or "", dialect.limit(n)),
    )
    return [TagDetail(str(r[0]), str(r[1]), float(r[2])) for r in rows.rows]


def list_repositories(dialect: Dialect, n: int | None, last: str | None) -> Tx[list[str]]:
    rows = yield Query(
        "SELECT name FROM repositories WHERE name > ? ORDER BY name LIMIT ?",
        (last or "", dialect.limit(n)),
    )
    return [str(r[0]) for r in rows.rows]


def referrers(repo: str, subject: str) -> Tx[list[ManifestRecord]]:
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return []
    rows = yield Query(
        "SELECT digest, media_type, size, NULL, artifact_type, subject, annotations"
        " FROM manifests WHERE repo_id = ? AND subject = ? ORDER BY digest",
        (repo_id, subject),
    )
    return [ManifestRecord(*r) for r in rows.rows]


def missing(table: str, repo: str, digests: Sequence[str]) -> Tx[list[str]]:
    """The digests with no row in ``table`` (manifests or blob_links) for ``repo``."""
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return list(digests)
    query = f"SELECT 1 FROM {table} WHERE repo_id = ? AND digest = ?"
    absent: list[str] = []
    for digest in digests:
        if (yield Query(query, (repo_id, digest))).first() is None:
            absent.append(digest)
    return absent


# Tag states (tombstones included) and referrer digests: what anti-entropy compares.
TAG_STATES = (
    "SELECT name, digest, version, origin FROM tags WHERE repo_id = ?"
    " UNION ALL SELECT name, NULL, version, origin FROM tombstones WHERE repo_id = ?"
    " ORDER BY 1"
)
_REFERRERS = (
    "SELECT digest FROM manifests WHERE repo_id = ? AND subject IS NOT NULL ORDER BY digest"
)


def repository_hash(repo: str) -> Tx[str | None]:
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return None
    h = hashlib.sha256()
    # The same text from every backend (ints, strings, None), so regions compare equal.
    for row in (yield Query(TAG_STATES, (repo_id, repo_id))).rows:
        h.update(repr(tuple(row)).encode())
    for (digest,) in (yield Query(_REFERRERS, (repo_id,))).rows:
        h.update(str(digest).encode())
    return h.hexdigest()


def tag_states(repo: str) -> Tx[list[TagState]]:
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return []
    rows = yield Query(TAG_STATES, (repo_id, repo_id))
    return [TagState(str(n), d, int(v), str(o)) for n, d, v, o in rows.rows]


def tag_stamps(repo: str, names: Sequence[str]) -> Tx[list[TagState]]:
    """The state of some tags (a tombstone for a deleted one), for the tag record."""
    repo_id = yield from repository_id(repo)
    if repo_id is None or not names:
        return []
    marks = in_marks(len(names))
    rows = yield Query(
        f"SELECT name, digest, version, origin FROM tags WHERE repo_id = ? AND name IN ({marks})"
        " UNION ALL SELECT name, NULL, version, origin FROM tombstones"
        f" WHERE repo_id = ? AND name IN ({marks})",
        (repo_id, *names, repo_id, *names),
    )
    return [TagState(str(n), d, int(v), str(o)) for n, d, v, o in rows.rows]


def referrer_digests(repo: str) -> Tx[list[str]]:
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return []
    return [str(r[0]) for r in (yield Query(_REFERRERS, (repo_id,))).rows]


def referrer_states(repo: str) -> Tx[list[ReferrerState]]:
    """The repository's referrers (when stored here) and deleted referrers (the delete's
    stamp): what anti-entropy compares beyond tags."""
    repo_id = yield from repository_id(repo)
    if repo_id is None:
        return []
    rows = yield Query(
        f"SELECT m.digest, {_STORED_VERSION}, NULL, NULL FROM manifests m"
        " WHERE m.repo_id = ? AND m.subject IS NOT NULL"
        " UNION ALL SELECT digest, NULL, version, origin FROM referrer_tombstones"
        " WHERE repo_id = ? ORDER BY 1",
        (repo_id, repo_id),
    )
    return [
        ReferrerState(
            str(d),
            None if s is None else int(s),
            None if v is None else Stamp(int(v), str(o)),
        )
        for d, s, v, o in rows.rows
    ]
