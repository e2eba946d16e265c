"""Transactions written once for every SQL metadata index (no I/O here).

A transaction is a generator: it yields a ``Query`` and is sent back its ``Result``, so
the same code runs synchronously on SQLite's writer thread (``run_sync``, no thread hop
per statement) and asynchronously on PostgreSQL (the backend's own runner). Queries use
``?`` placeholders and the SQL both engines accept; where they differ (locks, the clock,
"no limit") the transaction asks its ``Dialect``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    sql: str
    params: Sequence[Any] = ()


@dataclass(frozen=True)
class Result:
    rows: list[tuple[Any, ...]]
    rowcount: int

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


Tx: TypeAlias = Generator[Query, Result, T]


@dataclass(frozen=True)
class Dialect:
    """What differs between the engines, as data the shared transactions consult.

    SQLite has one writer at a time (``BEGIN IMMEDIATE`` locks the whole database), so
    it needs no row locks. PostgreSQL has many concurrent writers in many processes:
    a transaction that changes a repository's tags or manifests first locks that
    repository's row (``lock_repository``), which serialises them per repository, and
    keeps the hybrid logical clock in that row (``per_repository_clock``), so writers
    in different repositories never wait for each other.
    """

    name: str
    unlimited: int | None  # the LIMIT value meaning "no limit"
    lock_repository: str  # SQL locking a repository row by id ("" when not needed)
    share_blob_rows: str  # suffix locking the rows of blobs a manifest needs
    lock_blob_row: str  # suffix locking a blob's row before collection checks it
    per_repository_clock: bool
    now: str  # SQL for the database's wall clock, in seconds since the epoch

    def limit(self, n: int | None) -> int | None:
        return self.unlimited if n is None else n


def run_sync(conn: sqlite3.Connection, tx: Tx[T]) -> T:
    """Run a transaction's statements on a DB-API connection (in the caller's transaction)."""
    try:
        query = next(tx)
        while True:
            cursor = conn.execute(query.sql, query.params)
            result = Result(cursor.fetchall(), cursor.rowcount)
            query = tx.send(result)
    except StopIteration as done:
        value: T = done.value
        return value


def in_marks(count: int) -> str:
    """``?,?,...`` for an IN list of ``count`` values."""
    return ",".join("?" * count)
