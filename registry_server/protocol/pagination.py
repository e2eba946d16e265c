"""``n``/``last`` pagination and the RFC 5988 Link header (pure)."""

from __future__ import annotations

from urllib.parse import urlencode

from registry_server.protocol import errors

MAX_PAGE = 10_000
_MAX_NAME = 4096  # longer than any repository name or tag


def parse_n(value: str | None, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    # ASCII digits only: int() would also take signs, spaces, "_" and other scripts' digits.
    if not (value.isascii() and value.isdigit()):
        raise errors.RegistryError(errors.PAGINATION_INVALID, detail={"n": value[:20]})
    # Any longer number is past the page limit anyway (and int() refuses thousands of
    # digits); leading zeros do not make it longer ("0000000000" is 0).
    digits = value.lstrip("0") or "0"
    return min(int(digits) if len(digits) <= 9 else MAX_PAGE, MAX_PAGE)


def parse_last(value: str | None) -> str | None:
    """The name a page starts after. NUL is in no name, and PostgreSQL refuses it in a
    query (it was a 500); a value longer than any name is cut, nothing sorts between."""
    if value is None or value == "":
        return None
    if "\x00" in value:
        raise errors.RegistryError(errors.PAGINATION_INVALID, detail={"last": value[:20]})
    return value[:_MAX_NAME]


def link_header(path: str, n: int, last: str, extra: dict[str, str] | None = None) -> str:
    query = {"n": str(n), "last": last, **(extra or {})}
    return f'<{path}?{urlencode(query)}>; rel="next"'
