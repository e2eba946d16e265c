"""``berth-registry check | rebuild | backup``: the SQLite index's recovery and backups.

- ``check``: SQLite's integrity check, then every manifest's blobs and child manifests
  present (blob files with their recorded size), every tag's manifest present, each
  repository's kept usage equal to a recount, and the tag record (``storage.records``)
  agreeing with the index. Exit status 1 on a problem.
- ``rebuild`` (server stopped): a new index from what is stored: blob records from the
  blob tree; repositories, manifests, references, links and referrers from the manifests
  in the tag record; tags (and tombstones) from it, by version. The old index is kept
  beside it as ``index.db.before-rebuild-<time>``.
- ``backup DEST`` (server running): SQLite's online backup API copies a consistent
  snapshot of the index, then the blobs it records and the tag record are copied. The
  collector skips its rounds meanwhile (a marker per backup in ``backups-running/``,
  refreshed every minute), so no blob the snapshot references is deleted before it is
  copied. The backup's tag record is written from the snapshot (compacted), so the two
  agree, and its change log gets an id of its own: restored, its events are not taken
  for ones the receivers already had.

All three are blocking programs, run outside the server's event loop.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import secrets
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from registry_server import config as config_mod
from registry_server.protocol import digests, manifests
from registry_server.storage import index_blobs, index_tags, index_usage
from registry_server.storage.blobstore import (
    BACKUP_MARKERS,
    BACKUP_REFRESH_SECONDS,
    blob_path,
)
from registry_server.storage.driver import StorageFull
from registry_server.storage.index import NewManifest
from registry_server.storage.records import RECORDS_DIR, RecordedManifest, TagRecord
from registry_server.storage.space import is_full_error
from registry_server.storage.sqlite_index import DIALECT, SqliteIndex
from registry_server.storage.sqltx import run_sync

INDEX = "index.db"


def _stored_blobs(root: Path) -> Iterator[tuple[str, int]]:
    base = root / "blobs"
    if not base.is_dir():
        return
    for algorithm in sorted(base.iterdir()):
        for prefix in sorted(algorithm.iterdir()):
            for entry in sorted(prefix.iterdir()):
                text = f"{algorithm.name}:{entry.name}"
                data = entry / "data"
                if digests.is_digest(text) and data.is_file():
                    yield text, data.stat().st_size


def _blob_file(root: Path, digest: str) -> Path:
    return root / blob_path(digests.parse(digest))


# -- check ----------------------------------------------------------------------------------


def check(root: Path, cached: Callable[[str], bool] = lambda _repo: False) -> list[str]:
    """Problems found (``cached``: the pull-through cache's repositories, which keep
    no tag record: the upstream is their copy)."""
    return [problem for found in _check(root, cached).values() for problem in found]


def _check(root: Path, cached: Callable[[str], bool]) -> dict[str, list[str]]:
    """Problems by repository ("" for the index's own)."""
    problems = _index_problems(root)
    if not _readable(root):
        return {"": problems}
    conn = sqlite3.connect(f"file:{root / INDEX}?mode=ro", uri=True)
    try:
        return {"": problems, **_record_problems(conn, TagRecord(root), cached)}
    finally:
        conn.close()


def _readable(root: Path) -> bool:
    """Whether the index opens and passes SQLite's own check."""
    path = root / INDEX
    if not path.exists():
        return False
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check")] == ["ok"]
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def _record_problems(
    conn: sqlite3.Connection, record: TagRecord, cached: Callable[[str], bool]
) -> dict[str, list[str]]:
    """Each repository's tag record against the index: one the index has (with a
    manifest) and no record has is lost to a rebuild as much as a tag that differs."""
    found: dict[str, list[str]] = {}
    recorded_repos = set(record.repositories())
    indexed_repos = {
        str(name)
        for (name,) in conn.execute(
            "SELECT name FROM repositories r WHERE EXISTS"
            " (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)"
        )
    }
    for repo in sorted(recorded_repos | indexed_repos):
        if repo not in recorded_repos:
            if not cached(repo):
                found[repo] = [f"{repo}: in the index, but has no tag record"]
            continue
        recorded = record.replay(repo).live_tags()
        indexed = dict(
            conn.execute(
                "SELECT t.name, t.digest FROM tags t JOIN repositories r"
                " ON r.id = t.repo_id WHERE r.name = ?",
                (repo,),
            ).fetchall()
        )
        for tag in sorted(set(recorded) | set(indexed)):
            if recorded.get(tag) != indexed.get(tag):
                found.setdefault(repo, []).append(
                    f"{repo}:{tag}: index says {indexed.get(tag)}, record {recorded.get(tag)}"
                )
    return found


def repair_records(
    root: Path, cached: Callable[[str], bool] = lambda _repo: False, force: bool = False
) -> list[str]:
    """Write again, from the index, the tag record of every repository whose record
    disagrees with it or that has none (server stopped: a file is replaced whole, and a
    server appending meanwhile would lose its line). Returns the repositories.

    Only records behind the index: a line is written after its commit, so a record
    ahead of the index (a tag at a later version, a repository the index does not know,
    a version past the index's clock) says the index is the older one (lost and made
    anew, restored from an old backup), and writing the records from it would destroy
    what a rebuild needs: refused, unless ``force`` (a delete the record missed more
    than ``tombstone_ttl_seconds`` ago, whose tombstone the index no longer keeps)."""
    target = root / INDEX
    if not _readable(root):
        raise ValueError(f"{target} is damaged: rebuild it from the records instead")
    with _closed_out(target) as conn:
        record = TagRecord(root)
        behind = [repo for repo in _record_problems(conn, record, cached) if repo]
        ahead = [] if force else _records_ahead(conn, record, behind)
        if ahead:
            raise ValueError(
                f"the tag records are ahead of {target} ({'; '.join(ahead[:5])}): the index"
                " is older than they are; rebuild it from the records instead (or, if"
                " the index is right, --force)"
            )
        for repo in behind:
            _export_record(conn, record, repo)
    return behind


def _records_ahead(conn: sqlite3.Connection, record: TagRecord, repos: list[str]) -> list[str]:
    """What the records of ``repos`` hold that the index has not seen."""
    row = conn.execute("SELECT last FROM clock WHERE id = 0").fetchone()
    clock = int(row[0]) if row else 0
    found: list[str] = []
    for repo in repos:
        if not record.path(repo).exists():
            continue
        known = conn.execute("SELECT id FROM repositories WHERE name = ?", (repo,)).fetchone()
        if known is None:
            found.append(f"{repo}: not in the index")
            continue
        states = {
            str(name): int(version)
            for name, _, version, _ in conn.execute(index_tags.TAG_STATES, (known[0], known[0]))
        }
        for tag in record.replay(repo).tags.values():
            seen = states.get(tag.name)
            if tag.version > clock or (seen is not None and tag.version > seen):
                found.append(f"{repo}:{tag.name}: recorded at a version the index has not seen")
            elif seen is None and tag.digest is not None:
                # Neither the tag nor its delete: pushed after the index was copied.
                found.append(f"{repo}:{tag.name}: recorded, and unknown to the index")
    return found


def backfill_records(root: Path) -> int:
    """At start-up, before any process serves: an index from before the tag record
    existed (a record directory never made) gets its records written from it; a rebuild
    had nothing to go on for those repositories. Returns how many were written."""
    record = TagRecord(root)
    if record.dir.exists() or not (root / INDEX).exists():
        return 0
    conn = sqlite3.connect(root / INDEX)
    try:
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        if "manifests" not in tables:
            return 0
        repos = [
            str(name)
            for (name,) in conn.execute(
                "SELECT name FROM repositories r WHERE EXISTS"
                " (SELECT 1 FROM manifests m WHERE m.repo_id = r.id) ORDER BY name"
            )
        ]
        # Staged, and resumed after a kill (a large index takes a while: a start-up
        # probe may kill the first start): a record written whole is kept.
        partial = record.dir.with_name(record.dir.name + ".partial")
        staged = TagRecord(root)
        staged.dir = partial
        for repo in repos:
            done = staged.path(repo)
            if done.is_file() and done.read_bytes().endswith(b"\n"):
                continue
            _export_record(conn, staged, repo, durable=False)
        partial.mkdir(exist_ok=True)
        os.sync()  # every record at once
        os.replace(partial, record.dir)  # whole, or not at all
    finally:
        conn.close()
    return len(repos)


def _index_problems(root: Path) -> list[str]:
    path = root / INDEX
    if not path.exists():
        return [f"{path}: no index"]
    problems: list[str] = []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        try:
            result = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:
            return [f"{path}: not a readable SQLite database ({exc})"]
        if result != ["ok"]:
            return [f"integrity: {line}" for line in result[:50]]
        problems += [f"foreign key: {row}" for row in conn.execute("PRAGMA foreign_key_check")]
        sizes = dict(conn.execute("SELECT digest, size FROM blobs").fetchall())
        for repo, digest, child in conn.execute(
            "SELECT r.name, m.digest, m.child FROM manifest_refs m"
            " JOIN repositories r ON r.id = m.repo_id WHERE m.kind = 'blob'"
        ):
            if child not in sizes:
                problems.append(f"{repo}@{digest}: blob {child} has no record")
                continue
            file = _blob_file(root, child)
            if not file.is_file():
                problems.append(f"{repo}@{digest}: blob {child} missing from storage")
            elif file.stat().st_size != sizes[child]:
                problems.append(f"{repo}@{digest}: blob {child} has the wrong size")
        for repo, digest, child in conn.execute(
            "SELECT r.name, m.digest, m.child FROM manifest_refs m"
            " JOIN repositories r ON r.id = m.repo_id WHERE m.kind = 'manifest' AND NOT EXISTS"
            " (SELECT 1 FROM manifests c WHERE c.repo_id = m.repo_id AND c.digest = m.child)"
        ):
            problems.append(f"{repo}@{digest}: child manifest {child} missing")
        for repo, tag, digest in conn.execute(
            "SELECT r.name, t.name, t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id"
            " WHERE NOT EXISTS (SELECT 1 FROM manifests m"
            " WHERE m.repo_id = t.repo_id AND m.digest = t.digest)"
        ):
            problems.append(f"{repo}:{tag}: manifest {digest} missing")
        problems += _usage_problems(conn)
    finally:
        conn.close()
    return problems


def _usage_problems(conn: sqlite3.Connection) -> list[str]:
    """Each repository's kept usage against a recount from its manifests and tags."""
    if "stored_bytes" not in {r[1] for r in conn.execute("PRAGMA table_info(repositories)")}:
        return []  # not yet opened by a server that keeps usage: it counts at start
    problems = []
    for (repo,) in conn.execute("SELECT name FROM repositories ORDER BY name").fetchall():
        kept = run_sync(conn, index_usage.usage(repo))
        counted = run_sync(conn, index_usage.recount(repo))
        if kept != counted:
            problems.append(f"{repo}: usage kept as {kept}, recounted {counted}")
    return problems


# -- rebuild --------------------------------------------------------------------------------


def _new_manifest(recorded: RecordedManifest) -> tuple[NewManifest, list[str]]:
    parsed = manifests.parse(recorded.content, recorded.media_type)
    manifest = NewManifest(
        digest=recorded.digest,
        media_type=parsed.media_type,
        content=recorded.content,
        artifact_type=parsed.artifact_type,
        subject=str(parsed.subject.digest) if parsed.subject else None,
        annotations=json.dumps(parsed.annotations) if parsed.annotations else None,
        blob_refs=[str(d.digest) for d in parsed.blobs],
        child_refs=[str(d.digest) for d in parsed.children],
    )
    return manifest, [str(d.digest) for d in parsed.children]


class ServerRunning(Exception):
    """The index is open in a running server: it must be stopped first."""


@contextlib.contextmanager
def _closed_out(target: Path) -> Iterator[sqlite3.Connection]:
    """The index to itself until the block ends: out of write-ahead mode, which folds
    its log into the file and which SQLite refuses while another connection has it open
    (a running server), then locked exclusively, so that a server starting meanwhile
    cannot open it and write where the command does not look."""
    running = ServerRunning(f"{target} is open in a running server: stop it first")
    conn = sqlite3.connect(target, timeout=1.0, isolation_level=None)
    try:
        try:
            mode = str(conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0])
            if mode.lower() == "wal":
                raise running
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise running from None
            raise
        yield conn
    finally:
        conn.close()


