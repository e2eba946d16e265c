"""Filesystem storage driver: temp file + fsync + atomic rename.

Blocking file system calls run in the default thread pool so the event loop stays free;
writes are batched into ~1 MiB buffers to keep the number of thread hops small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from registry_server.storage.driver import StorageFull, StorageNotFound
from registry_server.storage.space import full_as_storage_full

T = TypeVar("T")

_READ_CHUNK = 1 << 20
_WRITE_BATCH = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileWriter:
    def __init__(self, fd: int, size: int, on_full: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._on_full = on_full
        self._size = size
        self._pending: list[bytes] = []
        self._pending_len = 0

    @property
    def size(self) -> int:
        return self._size + self._pending_len

    def _flush_sync(self, chunks: list[bytes]) -> None:
        with full_as_storage_full():
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]

    async def _flush(self) -> None:
        if not self._pending:
            return
        chunks, self._pending = self._pending, []
        size = self._pending_len
        self._pending_len = 0
        try:
            await asyncio.to_thread(self._flush_sync, chunks)
        except StorageFull:
            if self._on_full is not None:
                self._on_full()
            raise
        self._size += size

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= _WRITE_BATCH:
            await self._flush()

    def _fsync_sync(self) -> None:
        with full_as_storage_full():
            os.fsync(self._fd)

    async def commit(self) -> None:
        await self._flush()
        await asyncio.to_thread(self._fsync_sync)
        await self.close()

    async def close(self) -> None:
        try:
            await self._flush()
        finally:  # closed even when the last flush found the disk full
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class FilesystemDriver:
    name = "filesystem"

    def __init__(self, root: Path, on_full: Callable[[], None] | None = None) -> None:
        # Told when a write meets ENOSPC, so writes are refused before the next poll.
        self.on_full = on_full
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "_tmp"
        self._tmp.mkdir(exist_ok=True)

    def _path(self, path: str) -> Path:
        # Paths come from the blob store layer, never raw from clients; refuse escapes anyway,
        # and the root itself: a path names something below it (delete("") would take all).
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if path.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"invalid storage path {path!r}")
        return self.root.joinpath(*parts)

    def _stat_sync(self, path: str) -> int | None:
        try:
            return os.stat(self._path(path)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def stat(self, path: str) -> int | None:
        return await asyncio.to_thread(self._stat_sync, path)

    async def get_content(self, path: str) -> bytes:
        target = self._path(path)
        try:
            return await asyncio.to_thread(target.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageNotFound(path) from None

    def _put_sync(self, path: str, data: bytes, durable: bool = True) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:  # a full disk, most likely: leave no temp file taking space
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            _fsync_dir(target.parent)

    async def _full_guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking write in a thread; ENOSPC becomes StorageFull (and is told)."""
        try:
            with full_as_storage_full():
                return await asyncio.to_thread(fn, *args)
        except StorageFull:
            if self.on_full is not None:
                self.on_full()
            raise

    async def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        await self._full_guard(self._put_sync, path, data, durable)

    def local_path(self, path: str) -> Path | None:
        return self._path(path)

    async def reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        target = self._path(path)
        try:
            f = await asyncio.to_thread(open, target, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise StorageNotFound(path) from None
        try:
            f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                want = _READ_CHUNK if remaining is None else min(_READ_CHUNK, remaining)
                chunk = await asyncio.to_thread(f.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            f.close()

    def _open_sync(self, path: str, append: bool) -> tuple[int, int]:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(target, flags, 0o644)
        return fd, os.fstat(fd).st_size

    async def writer(self, path: str, append: bool = False) -> FileWriter:
        try:
            fd, size = await self._full_guard(self._open_sync, path, append)
        except FileNotFoundError:  # its directory was removed between mkdir and open
            raise StorageNotFound(path) from None
        return FileWriter(fd, size, self.on_full)

    def _move_sync(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            raise StorageNotFound(src) from None
        _fsync_dir(target.parent)

    async def move(self, src: str, dst: str) -> None:
        await self._full_guard(self._move_sync, src, dst)

    def _truncate_sync(self, path: str, size: int) -> None:
        with open(self._path(path), "r+b") as f:
            f.truncate(size)

    async def truncate(self, path: str, size: int) -> None:
        await asyncio.to_thread(self._truncate_sync, path, size)

    def _delete_sync(self, path: str) -> None:
        target = self._path(path)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    async def delete(self, path: str) -> None:
        await asyncio.to_thread(self._delete_sync, path)

    def _list_sync(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list_sync, prefix)

    async def redirect_url(self, path: str) -> str | None:
        return None

    def _purge_sync(self, older_than: float) -> int:
        # put_content's temp files, left by a process killed between write and rename.
        purged = 0
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    purged += 1
        return purged

    async def purge_incomplete(self, older_than: float) -> int:
        return await asyncio.to_thread(self._purge_sync, older_than)
