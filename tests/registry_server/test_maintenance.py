"""The maintenance commands (registry_server/maintenance.py) against what a crash or a
careless order of steps leaves: an index still open in a server, a write-ahead log."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from registry_server import maintenance, scheduled_backup
from registry_server.config import BackupConfig
from registry_server.storage.blobstore import BACKUP_MARKERS, BACKUP_STALE_SECONDS, BlobStore
from registry_server.storage.filesystem import FilesystemDriver
from registry_server.storage.sqlite_index import SqliteIndex


def test_rebuild_refuses_an_index_a_running_server_has_open(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    try:
        with pytest.raises(maintenance.ServerRunning):
            maintenance.rebuild(tmp_path)
        assert (tmp_path / "index.db").exists()  # untouched
        assert not list(tmp_path.glob("index.db.before-rebuild-*"))
    finally:
        index._writer.close()
        index._reader.close()
    assert maintenance.main(["rebuild", "--config", str(_config(tmp_path))]) == 0


def test_rebuild_keeps_what_the_old_index_had_only_in_its_log(tmp_path: Path) -> None:
    """A killed server leaves committed transactions in index.db-wal; the rebuild
    deleted that log and kept the file without them (found by review)."""
    live = tmp_path / "live"
    live.mkdir()
    conn = sqlite3.connect(live / "index.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE facts(x)")
    conn.execute("INSERT INTO facts VALUES ('only in the log')")
    conn.commit()
    crashed = tmp_path / "crashed"  # the files as a SIGKILL leaves them
    crashed.mkdir()
    for name in ("index.db", "index.db-wal"):
        shutil.copyfile(live / name, crashed / name)
    conn.close()

    maintenance.rebuild(crashed)
    (kept,) = crashed.glob("index.db.before-rebuild-*[0-9]")
    assert not (crashed / "index.db-wal").exists()
    old = sqlite3.connect(kept)
    try:
        assert old.execute("SELECT x FROM facts").fetchall() == [("only in the log",)]
    finally:
        old.close()


def _config(root: Path) -> Path:
    path = root / "config.yaml"
    path.write_text(f"storage:\n  root: {root}\n")
    return path


def test_a_command_may_follow_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`berth-registry --config X check` started the server with an unknown argument."""
    from registry_server import __main__

    index = SqliteIndex(tmp_path / "index.db")
    index._writer.close()
    index._reader.close()
    assert __main__.main(["--config", str(_config(tmp_path)), "check"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def _registry(root: Path) -> None:
    """An index with a blob recorded and stored."""
    import hashlib

    data = b"layer"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    index = SqliteIndex(root / "index.db")
    conn = index._writer.conn
    conn.execute("INSERT INTO blobs(digest, size, created) VALUES (?,?,0)", (digest, len(data)))
    conn.commit()
    index._writer.close()
    index._reader.close()
    path = root / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)


async def test_backups_running_at_once_keep_the_collector_off_until_the_last_ends(
    tmp_path: Path,
) -> None:
    """One marker for all: the first backup to end deleted it, and the collector took
    blobs the other's snapshot named; never refreshed, one past 6 h counted as dead."""
    store = BlobStore(FilesystemDriver(tmp_path))
    assert not await store.backup_running()
    with maintenance._announced(tmp_path):
        with maintenance._announced(tmp_path):
            assert await store.backup_running()
        assert await store.backup_running()  # the other one still runs
    assert not await store.backup_running()
    # A marker not refreshed for a while was left by a backup that died.
    markers = tmp_path / BACKUP_MARKERS
    (markers / "dead").write_text(str(time.time() - 2 * BACKUP_STALE_SECONDS))
    assert not await store.backup_running()
    (markers / "alive").write_text(str(time.time() - BACKUP_STALE_SECONDS / 2))
    assert await store.backup_running()


def test_a_backup_gets_a_log_id_of_its_own_and_counts_missing_blobs(tmp_path: Path) -> None:
    root, dest = tmp_path / "root", tmp_path / "dest"
    root.mkdir()
    _registry(root)
    conn = sqlite3.connect(root / "index.db")
    conn.execute(
        "INSERT INTO blobs(digest, size, created) VALUES (?, 3, 0)", ("sha256:" + "f" * 64,)
    )
    conn.commit()
    (live,) = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
    conn.close()
    stats = maintenance.backup(root, dest)
    assert (stats["blobs"], stats["copied"], stats["missing"]) == (2, 1, 1)
    copy = sqlite3.connect(dest / "index.db")
    (restored,) = copy.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
    copy.close()
    assert restored != live
    assert not list((root / BACKUP_MARKERS).iterdir())


async def test_a_backup_failing_in_a_used_destination_leaves_the_one_there_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nightly `backup /backup/latest` that fails part-way must not leave a backup
    that looks complete and is not (its records replaced, its index not), nor none at
    all: the one there stays as it was until the new one is whole (found by review)."""
    root, dest = tmp_path / "root", tmp_path / "dest"
    root.mkdir()
    await _pushed(root, "team/app", "v1", 1)
    maintenance.backup(root, dest)
    first = (dest / "index.db").read_bytes()
    await _pushed(root, "team/app", "v2", 2)

    def failing(_index: Path, _record: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maintenance, "_export_records", failing)
    with pytest.raises(OSError):
        maintenance.backup(root, dest)
    assert (dest / "index.db").read_bytes() == first
    assert maintenance.check(dest) == []  # its records still agree with its index
    assert not list((root / BACKUP_MARKERS).iterdir())
    monkeypatch.undo()
    maintenance.backup(root, dest)
    assert maintenance.check(dest) == []
    assert not (dest / "records.partial").exists() and not (dest / "records.replaced").exists()


def test_a_scheduled_backup_that_fails_is_removed_and_a_full_volume_makes_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, backups = tmp_path / "root", tmp_path / "backups"
    root.mkdir()
    _registry(root)
    settings = BackupConfig(interval_seconds=3600, dir=backups, keep=3)
    for hour in range(3):
        scheduled_backup.run_once(root, settings, now=hour * 3600.0)
    assert len(scheduled_backup.complete(backups)) == 3
    real = maintenance.backup
    attempts: list[int] = []

    def full_once(root: Path, dest: Path, previous: Path | None = None) -> dict[str, float]:
        attempts.append(len(scheduled_backup.complete(backups)))
        if len(attempts) == 1:
            (dest / "half-written").parent.mkdir(parents=True, exist_ok=True)
            (dest / "half-written").write_text("x")
            raise maintenance.BackupVolumeFull("database or disk is full")
        return real(root, dest, previous)

    # Full, but not the backup volume (the registry's, where the marker goes): no
    # snapshot is removed for it.
    def marker_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maintenance, "_mark", marker_full)
    with pytest.raises(OSError) as raised:
        scheduled_backup.run_once(root, settings, now=4 * 3600.0)
    assert not isinstance(raised.value, maintenance.BackupVolumeFull)
    assert len(scheduled_backup.complete(backups)) == 3
    monkeypatch.undo()
    monkeypatch.setattr(maintenance, "backup", full_once)
    scheduled_backup.run_once(root, settings, now=4 * 3600.0)
    assert attempts == [3, 2]  # the oldest went to make room, then it was tried again
    assert [p.name for p in sorted(backups.iterdir())] == [
        p.name for p in scheduled_backup.complete(backups)
    ]  # nothing half-written is left
    assert len(scheduled_backup.complete(backups)) == 3

    def broken(root: Path, dest: Path, previous: Path | None = None) -> dict[str, float]:
        dest.mkdir(parents=True, exist_ok=True)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maintenance, "backup", broken)
    with pytest.raises(OSError):
        scheduled_backup.run_once(root, settings, now=5 * 3600.0)
    assert len(list(backups.iterdir())) == 3  # the failed one is not left behind


async def _pushed(root: Path, repo: str, tag: str, n: int, recorded: bool = True) -> str:
    """A manifest pushed through the manifest service (with the tag record or not)."""
    from registry_server.protocol import digests
    from registry_server.services.manifests import ManifestService
    from registry_server.storage.records import TagRecord
    from tests.registry_server.test_manifest_deletes import CONFIG, _image

    config = digests.of_bytes(CONFIG)
    stored = root / "blobs" / "sha256" / config.hex[:2] / config.hex / "data"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(CONFIG)
    index = SqliteIndex(root / "index.db")
    try:
        await index.link_blob(repo, str(config), len(CONFIG))
        record = TagRecord(root) if recorded else None
        result = await ManifestService(index, 1 << 20, record=record).put(
            repo, tag, _image(n), None
        )
    finally:
        await index.close()
    return result.digest


async def test_check_sees_a_repository_without_a_record_and_repair_writes_it(
    tmp_path: Path,
) -> None:
    """A repository pushed before the tag record existed, or whose file was lost: check
    said nothing and a rebuild dropped it (found by review)."""
    await _pushed(tmp_path, "old/app", "v1", 1, recorded=False)
    await _pushed(tmp_path, "new/app", "v1", 2)
    assert maintenance.check(tmp_path) == ["old/app: in the index, but has no tag record"]
    assert maintenance.check(tmp_path, cached=lambda repo: repo.startswith("old/")) == []
    assert maintenance.repair_records(tmp_path) == ["old/app"]
    assert maintenance.check(tmp_path) == []
    counts = maintenance.rebuild(tmp_path)
    assert counts["repositories"] == 2 and counts["tags"] == 2


async def test_a_delete_the_record_missed_is_repaired_from_the_index(tmp_path: Path) -> None:
    """Killed between the delete's commit and its record line (or the line refused by a
    full volume): the retry is 404 and writes nothing, and a rebuild brought the image
    back (found by review). check says so; --repair writes the record again."""
    digest = await _pushed(tmp_path, "team/app", "v1", 1)
    index = SqliteIndex(tmp_path / "index.db")
    try:
        assert await index.delete_manifest("team/app", digest)  # no record line
    finally:
        await index.close()
    assert maintenance.check(tmp_path) == [f"team/app:v1: index says None, record {digest}"]
    assert maintenance.main(["check", "--repair", "--config", str(_config(tmp_path))]) == 0
    maintenance.rebuild(tmp_path)
    index = SqliteIndex(tmp_path / "index.db")
    try:
        assert await index.resolve_tag("team/app", "v1") is None
        assert await index.get_manifest("team/app", digest) is None
    finally:
        await index.close()


async def test_an_index_from_before_the_tag_record_gets_its_records_at_start(
    tmp_path: Path,
) -> None:
    await _pushed(tmp_path, "team/app", "v1", 1, recorded=False)
    assert maintenance.backfill_records(tmp_path) == 1
    assert maintenance.check(tmp_path) == []
    assert maintenance.backfill_records(tmp_path) == 0  # once: the records are kept since
    # Records that exist are never written over from the index (it may be the one lost).
    (tmp_path / "index.db").unlink()
    assert maintenance.backfill_records(tmp_path) == 0
    assert list((tmp_path / "records").iterdir())


def test_repair_refuses_a_damaged_index(tmp_path: Path) -> None:
    (tmp_path / "index.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="rebuild"):
        maintenance.repair_records(tmp_path)


async def test_repair_refuses_records_ahead_of_the_index(tmp_path: Path) -> None:
    """An index lost and made anew by a start, or restored from an older backup, is
    readable and checks clean: writing the records from it erased what a rebuild needs
    (found by review). Records are never ahead of the index they were written after."""
    await _pushed(tmp_path, "team/app", "v1", 1)
    older = tmp_path / "older.db"
    shutil.copyfile(tmp_path / "index.db", older)
    await _pushed(tmp_path, "team/app", "v2", 2)
    kept = (tmp_path / "records").rglob("*.jsonl")
    before = {path: path.read_bytes() for path in kept}
    (tmp_path / "index.db").unlink()
    made = SqliteIndex(tmp_path / "index.db")  # a start made an empty one
    made._writer.close()
    made._reader.close()
    with pytest.raises(ValueError, match="ahead"):
        maintenance.repair_records(tmp_path)
    os.replace(older, tmp_path / "index.db")  # a restore of an older copy
    with pytest.raises(ValueError, match="ahead"):
        maintenance.repair_records(tmp_path)
    assert {path: path.read_bytes() for path in before} == before
    counts = maintenance.rebuild(tmp_path)  # what the records are for
    assert counts["tags"] == 2


async def test_a_server_starting_during_a_rebuild_cannot_open_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked once at the start, a server restarted meanwhile (a restart policy) wrote
    into the file the rebuild then set aside (found by review)."""
    await _pushed(tmp_path, "team/app", "v1", 1)
    refused: list[str] = []
    real = maintenance._rebuild

    def rebuild_while_a_server_starts(root: Path, start: float) -> dict[str, float]:
        server = sqlite3.connect(root / "index.db", timeout=0.1)  # as SqliteIndex opens it
        try:
            server.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            refused.append(str(exc))
        finally:
            server.close()
        return real(root, start)

    monkeypatch.setattr(maintenance, "_rebuild", rebuild_while_a_server_starts)
    maintenance.rebuild(tmp_path)
    assert refused and "locked" in refused[0]


