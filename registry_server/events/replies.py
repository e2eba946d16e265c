"""Reading the replies of peers and webhook receivers within a bound.

A peer or a receiver is another server, so its reply can be of any size; none is read
into memory past the limit its use needs.
"""

from __future__ import annotations

import aiohttp

# Replies whose body is not used (or only quoted in an error message).
SMALL = 64 * 1024
_CHUNK = 64 * 1024


async def read(response: aiohttp.ClientResponse, limit: int = SMALL) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more (left unread: the
    connection is then closed rather than reused)."""
    if response.content_length is not None and response.content_length > limit:
        return b"", True
    parts: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > limit:
            parts.append(chunk[: len(chunk) - (total - limit)])
            return b"".join(parts), True
        parts.append(chunk)
    return b"".join(parts), False
