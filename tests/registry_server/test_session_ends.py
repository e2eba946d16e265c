"""Logging out of the web UI ends the session everywhere: a copy of its cookie is refused
by the process that logged it out at once, by the other workers (SQLite) or replicas
(PostgreSQL) once they have read the index, and by a process started later."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry_server.app import build_app
from registry_server.auth.session_ends import SessionEnds
from registry_server.auth.tokens import LEEWAY_SECONDS
from registry_server.config import AuthConfig, Config, StorageConfig
from registry_server.storage.index import MetadataIndex
from registry_server.storage.sqlite_index import SqliteIndex
from tests.registry_server.test_metadata_index import BACKENDS, open_index


@pytest.fixture(params=BACKENDS)
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataIndex]:
    idx = await open_index(request.param, request, tmp_path)
    yield idx
    await idx.close()


async def test_a_session_ended_by_one_process_is_ended_for_the_others(
    index: MetadataIndex,
) -> None:
    here, there = SessionEnds(index), SessionEnds(index)
    await there.sync_once()
    await here.end("session-1", time.time() + 3600)
    assert here.ended("session-1") and not there.ended("session-1")
    await there.sync_once()
    assert there.ended("session-1") and not there.ended("session-2")
    # Read again, nothing is lost; a process started later reads it too.
    await there.sync_once()
    later = SessionEnds(index)
    await later.sync_once()
    assert there.ended("session-1") and later.ended("session-1")
    # Once the token would be refused anyway (its expiry and the leeway), it is forgotten,
    # here and in the index (removed when the next session ends).
    await here.end("short", time.time() - LEEWAY_SECONDS - 1)
    await there.sync_once()
    assert not there.ended("short")
    await here.end("session-2", time.time() + 3600)
    ended, _ = await index.ended_sessions(None)
    assert sorted(t for t, _ in ended) == ["session-1", "session-2"]


async def test_replicas_whose_clocks_disagree_miss_no_end(index: MetadataIndex) -> None:
    """Stamped and read by the database's clock: a reader ten minutes ahead of the
    replica that logged out still sees it (found by review: by each process's own
    clock the row fell before the reader's cursor, for good)."""
    ahead = SessionEnds(index, wall=lambda: time.time() + 600)
    behind = SessionEnds(index, wall=lambda: time.time() - 600)
    await ahead.sync_once()
    await ahead.sync_once()
    await behind.end("s", time.time() + 3600)
    await ahead.sync_once()
    assert ahead.ended("s")


# -- over HTTP, two workers sharing one SQLite index ---------------------------------------


def _config(root: Path) -> Config:
    key = root / "token.key"
    if not key.exists():
        key.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        hashed = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()
        (root / "htpasswd").write_text(f"alice:{hashed}\n")
    return Config(
        storage=StorageConfig(root=root / "storage"),
        auth=AuthConfig(htpasswd=root / "htpasswd", signing_key=key),
    )


def _client(config: Config, worker_id: int = 0) -> TestClient[Any, Any]:
    """A browser that sends only the cookies each request names."""
    return TestClient(TestServer(build_app(config, worker_id)), cookie_jar=DummyCookieJar())


_CSRF = "c" * 43  # double submit: the form's field equals the cookie


async def _post(client: TestClient[Any, Any], path: str, session: str = "", **fields: str) -> Any:
    host = f"{client.server.host}:{client.server.port}"
    cookies = f"berth_csrf={_CSRF}" + (f"; berth_session={session}" if session else "")
    return await client.post(
        path,
        data={"csrf": _CSRF, **fields},
        headers={"Origin": f"http://{host}", "Cookie": cookies},
        allow_redirects=False,
    )


async def _user(client: TestClient[Any, Any], session: str) -> str | None:
    """Who the UI's front page says is logged in with this session cookie."""
    page = await client.get("/ui/", headers={"Cookie": f"berth_session={session}"})
    assert page.status == 200
    text = await page.text()
    if 'id="logout"' not in text:
        return None
    found = re.search(r'id="who">([^<]*)<', text)
    return found.group(1) if found else "?"


async def test_logging_out_refuses_a_copy_of_the_cookie_on_every_worker(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with (
        _client(config) as first,
        _client(config, worker_id=1) as second,
    ):
        login = await _post(first, "/ui/login", username="alice", password="alice-pw")
        assert login.status == 303, await login.text()
        session = login.cookies["berth_session"].value
        assert await _user(first, session) is not None
        assert await _user(second, session) is not None

        logout = await _post(second, "/ui/logout", session)
        assert logout.status == 303, await logout.text()
        # The copy kept from before: refused where it logged out at once ...
        assert await _user(second, session) is None
        # ... and by the other worker within its interval (a second).
        for _ in range(60):
            if await _user(first, session) is None:
                break
            await asyncio.sleep(0.05)
        assert await _user(first, session) is None
        # A new login is a new session, not ended.
        again = await _post(first, "/ui/login", username="alice", password="alice-pw")
        assert await _user(second, again.cookies["berth_session"].value) is not None

    async with _client(config) as restarted:
        assert await _user(restarted, session) is None


async def test_an_end_committed_late_within_the_overlap_is_still_seen(tmp_path: Path) -> None:
    """A row is stamped before its transaction commits: one committing after a reader
    looked, stamped before that look, is read by the next look (the overlap)."""
    index = SqliteIndex(tmp_path / "index.db")
    reader = SessionEnds(index)
    await reader.sync_once()
    conn = sqlite3.connect(tmp_path / "index.db")
    with conn:  # as if stamped 30 s ago and committed only now
        conn.execute(
            "INSERT INTO ended_sessions (token_id, expires_at, ended_at) VALUES (?, ?, ?)",
            ("late", time.time() + 3600, time.time() - 30),
        )
    conn.close()
    await reader.sync_once()
    assert reader.ended("late")
    await index.close()
