"""Response bodies from local blob files, written onto the client's socket by a thread.

aiohttp's FileResponse goes through ``loop.sendfile()``, which uvloop does not implement;
it then falls back to reading the file in 256 KiB chunks in a thread and writing each
through the transport, on the event loop, so every byte passes through it.

Here a small thread pool reads the file (``preadv`` into a reused 256 KiB buffer per
thread; 1 MiB measured no faster, and each of the eight threads keeps its own) and
writes it straight onto the connection's socket, on a duplicate of its descriptor (the
transport owns the original). The loop only hands out the work: a blob that is not in
the page cache makes the reads wait for the disk, and the loop must not.

Not ``sendfile(2)``, which this module used before. Measured on the bench machine's
loopback (256 MiB from the page cache, median of 10): sendfile took 139 ms to curl,
99 ms with TCP_CORK, and read + write 105 ms, with the least CPU on the client's side
(40 ms against 56-67 ms: data sent from page-cache pages reaches the reader in smaller
pieces); to crane, which hashes what it reads, 330-349 ms with sendfile, corked or not,
and 244 ms with read + write. A pod's pull through a veth pair is the same path. Over a
NIC that takes page fragments, sendfile would save the copy (one memcpy, ~25 ms of CPU
per 256 MiB), not the receiver's cost.

When the socket buffer is full the thread waits a little for it to drain (a reader
keeping up empties it in far less); past that, the loop waits for it, so a slow client
holds a thread for no more than ``_HOLD_MS`` at a time.

Over TLS the transport must encrypt the bytes: a thread reads the file in 1 MiB pieces
and the loop writes each through the response.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import select
import threading
from typing import Any

from aiohttp import web

from registry_server.http.context import services

log = logging.getLogger("registry_server.http")
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="file-body")
_PIECE = 256 << 10  # bytes per read and write
_TLS_PIECE = 1 << 20  # bytes per read when the transport writes (TLS)
_HOLD_MS = 20  # how long a sending thread waits for a full socket to take more
_buffers = threading.local()


def _socket_fd(request: web.Request) -> int | None:
    """The connection's socket when the body may bypass the transport, else None."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None  # TLS must encrypt the bytes: the transport writes them
    sock = transport.get_extra_info("socket")
    # Anything still queued in the transport (the headers) must reach the socket first.
    if sock is None or transport.get_write_buffer_size() != 0:
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


def _buffer() -> memoryview:
    """This thread's read buffer (made once: a new one per call would be zeroed each time)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(_PIECE))
    return view


def _send_some(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """Send until ``count`` bytes are out, or the socket stays full for ``_HOLD_MS``;
    returns how many went.

    A client that reads as fast as the socket fills drains the buffer in well under a
    millisecond: the thread waits for that here, where going back to the event loop to
    wait and then to a thread again cost two hand-offs per buffer, long enough for the
    socket to run dry. Bytes read but not sent when it gives up are read again by the
    next call."""
    view = _buffer()
    sent = start = end = 0  # view[start:end]: read, not sent yet
    poller: select.poll | None = None
    while sent < count:
        if start == end:
            start, end = 0, os.preadv(in_fd, [view[: min(count - sent, _PIECE)]], offset + sent)
            if end == 0:
                raise OSError(errno.EIO, "file is shorter than the response's Content-Length")
        try:
            n = os.write(out_fd, view[start:end])
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(out_fd, select.POLLOUT)
            if not poller.poll(_HOLD_MS):
                break  # a slow reader: the event loop waits for it, not a thread
            continue
        start += n
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


# What a client must take within the stall timeout: small, so the timeout tells a client
# that takes nothing, not one on a slow link (a whole MiB in 60 s was 17 KB/s).
_WATCHED_SLICE = 64 << 10


async def write_watched(response: web.StreamResponse, data: bytes, stall: float) -> None:
    """Write ``data`` through ``response``; TimeoutError when the client takes none of a
    64 KiB slice for ``stall`` seconds."""
    view = memoryview(data)
    for start in range(0, len(view), _WATCHED_SLICE):
        async with asyncio.timeout(stall):
            await response.write(view[start : start + _WATCHED_SLICE])


def _close_after(running: concurrent.futures.Future[Any] | None, *fds: int) -> None:
    """Close ``fds`` now, or once the thread still using them is done (a cancelled wait
    leaves it running, and a descriptor number closed under it could be reused)."""

    def close(_: object = None) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    if running is not None and not running.done():
        running.add_done_callback(close)
    else:
        close()


def _cut_short(request: web.Request, exc: OSError) -> bool:
    """Abort the connection whose body cannot be completed; False for ``send``. A file
    that is short or unreadable is logged (a client that left is not news)."""
    if not isinstance(exc, ConnectionError):
        log.warning("blob body cut short", extra={"error": repr(exc)[:300]})
    if request.transport is not None:
        request.transport.abort()
    return False


async def _through_transport(
    response: web.StreamResponse, in_fd: int, offset: int, count: int, stall: float
) -> None:
    """Owns ``in_fd``: closed when done, or after a read still running when cancelled."""
    end = offset + count
    reading: concurrent.futures.Future[bytes] | None = None
    try:
        while offset < end:
            reading = _POOL.submit(os.pread, in_fd, min(_TLS_PIECE, end - offset), offset)
            piece = await asyncio.wrap_future(reading)
            reading = None
            if not piece:
                raise OSError(errno.EIO, "file is shorter than the response's Content-Length")
            await write_watched(response, piece, stall)
            offset += len(piece)
    finally:
        _close_after(reading, in_fd)


async def send(
    request: web.Request, response: web.StreamResponse, in_fd: int, offset: int, count: int
) -> bool:
    """Send ``count`` bytes of the open file ``in_fd`` from ``offset`` as the body of
    ``response``, whose headers were just sent. Takes ownership of ``in_fd`` (closes it).

    Straight onto the connection's socket by a thread, or through the response when the
    transport must write (TLS). False when the client went away mid-body, took nothing
    for the body idle timeout (a client that stopped reading held the connection and
    its descriptors for good), or the file could not be read to the end (logged): the
    connection is then aborted, as the response cannot be completed.
    """
    stall = services(request).body_idle_seconds
    sock_fd = _socket_fd(request)
    if sock_fd is None:
        try:
            await _through_transport(response, in_fd, offset, count, stall)
        except OSError as exc:
            return _cut_short(request, exc)
        return True
    try:
        out_fd = os.dup(sock_fd)
    except OSError as exc:  # out of descriptors
        os.close(in_fd)
        return _cut_short(request, exc)
    loop = asyncio.get_running_loop()
    running: concurrent.futures.Future[int] | None = None
    try:
        while count > 0:
            running = _POOL.submit(_send_some, out_fd, in_fd, offset, count)
            sent = await asyncio.wrap_future(running)
            running = None
            offset += sent
            count -= sent
            if count > 0:
                await asyncio.wait_for(_writable(loop, out_fd), stall)
    except OSError as exc:
        return _cut_short(request, exc)
    finally:
        _close_after(running, out_fd, in_fd)
    return True
