"""Content-Range (uploads) and Range (blob reads) parsing, pure."""

from __future__ import annotations

import re

from registry_server.protocol import errors

# ASCII digits only (\d and int() also take other scripts' digits), and no more than a
# 64-bit offset has: int() refuses thousands of digits with an error of its own.
_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/([0-9]{1,19}|\*))?\Z")
_RANGE = re.compile(r"^bytes=([0-9]{0,19})-([0-9]{0,19})\Z")


def parse_content_range(value: str) -> tuple[int, int]:
    """``start-end`` (inclusive) of a chunked upload PATCH."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        raise errors.RegistryError(errors.RANGE_INVALID, detail={"Content-Range": value[:100]})
    start, end = int(m.group(1)), int(m.group(2))
    if end < start:
        raise errors.RegistryError(errors.RANGE_INVALID, detail={"Content-Range": value[:100]})
    return start, end


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as (start, end_exclusive); None when it cannot be satisfied."""
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) + 1 if m.group(2) else size
    else:  # suffix range: last N bytes
        start = max(0, size - int(m.group(2)))
        end = size
    end = min(end, size)
    if start >= size or start >= end:
        return None
    return start, end
