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
from collections.abc import AsyncIterator
from pathlib import Path

from registry_server.storage.driver import StorageNotFound

_READ_CHUNK = 1 << 20
_WRITE_BATCH = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileWriter:
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._pending: list[bytes] = []
        self._pending_len = 0

    @property
    def size(self) -> int:
        return self._size + self._pending_len

    def _flush_sync(self, chunks: list[bytes]) -> None:
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
        await asyncio.to_thread(self._flush_sync, chunks)
        self._size += size

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= _WRITE_BATCH:
            await self._flush()

    async def commit(self) -> None:
        await self._flush()
        await asyncio.to_thread(os.fsync, self._fd)
        await self.close()

    async def close(self) -> None:
        await self._flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FilesystemDriver:
    name = "filesystem"

    def __init__(self, root: Path) -> None:
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

    def _put_sync(self, path: str, data: bytes) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    async def put_content(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_sync, path, data)

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
            fd, size = await asyncio.to_thread(self._open_sync, path, append)
        except FileNotFoundError:  # its directory was removed between mkdir and open
            raise StorageNotFound(path) from None
        return FileWriter(fd, size)

    def _move_sync(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            raise StorageNotFound(src) from None
        _fsync_dir(target.parent)

    async def move(self, src: str, dst: str) -> None:
        await asyncio.to_thread(self._move_sync, src, dst)

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
