"""Zero-copy response bodies: ``os.sendfile`` from a blob file onto the client's socket.

aiohttp's FileResponse reaches sendfile only through ``loop.sendfile()``, which uvloop
does not implement; it then falls back to reading the file in 256 KiB chunks in a thread
and writing each through the transport, so every byte is copied through Python.

Here the kernel copies the file to the socket. The ``sendfile`` calls run in a small
thread pool, because a blob that is not in the page cache makes them wait for the disk
and the event loop must not; when the socket buffer is full the loop waits for it to
drain (on a duplicate of the socket's descriptor: the transport owns the original), so
a slow client holds no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os

from aiohttp import web

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sendfile")
_MAX_CALL = 8 << 20  # bytes per sendfile call


def _socket_fd(request: web.Request) -> int | None:
    """The connection's socket when the body may bypass the transport, else None."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None  # TLS must encrypt the bytes: no zero-copy
    sock = transport.get_extra_info("socket")
    # Anything still queued in the transport (the headers) must reach the socket first.
    if sock is None or transport.get_write_buffer_size() != 0:
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


def _send_some(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """Send until ``count`` bytes are out or the socket is full; returns how many went."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out_fd, in_fd, offset + sent, min(count - sent, _MAX_CALL))
        except BlockingIOError:
            break
        if n == 0:
            raise OSError(errno.EIO, "file is shorter than the response's Content-Length")
        sent += n
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def send(request: web.Request, in_fd: int, offset: int, count: int) -> bool:
    """Send ``count`` bytes of the open file ``in_fd`` from ``offset`` as the body of the
    response whose headers were just sent. Takes ownership of ``in_fd`` (closes it).

    Returns False, having sent nothing, when the connection cannot take sendfile (the
    caller then writes the body itself). When the client goes away mid-body the
    connection is aborted, since the response cannot be completed.
    """
    sock_fd = _socket_fd(request)
    if sock_fd is None:
        os.close(in_fd)
        return False
    loop = asyncio.get_running_loop()
    out_fd = os.dup(sock_fd)
    running: concurrent.futures.Future[int] | None = None

    def close(_: object = None) -> None:
        os.close(out_fd)
        os.close(in_fd)

    try:
        while count > 0:
            running = _POOL.submit(_send_some, out_fd, in_fd, offset, count)
            sent = await asyncio.wrap_future(running)
            running = None
            offset += sent
            count -= sent
            if count > 0:
                await _writable(loop, out_fd)
    except OSError:
        if request.transport is not None:
            request.transport.abort()
    finally:
        # A cancelled wait leaves the thread running: close the descriptors after it.
        if running is not None and not running.done():
            running.add_done_callback(close)
        else:
            with contextlib.suppress(OSError):
                close()
    return True