async def test_the_backfill_at_start_goes_on_from_where_a_kill_stopped_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large index takes a while; a start-up probe may kill the first start, and every
    start began again from nothing (found by review)."""
    for n in range(3):
        await _pushed(tmp_path, f"team/app{n}", "v1", n, recorded=False)
    real = maintenance._export_record
    written: list[str] = []

    def killed_after_two(
        conn: sqlite3.Connection, record: object, repo: str, durable: bool = True
    ) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # as a SIGKILL would stop it: nothing after runs
        written.append(repo)
        real(conn, record, repo, durable)  # type: ignore[arg-type]

    monkeypatch.setattr(maintenance, "_export_record", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        maintenance.backfill_records(tmp_path)
    assert not (tmp_path / "records").exists()  # nothing half done is taken as done
    resumed: list[str] = []

    def counted(conn: sqlite3.Connection, record: object, repo: str, durable: bool = True) -> None:
        resumed.append(repo)
        real(conn, record, repo, durable)  # type: ignore[arg-type]

    monkeypatch.setattr(maintenance, "_export_record", counted)
    assert maintenance.backfill_records(tmp_path) == 3
    assert resumed == ["team/app2"]  # the two written before the kill are kept
    assert maintenance.check(tmp_path) == []


async def test_repair_refuses_tags_the_index_never_saw_after_it_took_a_push(
    tmp_path: Path,
) -> None:
    """Restored from last night and given one push, the index's clock passes every
    recorded version: only the clock was asked, and the repair removed the tags pushed
    after the backup from the record (found by review)."""
    await _pushed(tmp_path, "team/app", "v1", 1)
    older = tmp_path / "older.db"
    shutil.copyfile(tmp_path / "index.db", older)
    await _pushed(tmp_path, "team/app", "v2", 2)
    os.replace(older, tmp_path / "index.db")  # last night's index
    await _pushed(tmp_path, "team/app", "v3", 3)  # one push since: the clock is past v2's
    with pytest.raises(ValueError, match="unknown to the index"):
        maintenance.repair_records(tmp_path)
    # --force takes the index's word (a record wrong in a way it cannot tell).
    forced = tmp_path.with_name(tmp_path.name + "-forced")
    shutil.copytree(tmp_path, forced)
    assert maintenance.repair_records(forced, force=True) == ["team/app"]
    assert maintenance.check(forced) == []
    # Without it, the record still has v2 for a rebuild.
    assert maintenance.rebuild(tmp_path)["tags"] == 3


def test_a_copy_that_does_not_fit_is_the_backup_volumes_whatever_file_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob copy's ENOSPC names the source (in the registry), a quota's fallback copy
    none, the index snapshot's SQLite only says so in words: each was taken for some
    other volume's, and no room was made (found by review)."""
    root, dest = tmp_path / "root", tmp_path / "dest"
    root.mkdir()
    _registry(root)
    (dest / "blobs").mkdir(parents=True)
    for failure in (
        OSError(errno.ENOSPC, "No space left on device", str(root / "blobs" / "x")),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ):

        def failing(*_args: object, error: OSError = failure) -> bool:
            raise error

        monkeypatch.setattr(maintenance, "_link_or_copy", failing)
        with pytest.raises(maintenance.BackupVolumeFull):
            maintenance.backup(root, dest)
    monkeypatch.undo()

    def snapshot_full(*_args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(maintenance, "_export_records", snapshot_full)
    with pytest.raises(maintenance.BackupVolumeFull):
        maintenance.backup(root, dest)
