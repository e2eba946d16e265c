"""The storage driver interface: small, file-like, and ignorant of OCI.

A driver stores opaque files under slash-separated paths. Blob layout, digests and
upload sessions live one layer up (``blobstore``), so an object-store backend only has to
implement these few operations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol


class StorageNotFound(Exception):
    """The path does not exist."""


class StorageFull(Exception):
    """The volume has no space for this write (ENOSPC), or writes are refused because it
    is nearly full (``storage.space``). Nothing half-written is left visible."""


class StorageConflict(Exception):
    """Another writer changed the file meanwhile; this write was not applied (a store
    whose files can be written from several processes, such as S3, checks this)."""


class BackendUnavailable(Exception):
    """A back end shared over the network (the index's PostgreSQL, the S3 store) cannot
    be reached now: the same request may succeed later. ``backend`` names it for people
    ("metadata database", "object store")."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend}: {detail}")
        self.backend = backend


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


class Writer(Protocol):
    """An append-only file being written. Not visible to readers until moved into place."""

    @property
    def size(self) -> int: ...

    async def write(self, data: bytes) -> None: ...

    def destine(self, path: str) -> None:
        """Say, before the first write into an empty file, that once committed the file
        will be ``move``d to ``path`` in this process and then never read where it is. A
        driver whose moves copy (an object store) may then write the data at ``path``
        directly, unseen until the move completes it, and nothing where the file is; a
        close without commit then leaves the file empty, as it was. That move may leave
        the empty file where it was, for the caller to delete (the blob store ends the
        session right after a publish). A hint: drivers may ignore it."""

    def hash_with(self, hasher: Hasher) -> bool:
        """Feed every byte written from now on to ``hasher``, in order, where the driver
        writes it (a file's writing thread: the event loop is spared the hashing). True
        when the driver does; False leaves the hashing to the caller."""

    async def hashed(self) -> None:
        """Wait until every byte written so far is in the ``hash_with`` hasher; later
        writes are no longer hashed."""

    async def flush(self) -> None:
        """Write what is buffered where readers of the file see it (not durable). A
        driver whose data cannot be read before it is complete may do nothing."""

    async def commit(self) -> None:
        """Flush to durable storage and close."""

    async def close(self) -> None:
        """Close without the durability guarantee (the data stays for a later append)."""


class StorageDriver(Protocol):
    """Paths are relative and slash-separated, and name something below the root: an
    empty, absolute or ``..`` path is refused with ValueError (even by ``delete``)."""

    name: str

    async def stat(self, path: str) -> int | None:
        """Size of the file at ``path``, or None when absent."""

    async def get_content(self, path: str) -> bytes:
        """Whole content of a small file; raises StorageNotFound."""

    async def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        """Write a small file atomically (readers see the old or the new content).
        ``durable=False``: it may be lost by a crash of the machine (never half written),
        for what can be made again, and the write does not wait for the disk."""

    def local_path(self, path: str) -> Path | None:
        """A local file to serve from (read and written onto the socket by a thread,
        http/file_bodies.py), or None for remote backends."""

    def reader(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a file's bytes from ``offset``; raises StorageNotFound."""

    async def writer(self, path: str, append: bool = False, create: bool = True) -> Writer:
        """Open a file for appending (``append``) or truncating, creating it if needed;
        raises StorageNotFound if its directory vanishes while it is being created, or,
        with ``create=False``, if the file is not there."""

    def holding(self, path: str) -> AbstractAsyncContextManager[None]:
        """Hold the file at ``path`` against other processes on this storage (worker
        processes of one server each take requests for one upload session) for the
        block, waiting while another holds it; a file that is not there is not held.
        Object storage holds nothing: its sessions' writes are conditional."""

    async def move(self, src: str, dst: str) -> None:
        """Atomically move ``src`` over ``dst``; raises StorageNotFound if src is missing."""

    async def truncate(self, path: str, size: int) -> None:
        """Cut a file being written back to ``size`` bytes (undo a failed append);
        raises StorageNotFound if it is not there."""

    async def delete(self, path: str) -> None:
        """Delete a file or a whole subtree; a missing path is not an error."""

    async def list(self, prefix: str) -> list[str]:
        """Immediate children (names, not paths) of the directory ``prefix``."""

    async def redirect_url(self, path: str) -> str | None:
        """A URL where clients can GET the file themselves (pre-signed), or None to have
        it served by the registry."""

    async def purge_incomplete(self, older_than: float) -> int:
        """Remove what interrupted writes started before ``older_than`` (a Unix time) left
        where no path names it (temporary files, incomplete multipart uploads); returns
        how many."""
