"""``n``/``last`` pagination and the RFC 5988 Link header (pure)."""

from __future__ import annotations

from urllib.parse import urlencode

from registry_server.protocol import errors

MAX_PAGE = 10_000


def parse_n(value: str | None, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise errors.RegistryError(errors.PAGINATION_INVALID, detail={"n": value[:20]}) from None
    if n < 0:
        raise errors.RegistryError(errors.PAGINATION_INVALID, detail={"n": value[:20]})
    return min(n, MAX_PAGE)


def link_header(path: str, n: int, last: str, extra: dict[str, str] | None = None) -> str:
    query = {"n": str(n), "last": last, **(extra or {})}
    return f'<{path}?{urlencode(query)}>; rel="next"'
