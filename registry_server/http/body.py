"""Reading request bodies as streams, with truncation and length checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from registry_server.http.context import services
from registry_server.protocol import errors

_CHUNK = 1 << 20


class _BodyIdle(asyncio.TimeoutError):
    """The client sent nothing of its body for the idle timeout. A TimeoutError: after
    the answer, aiohttp drains what is left of the body and takes one as the end of it
    (any other error there it logs as unhandled)."""


class _IdleWatch:
    """Fails the body's reads once one has waited ``seconds`` for the client. Time the
    handler spends on what it read (a slow disk) does not count. One timer per request,
    moved only when it fires, not a timeout per read: a 256 MiB push makes thousands."""

    def __init__(self, request: web.Request, seconds: float) -> None:
        self.request = request
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None
        self.timer = self.loop.call_later(seconds, self._check)

    def _check(self) -> None:
        since = self.waiting_since
        now = self.loop.time()
        if since is not None and now - since >= self.seconds:
            self.request.content.set_exception(_BodyIdle())
            return
        self.timer = self.loop.call_later(
            self.seconds - (now - since) if since is not None else self.seconds, self._check
        )

    def close(self) -> None:
        self.timer.cancel()


def content_length(request: web.Request) -> int | None:
    value = request.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise errors.RegistryError(
            errors.SIZE_INVALID, detail={"Content-Length": value[:30]}
        ) from None
    if length < 0:
        raise errors.RegistryError(errors.SIZE_INVALID, detail={"Content-Length": value[:30]})
    return length


async def stream(
    request: web.Request,
    expected: int | None = None,
    cut_short: errors.ErrorCode = errors.BLOB_UPLOAD_INVALID,
) -> AsyncIterator[bytes]:
    """The body's chunks; raises SIZE_INVALID, or ``cut_short`` when the body stops (a
    reset connection, a truncated chunk, nothing sent for the idle timeout)."""
    declared = content_length(request)
    want = expected if expected is not None else declared
    received = 0
    loop = asyncio.get_running_loop()
    idle = _IdleWatch(request, services(request).body_idle_seconds)
    try:
        while True:
            # The pieces as they were received, one at a time: readany joins all that
            # is buffered into one new bytes (a copy of the body, under the GIL).
            idle.waiting_since = loop.time()
            chunk, chunk_end = await request.content.readchunk()
            idle.waiting_since = None
            if not chunk:
                if chunk_end and not request.content.at_eof():
                    continue  # the end of an HTTP chunk, not of the body
                break
            received += len(chunk)
            if want is not None and received > want:
                raise errors.RegistryError(
                    errors.SIZE_INVALID, detail={"expected": want, "received": received}
                )
            yield chunk
    except _BodyIdle:
        raise errors.RegistryError(
            cut_short, detail={"reason": f"no body data for {idle.seconds:g} s"}
        ) from None
    except (ConnectionError, web.HTTPException) as exc:
        raise errors.RegistryError(
            cut_short, detail={"reason": f"body read failed: {type(exc).__name__}"}
        ) from exc
    except Exception as exc:  # aiohttp payload errors (truncated body) have no common base
        if isinstance(exc, errors.RegistryError):
            raise
        raise errors.RegistryError(
            cut_short, detail={"reason": f"body read failed: {type(exc).__name__}"}
        ) from exc
    finally:
        idle.close()
    if want is not None and received != want:
        raise errors.RegistryError(
            errors.SIZE_INVALID, detail={"expected": want, "received": received}
        )


async def read_limited(
    request: web.Request,
    limit: int,
    too_large: errors.ErrorCode = errors.MANIFEST_TOO_LARGE,
    cut_short: errors.ErrorCode = errors.MANIFEST_INVALID,
) -> bytes:
    """A small body (a manifest, a form, a replication message) read whole, refusing more
    than ``limit`` bytes before reading any when the length is declared, else as soon as
    the limit is passed. Every body read into memory goes through here."""
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise errors.RegistryError(too_large, detail={"size": declared, "limit": limit})
    parts: list[bytes] = []
    total = 0
    async for chunk in stream(request, cut_short=cut_short):
        total += len(chunk)
        if total > limit:
            raise errors.RegistryError(too_large, detail={"size": total, "limit": limit})
        parts.append(chunk)
    return b"".join(parts)
