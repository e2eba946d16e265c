"""Electing the one process that runs a task everyone could run (no I/O here).

Some work must happen once per registry however many replicas serve it: GC and
retention rounds, replication delivery to each peer, webhook delivery to each endpoint.
Each such task has a name; a process that wants to run one ``acquire``s it and gets a
``Term`` once it holds it, runs the task until the term's ``lost`` is set, and
``release``s it when it stops on its own. At most one process holds a task at a time.

``LocalElection`` is the embedded case (SQLite: one pod, worker 0 holds everything);
``postgres_election.PostgresElection`` elects through the metadata database.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Term:
    """One uninterrupted holding of a task: ``lost`` is set when it ends without the
    holder's asking (the database session is gone), after which the task must stop."""

    task: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class Election(ABC):
    replica_id: str

    async def start(self) -> None:  # noqa: B027 - optional: the local election has nothing
        """Begin competing (connections that need a running event loop)."""

    async def stop(self) -> None:  # noqa: B027
        """Stop competing and give up every task held (others take over)."""

    @abstractmethod
    async def acquire(self, task: str) -> Term:
        """Wait until this process holds ``task``."""

    @abstractmethod
    def release(self, term: Term) -> None:
        """Give ``task`` up (at once here; in the database shortly after)."""

    @abstractmethod
    async def holders(self, tasks: Sequence[str]) -> dict[str, str]:
        """The replica holding each of ``tasks`` (those held by nobody are left out)."""

    @abstractmethod
    async def publish(self, task: str, report: str) -> None:
        """Record what the holder of ``task`` reports (its figures, as text), for every
        replica to read with ``reports``."""

    @abstractmethod
    async def reports(self, tasks: Sequence[str]) -> dict[str, str]:
        """The last report published for each of ``tasks`` (by whichever holder)."""


class LocalElection(Election):
    """One process decides alone: it holds every task (``holds``), or none (the other
    worker processes of a server whose worker 0 runs them)."""

    def __init__(self, replica_id: str = "local", holds: bool = True) -> None:
        self.replica_id = replica_id
        self._holds = holds
        self._reports: dict[str, str] = {}

    async def acquire(self, task: str) -> Term:
        if not self._holds:
            await asyncio.Event().wait()  # never: another process of this server runs it
        return Term(task)

    def release(self, term: Term) -> None:
        pass

    async def holders(self, tasks: Sequence[str]) -> dict[str, str]:
        return {task: self.replica_id for task in tasks} if self._holds else {}

    async def publish(self, task: str, report: str) -> None:
        self._reports[task] = report

    async def reports(self, tasks: Sequence[str]) -> dict[str, str]:
        return {t: self._reports[t] for t in tasks if t in self._reports}
