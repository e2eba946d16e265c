"""Electing one replica per task through PostgreSQL: session-level advisory locks.

Each competing process keeps one connection of its own (not the index's pool: a session
lock belongs to the connection that took it) and, every ``check_seconds``, tries
``pg_try_advisory_lock`` for each task it wants and does not hold. A task is held for as
long as that session lives:

- The holder is killed (SIGKILL, OOM, a crash): the kernel closes the socket, the
  server ends the session and frees its locks at once, and the next try of another
  replica (within ``check_seconds``) takes the task over.
- The holder stops gracefully: ``stop`` closes the connection; the same.
- The server ends the session while the holder lives (a terminated backend, a restart
  or failover): between rounds the holder reads its idle session, so the server's
  goodbye ends every term at once (measured: milliseconds), and the holder reconnects
  to compete again. Only for those milliseconds can it run beside a new holder, and
  everything elected tolerates that (deliveries are at least once, GC works under the
  index's per-blob locks).
- The network is cut, or the holder's node is lost (no FIN): no statement confirms the
  session for ``check_seconds + 2 * timeout_seconds`` (11 s; room for two slow
  statements in a row) and the holder gives up, by its own clock (a watchdog: a query
  that timed out can take psycopg another 10 s to cancel and abandon on a silent
  network), and closes the session; the server finds the dead connection only through
  the TCP keepalives set on the session (idle 10 s, then 3 probes 2 s apart) or
  ``tcp_user_timeout`` (15 s), later than that, so two holders do not overlap.

Lock keys are the two-``int4`` form ``(NAMESPACE, hash(task))``, a key space PostgreSQL
keeps apart from the single-``bigint`` keys the index takes (migrations, all blobs,
per digest). A transaction-pooling proxy (PgBouncer ``pool_mode=transaction``) does not
keep sessions: the election needs a direct connection or session pooling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from registry_server.storage.election import Election, Term
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.election")

NAMESPACE = int.from_bytes(b"brth", "big")  # the first of the two int4 lock keys
_APP_PREFIX = "berth:"
# The server's side of a cut connection (seconds; see the module docstring).
_SESSION_SETTINGS = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 15000",
)


def session_dsn(dsn: str, application_name: str, timeout_seconds: float) -> str:
    """``dsn`` for a long-lived session whose locks must end with its holder: the
    client's keepalives (a dead server is noticed by the OS too), a name for
    pg_stat_activity, and a connect timeout unless the DSN sets one."""
    extra: dict[str, Any] = {
        "application_name": application_name[:63],
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    if "connect_timeout" not in conninfo_to_dict(dsn):
        extra["connect_timeout"] = max(2, int(timeout_seconds))
    return make_conninfo(dsn, **extra)


async def connect_session(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection for session locks, with the server's side of a cut connection set
    (see the module docstring)."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        for statement in _SESSION_SETTINGS:
            await conn.execute(statement)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _drain(conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
    """Read the idle session for ``seconds``: raises as soon as the server ends it."""
    async for _ in conn.notifies(timeout=seconds):
        pass  # nothing LISTENs here; a notification would only be dropped


def task_key(task: str) -> int:
    """The second lock key of ``task`` (non-negative: pg_locks shows it as an oid)."""
    digest = hashlib.sha256(b"berth-election:" + task.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(eq=False)
class _Slot:
    task: str
    key: int
    wanted: bool = False
    term: Term | None = None
    acquired: asyncio.Event = field(default_factory=asyncio.Event)


class PostgresElection(Election):
    def __init__(
        self,
        dsn: str,
        replica_id: str,
        check_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.replica_id = replica_id
        self._dsn = session_dsn(dsn, _APP_PREFIX + replica_id, timeout_seconds)
        self.check_seconds = check_seconds
        self.timeout_seconds = timeout_seconds
        self._slots: dict[str, _Slot] = {}
        self._keys: dict[int, str] = {}
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._kick = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one statement (or the idle wait) at a time
        self._waiting = 0  # statements waiting for the connection
        self._confirmed = 0.0  # when a statement last proved the session (loop time)
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
            self._watchdog = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        watchdog, self._watchdog = self._watchdog, None
        await cancel_and_wait([runner, watchdog])
        await self._drop()
        for slot in self._slots.values():  # given up on purpose: nothing to log
            if slot.term is not None:
                slot.term.lost.set()
                slot.term = None
                slot.acquired.clear()

    def _slot(self, task: str) -> _Slot:
        slot = self._slots.get(task)
        if slot is None:
            key = task_key(task)
            if key in self._keys:  # two names, one key: they would exclude each other
                raise ValueError(f"election tasks {task!r} and {self._keys[key]!r} share a key")
            slot = self._slots[task] = _Slot(task, key)
            self._keys[key] = task
        return slot

    async def acquire(self, task: str) -> Term:
        slot = self._slot(task)
        slot.wanted = True
        while True:
            if slot.term is not None:
                return slot.term
            self._kick.set()  # try now, not at the next round
            await slot.acquired.wait()

    def release(self, term: Term) -> None:
        slot = self._slots.get(term.task)
        if slot is None or slot.term is not term:
            return
        slot.wanted = False
        self._kick.set()  # the runner unlocks it

    async def holders(self, tasks: Sequence[str]) -> dict[str, str]:
        keys = {task_key(t): t for t in tasks}
        try:
            rows = await self._query(
                "SELECT l.objid::int8, a.application_name FROM pg_locks l"
                " JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                " AND l.database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
                " AND l.classid::int8 = %s AND l.objid::int8 = ANY(%s)",
                (NAMESPACE, list(keys)),
            )
        except (psycopg.Error, OSError, TimeoutError):
            return {}
        found = {}
        for key, name in rows:
            if key in keys:
                text = str(name or "")
                found[keys[key]] = text.removeprefix(_APP_PREFIX) if text else "(unknown)"
        return found

    async def publish(self, task: str, report: str) -> None:
        await self._query(
            "INSERT INTO task_reports(task, holder, report, updated) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (task) DO UPDATE SET holder = excluded.holder,"
            " report = excluded.report, updated = excluded.updated",
            (task, self.replica_id, report, time.time()),
            rows=False,
        )

    async def reports(self, tasks: Sequence[str]) -> dict[str, str]:
        try:
            rows = await self._query(
                "SELECT task, report FROM task_reports WHERE task = ANY(%s)", (list(tasks),)
            )
        except (psycopg.Error, OSError, TimeoutError):
            return {}
        return {str(task): str(report) for task, report in rows}

    # -- the runner ----------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            self._kick.clear()
            try:
                await self._round()
                failures = 0
                await self._idle()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                failures += 1
                self._lose_all(f"{type(exc).__name__}: {exc}")
                await self._drop()
                # Reconnect soon, but do not hammer a server that is down.
                await asyncio.sleep(min(self.check_seconds * 2**failures, 30.0))

    async def _watch(self) -> None:
        """End the terms when no statement has proved the session for a round and a
        timeout, whatever the statement in flight is doing (see the module docstring),
        and close the session: its locks must not be taken again on top of themselves."""
        limit = self.check_seconds + 2 * self.timeout_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.5, self.check_seconds))
            held = any(slot.term is not None for slot in self._slots.values())
            if held and loop.time() - self._confirmed > limit:
                self._lose_all(f"no statement confirmed the session for {limit:g} s")
                await self._drop()

    async def _idle(self) -> None:
        """Wait for the next round (``check_seconds``, or sooner when kicked), reading
        the session meanwhile: when the server ends it, the server's goodbye arrives at
        once, and the terms end then instead of at the next round. A statement from
        elsewhere (``holders``, ``publish``) kicks this wait to have the connection."""
        if self._conn is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.check_seconds)
            return
        async with self._lock:  # behind the statements already waiting for it
            conn = self._conn
            if conn is None or self._waiting or self._kick.is_set():
                return
            watch = asyncio.create_task(_drain(conn, self.check_seconds))
            kicked = asyncio.create_task(self._kick.wait())
            try:
                await asyncio.wait(
                    {watch, kicked}, timeout=self.check_seconds, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (watch, kicked):
                    task.cancel()
                await asyncio.gather(watch, kicked, return_exceptions=True)
        if not watch.cancelled() and (failure := watch.exception()) is not None:
            raise failure

    async def _round(self) -> None:
        """Unlock what was released, try what is wanted: one round trip that also proves
        the session (and so every lock it holds) is still there."""
        if not any(s.wanted or s.term is not None for s in self._slots.values()):
            return  # nothing wanted nor held: no connection needed
        freed = [s for s in self._slots.values() if s.term is not None and not s.wanted]
        for slot in freed:
            slot.term = None
            slot.acquired.clear()
        tried = [s for s in self._slots.values() if s.wanted and s.term is None]
        rows = await self._query(
            "SELECT k, CASE WHEN u THEN pg_advisory_unlock(%s, k)"
            " ELSE pg_try_advisory_lock(%s, k) END"
            " FROM unnest(%s::int4[], %s::bool[]) AS t(k, u)",
            (
                NAMESPACE,
                NAMESPACE,
                [s.key for s in freed] + [s.key for s in tried],
                [True] * len(freed) + [False] * len(tried),
            ),
            runner=True,
        )
        won = {int(key) for key, ok in rows if ok}
        for slot in tried:
            if slot.key in won:
                slot.term = Term(slot.task)
                slot.acquired.set()
                log.debug("elected", extra={"task": slot.task, "replica": self.replica_id})

    async def _query(
        self, sql: str, params: Sequence[Any], rows: bool = True, runner: bool = False
    ) -> list[tuple[Any, ...]]:
        self._waiting += 1
        if not runner:
            self._kick.set()  # the runner's idle wait gives the connection up
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            if self._conn is None:
                self._conn = await asyncio.wait_for(self._connect(), self.timeout_seconds)
            conn = self._conn

            async def run() -> list[tuple[Any, ...]]:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall() if rows else []

            result = await asyncio.wait_for(run(), self.timeout_seconds)
            if self._conn is not conn:
                # The watchdog closed the session meanwhile: nothing won on it stands.
                raise psycopg.OperationalError("the election's session was closed")
            self._confirmed = asyncio.get_running_loop().time()
            return result
        finally:
            self._lock.release()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await connect_session(self._dsn)

    def _lose_all(self, reason: str) -> None:
        for slot in self._slots.values():
            if slot.term is not None:
                log.warning(
                    "election lost: the database session is gone",
                    extra={"task": slot.task, "replica": self.replica_id, "error": reason},
                )
                slot.term.lost.set()
                slot.term = None
                slot.acquired.clear()

    async def _drop(self) -> None:
        """Close the session (the server frees its locks)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
