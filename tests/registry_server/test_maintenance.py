"""The maintenance commands (registry_server/maintenance.py) against what a crash or a
careless order of steps leaves: an index still open in a server, a write-ahead log."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from registry_server import maintenance
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
