"""Blob GET/HEAD/DELETE: served from local storage by a thread writing onto the socket
(streamed from remote storage, or redirected to it), honouring Range."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from registry_server.http import file_bodies
from registry_server.http.context import services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import digests, errors, ranges
from registry_server.storage.driver import StorageNotFound

log = logging.getLogger("registry_server.http")


def _headers(digest: digests.Digest) -> dict[str, str]:
    return {
        **API_VERSION_HEADER,
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }


class _CacheSink:
    """The response a pull-through fetch streams into while it stores the blob."""

    def __init__(self, request: web.Request, digest: digests.Digest) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers=_headers(digest))

    async def start(self, size: int) -> None:
        self.response.headers["Content-Length"] = str(size)
        await self.response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        await self.response.write(chunk)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        if not await file_bodies.send(self.request, self.response, os.dup(fd), offset, count):
            # The connection is aborted (the client left, or the file could not be read):
            # the follower stops.
            raise ConnectionAbortedError("the blob's body was cut short")


async def get_blob(request: web.Request, name: str, digest_text: str) -> web.StreamResponse:
    svc = services(request)
    digest = digests.parse(digest_text)
    if svc.pull_through is not None:
        # A whole GET may be the one that fetches (and gets the bytes as they come);
        # HEAD and Range wait for the blob to be stored and are served from it.
        whole = request.method == "GET" and not request.headers.get("Range")
        sink = _CacheSink(request, digest) if whole else None
        try:
            if await svc.pull_through.blob(name, digest, sink):
                assert sink is not None
                await sink.response.write_eof()
                return sink.response
        except Exception:
            if sink is not None and sink.response.prepared:
                # Headers are out: the only way to say "failed" is to cut the body short.
                if request.transport is not None:
                    request.transport.abort()
                return sink.response
            raise
        if sink is not None and sink.response.prepared:
            # The fetch went on without this client (its writes stalled): its body stays
            # short, and no second response may follow the first one's headers.
            if request.transport is not None:
                request.transport.abort()
            return sink.response
    size = await svc.blobs.size(name, digest)
    headers = _headers(digest)
    start, end = 0, size
    status = 200
    range_header = request.headers.get("Range")
    if range_header:
        wanted = ranges.parse_range(range_header, size)
        if wanted is None:
            raise errors.RegistryError(
                errors.RANGE_INVALID,
                detail={"Range": range_header[:100], "size": size},
                headers={"Content-Range": f"bytes */{size}"},
            )
        start, end = wanted
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    if any(tag.value in (str(digest), "*") for tag in request.if_none_match or ()):
        del headers["Content-Length"]
        headers.pop("Content-Range", None)
        return web.Response(status=304, headers=headers)

    # storage.s3.redirect: the client fetches the bytes (and its Range) from the store.
    location = await svc.blobs.redirect_url(digest)
    if location is not None:
        return web.Response(
            status=307,
            headers={
                **API_VERSION_HEADER,
                "Docker-Content-Digest": str(digest),
                "Location": location,
                "Content-Length": "0",
            },
        )
    path = svc.blobs.local_path(digest)
    fd = None
    if path is not None:
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            raise errors.RegistryError(
                errors.BLOB_UNKNOWN, detail={"digest": str(digest)}
            ) from None
    first: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None
    if fd is None:
        # Streamed from the store: its first bytes before the headers, so that a store
        # that cannot be reached is answered as an error (503), not a body cut short.
        chunks = svc.blobs.read(digest, start, end - start)
        try:
            first = await anext(chunks, b"")
        except StorageNotFound:  # recorded, but not in the store (as for a missing file)
            raise errors.RegistryError(
                errors.BLOB_UNKNOWN, detail={"digest": str(digest)}
            ) from None
    response = web.StreamResponse(status=status, headers=headers)
    try:
        await response.prepare(request)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    try:
        if first is not None and chunks is not None:
            await _streamed(response, first, chunks, end - start, svc.body_idle_seconds)
        elif fd is not None and not await file_bodies.send(
            request, response, fd, start, end - start
        ):
            return response  # cut short: the client is gone, or the file was
    except Exception as exc:
        # The headers are out: the only way left to say "failed" is to cut the body
        # short (the client sees fewer bytes than Content-Length), never to hang.
        log.warning("blob body cut short", extra={"digest": str(digest), "error": repr(exc)[:300]})
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


async def _streamed(
    response: web.StreamResponse,
    first: bytes,
    chunks: AsyncIterator[bytes],
    length: int,
    stall: float,
) -> None:
    """The body from the store: each write must make progress within ``stall`` seconds
    (a client that stopped reading held the store's connection, of a small pool, for
    good), and all of ``length`` must come (a short object ended a response cleanly)."""
    sent = 0
    piece: bytes | None = first
    while piece is not None:
        await file_bodies.write_watched(response, piece, stall)
        sent += len(piece)
        piece = await anext(chunks, None)
    if sent != length:
        raise OSError(errno.EIO, f"the store gave {sent} of {length} bytes")


async def delete_blob(request: web.Request, name: str, digest_text: str) -> web.StreamResponse:
    svc = services(request)
    await svc.blobs.delete(name, digests.parse(digest_text))
    return web.Response(status=202, headers={**API_VERSION_HEADER, "Content-Length": "0"})