def rebuild(root: Path) -> dict[str, float]:
    """Rebuild ``root/index.db``; returns counts and the time taken."""
    start = time.monotonic()
    target = root / INDEX
    with contextlib.ExitStack() as held:
        # One too damaged to open is kept as it is, with its log moved beside it.
        with contextlib.suppress(sqlite3.DatabaseError):
            if target.exists():
                held.enter_context(_closed_out(target))
        return _rebuild(root, start)


def _rebuild(root: Path, start: float) -> dict[str, float]:
    target = root / INDEX
    fresh = root / f"{INDEX}.rebuild"
    for leftover in (fresh, Path(f"{fresh}-wal"), Path(f"{fresh}-shm")):
        leftover.unlink(missing_ok=True)
    built = SqliteIndex(fresh)
    conn = built._writer.conn
    now = time.time()
    counts: dict[str, float] = dict.fromkeys(
        ("blobs", "repositories", "manifests", "tags", "missing_blobs"), 0
    )
    record = TagRecord(root)
    conn.execute("BEGIN IMMEDIATE")
    try:
        sizes = dict(_stored_blobs(root))
        conn.executemany(
            "INSERT INTO blobs(digest, size, created) VALUES (?,?,?)",
            ((d, s, now) for d, s in sizes.items()),
        )
        counts["blobs"] = len(sizes)
        newest = 0
        for repo in record.repositories():
            state = record.replay(repo)
            counts["repositories"] += 1
            pending = {d: _new_manifest(m) for d, m in state.manifests.items()}
            while pending:  # an index after the manifests it lists
                ready = [d for d, (_, kids) in pending.items() if not set(kids) & set(pending)]
                for digest in ready or list(pending):
                    manifest, _ = pending.pop(digest)
                    for blob in dict.fromkeys(manifest.blob_refs):
                        if blob in sizes:
                            run_sync(conn, index_blobs.link(DIALECT, repo, blob, sizes[blob]))
                        else:
                            counts["missing_blobs"] += 1
                    run_sync(
                        conn,
                        index_tags.put_manifest(
                            DIALECT, "", (), repo, manifest, [], None, (), (), (), None
                        ),
                    )
                    counts["manifests"] += 1
            repo_id = run_sync(conn, index_tags.repository(DIALECT, repo, create=True))
            assert repo_id is not None
            for tag in state.tags.values():
                newest = max(newest, tag.version)
                if tag.digest is None:
                    conn.execute(
                        "INSERT INTO tombstones(repo_id, name, version, origin, deleted)"
                        " VALUES (?,?,?,?,?)",
                        (repo_id, tag.name, tag.version, tag.origin, now),
                    )
                elif tag.digest in state.manifests:
                    conn.execute(
                        "INSERT INTO tags(repo_id, name, digest, updated, version, origin)"
                        " VALUES (?,?,?,?,?,?)",
                        (repo_id, tag.name, tag.digest, now, tag.version, tag.origin),
                    )
                    counts["tags"] += 1
        # When a referrer was first stored is not recorded: as old as can be, so that a
        # delete of it another region remembers wins (a copy stamped now brought it
        # back everywhere), and one nobody deleted stays.
        conn.execute("UPDATE manifests SET stored_version = 0 WHERE subject IS NOT NULL")
        # New pushes must win over every recorded version (last writer wins).
        conn.execute("UPDATE clock SET last = max(last, ?)", (newest,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        built._writer.close()
        built._reader.close()
    kept = root / f"{INDEX}.before-rebuild-{int(now)}"
    # Its log goes with it (committed transactions a crash left there, not yet in the
    # file): the kept copy opens with them.
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{target}{suffix}").exists():
            os.replace(f"{target}{suffix}", f"{kept}{suffix}")
    os.replace(fresh, target)
    counts["seconds"] = time.monotonic() - start
    return counts


# -- backup ---------------------------------------------------------------------------------


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)  # made durable all at once (backup's sync)
    os.replace(partial, target)


def _export_records(index: Path, record: TagRecord) -> None:
    """The tag record of exactly the snapshot (the live one may be ahead of it already),
    compacted: one line per manifest and per tag; flushed by the caller."""
    shutil.rmtree(record.dir, ignore_errors=True)
    record.dir.mkdir(parents=True)
    conn = sqlite3.connect(index)
    try:
        for (repo,) in conn.execute("SELECT name FROM repositories").fetchall():
            _export_record(conn, record, str(repo), durable=False)
    finally:
        conn.close()


def _export_record(
    conn: sqlite3.Connection, record: TagRecord, repo: str, durable: bool = True
) -> None:
    """Write ``repo``'s record from the index, compacted: one line per manifest and per
    tag (tombstones included). Replaces the file whole."""
    row = conn.execute("SELECT id FROM repositories WHERE name = ?", (repo,)).fetchone()
    lines: list[dict[str, object]] = []
    if row is not None:
        repo_id = row[0]
        for digest, media_type, content in conn.execute(
            "SELECT digest, media_type, content FROM manifests WHERE repo_id = ?", (repo_id,)
        ):
            lines.append(
                {
                    "op": "manifest",
                    "digest": digest,
                    "media_type": media_type,
                    "content": base64.b64encode(content).decode(),
                }
            )
        for name, digest, version, origin in conn.execute(
            index_tags.TAG_STATES, (repo_id, repo_id)
        ):
            lines.append(
                {"op": "tag", "tag": name, "digest": digest, "version": version, "origin": origin}
            )
    record.dir.mkdir(parents=True, exist_ok=True)
    record.rewrite_blocking(repo, lines, durable)


def _link_or_copy(source: Path, target: Path, old: Path | None, size: int) -> bool:
    """Hard-link the blob from the previous snapshot (`old`) when it has it whole (blobs
    never change: snapshots share their files); otherwise copy it. True when copied."""
    if old is not None and old.is_file() and old.stat().st_size == size:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(old, target)
            return False
        except OSError:
            pass  # another filesystem, or no links there: copy instead
    _copy(source, target)
    return True


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark(marker: Path) -> None:
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(str(time.time()))
    os.replace(partial, marker)  # whole: a half-written time would read as no backup


@contextlib.contextmanager
def _announced(root: Path) -> Iterator[None]:
    """Tell the collector a backup runs, for as long as it does: a marker of its own
    (backups running at once do not end each other's), refreshed every minute (a long
    first copy of terabytes is not taken for one that died)."""
    directory = root / BACKUP_MARKERS
    directory.mkdir(exist_ok=True)
    marker = directory / secrets.token_hex(8)
    _mark(marker)
    done = threading.Event()

    def refresh() -> None:
        while not done.wait(BACKUP_REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                _mark(marker)

    thread = threading.Thread(target=refresh, name="backup-marker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        marker.unlink(missing_ok=True)


def backup(root: Path, dest: Path, previous: Path | None = None) -> dict[str, float]:
    """An online backup of ``root`` into ``dest`` (incremental for blobs already there;
    blobs of ``previous``, an older complete snapshot, are hard-linked, not copied).
    Raises BackupVolumeFull when what it writes there does not fit."""
    start = time.monotonic()
    with _announced(root):  # its marker is the registry volume's: not wrapped below
        try:
            return _back_up(root, dest, previous, start)
        except BaseException as exc:
            if is_full(exc):
                raise BackupVolumeFull(errno.ENOSPC, f"{dest}: {exc}") from exc
            raise


class BackupVolumeFull(OSError):
    """The backup's destination ran out of space (or quota)."""


def is_full(exc: BaseException) -> bool:
    """A failure for want of space, however it was told: an errno (a copy's own may name
    the source file, or none), SQLite's words, the tag record's StorageFull."""
    return (
        is_full_error(exc)
        or isinstance(exc, StorageFull)
        or (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc))
    )


def _back_up(root: Path, dest: Path, previous: Path | None, start: float) -> dict[str, float]:
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / f"{INDEX}.partial"
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(root / INDEX)
    target = sqlite3.connect(partial)
    try:
        source.backup(target)  # one step: a consistent snapshot of the whole index
    finally:
        target.close()
        source.close()
    snapshot = time.monotonic() - start
    conn = sqlite3.connect(partial)
    try:
        recorded = conn.execute("SELECT digest, size FROM blobs").fetchall()
        # A log of its own: restored, the changes made after it get event ids that
        # the receivers have not seen for changes made here after the snapshot.
        conn.execute("UPDATE meta SET value = ? WHERE key = 'instance'", (uuid.uuid4().hex,))
        conn.commit()
    finally:
        conn.close()
    copied = linked = missing = 0
    for digest, size in recorded:
        source_file, target_file = _blob_file(root, digest), _blob_file(dest, digest)
        if target_file.is_file() and target_file.stat().st_size == size:
            continue
        if source_file.is_file():
            old = _blob_file(previous, digest) if previous is not None else None
            if _link_or_copy(source_file, target_file, old, size):
                copied += 1
            else:
                linked += 1
        else:  # recorded without bytes: what `check` reports of the registry itself
            missing += 1
    # A destination used before keeps its complete backup until this one is: the
    # blobs added do not change it, and its records are replaced after its index.
    staged = TagRecord(dest)
    staged.dir = dest / f"{RECORDS_DIR}.partial"
    _export_records(partial, staged)
    os.sync()  # one flush for every copied file, before the index names them
    os.replace(partial, dest / INDEX)
    replaced = dest / f"{RECORDS_DIR}.replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    if (dest / RECORDS_DIR).exists():
        os.replace(dest / RECORDS_DIR, replaced)
    os.replace(staged.dir, dest / RECORDS_DIR)
    _sync_directory(dest)
    shutil.rmtree(replaced, ignore_errors=True)
    return {
        "blobs": len(recorded),
        "copied": copied,
        "linked": linked,
        "missing": missing,
        "snapshot_seconds": snapshot,
        "seconds": time.monotonic() - start,
    }


# -- the command line -----------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="berth-registry", description=__doc__)
    parser.add_argument("command", choices=["check", "rebuild", "backup"])
    parser.add_argument("dest", nargs="?", type=Path, help="backup: the directory to write")
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="check: write again from the index the tag records that disagree with it"
        " or are missing (server stopped)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="check --repair: even records the index has not seen (docs/operations.md)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"berth-registry: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if cfg.metadata.driver != "sqlite" or cfg.storage.driver != "filesystem":
        print(
            "berth-registry: check/rebuild/backup cover the SQLite index with filesystem blobs;"
            " with PostgreSQL use its own tools (pg_dump, PITR): docs/operations.md",
            file=sys.stderr,
        )
        return 2
    root = cfg.storage.root
    prefixes = tuple(f"{upstream.prefix}/" for upstream in cfg.upstreams)

    def cached(repo: str) -> bool:
        return repo.startswith(prefixes)

    if args.force and not args.repair:
        parser.error("--force goes with check --repair")
    if args.command == "check":
        if args.repair:
            try:
                repaired = repair_records(root, cached, args.force)
            except (ServerRunning, ValueError) as exc:
                print(f"berth-registry: {exc}", file=sys.stderr)
                return 1
            for repo in repaired:
                print(f"{repo}: tag record written again from the index")
        problems = check(root, cached)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) in {root / INDEX}")
        return 1 if problems else 0
    if args.command == "rebuild":
        try:
            print(json.dumps(rebuild(root)))
        except ServerRunning as exc:
            print(f"berth-registry: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.dest is None:
        parser.error("backup needs a destination directory")
    print(json.dumps(backup(root, args.dest)))
    return 0
