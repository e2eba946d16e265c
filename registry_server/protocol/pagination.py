"""``n``/``last`` pagination and the RFC 5988 Link header (pure)."""

from __future__ import annotations

from urllib.parse import urlencode

from registry_server.protocol import errors

MAX_PAGE = 10_000


def parse_n(value: str | None, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    # ASCII digits only: int() would also take signs, spaces, "_" and other scripts' digits.
    if not (value.isascii() and value.isdigit()):
        raise errors.RegistryError(errors.PAGINATION_INVALID, detail={"n": value[:20]})
    # Any longer number is past the page limit anyway (and int() refuses thousands of digits).
    return min(int(value[:9]) if len(value) <= 9 else MAX_PAGE, MAX_PAGE)


def link_header(path: str, n: int, last: str, extra: dict[str, str] | None = None) -> str:
    query = {"n": str(n), "last": last, **(extra or {})}
    return f'<{path}?{urlencode(query)}>; rel="next"'
