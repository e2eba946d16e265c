"""Repository path patterns: what a Repository's `spec.path` may name (pure).

The grammar is the server's policy's (docs/auth.md): `*` matches within one path
component, `**` across components, `?` one character other than `/`; everything else is
literal. A path without a wildcard names one repository. The server matches them itself
(the operator writes the pattern into the policy); the operator needs them to tell which
Repositories claim the same repositories: `overlap` decides whether two patterns can
name one repository at all.
"""

from __future__ import annotations

import functools
import re

# Tokens of a pattern: a literal character, or one of these.
_ONE = "?"  # one character, not "/"
_RUN = "*"  # any characters but "/", none included
_ANY = "**"  # any characters, "/" and none included


def is_pattern(path: str) -> bool:
    return "*" in path or "?" in path


def first_component(path: str) -> str:
    """The first component when it is literal ("" when it holds a wildcard): claims whose
    first components differ cannot overlap, which keeps comparing them cheap."""
    first = path.split("/", 1)[0]
    return "" if is_pattern(first) else first


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    out = []
    for token in _tokens(pattern):
        if token == _ANY:
            out.append(".*")
        elif token == _RUN:
            out.append("[^/]*")
        elif token == _ONE:
            out.append("[^/]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out) + r"\Z")


def matches(pattern: str, name: str) -> bool:
    if not is_pattern(pattern):
        return pattern == name
    return _compiled(pattern).match(name) is not None


@functools.lru_cache(maxsize=4096)
def _tokens(pattern: str) -> tuple[str, ...]:
    tokens = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            tokens.append(_ANY)
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1
    return tuple(tokens)


def _one_char(a: str, b: str) -> bool:
    """Whether tokens `a` and `b` can both produce some one character."""
    if a == _ANY or b == _ANY:
        return True
    wild_a, wild_b = a in (_ONE, _RUN), b in (_ONE, _RUN)
    if wild_a and wild_b:
        return True
    if wild_a:
        return b != "/"
    if wild_b:
        return a != "/"
    return a == b


def overlap(a: str, b: str) -> bool:
    """Whether some repository name matches both patterns (exact paths included)."""
    if not is_pattern(a):
        return matches(b, a)
    if not is_pattern(b):
        return matches(a, b)
    ta, tb = _tokens(a), _tokens(b)

    @functools.cache
    def meet(i: int, j: int) -> bool:
        if i == len(ta) and j == len(tb):
            return True
        x = ta[i] if i < len(ta) else None
        y = tb[j] if j < len(tb) else None
        # A run matches nothing at all, too.
        if x in (_RUN, _ANY) and meet(i + 1, j):
            return True
        if y in (_RUN, _ANY) and meet(i, j + 1):
            return True
        if x is None or y is None or not _one_char(x, y):
            return False
        # Both take one character; a run may take more and stays where it is.
        ni = i if x in (_RUN, _ANY) else i + 1
        nj = j if y in (_RUN, _ANY) else j + 1
        return (ni, nj) != (i, j) and meet(ni, nj)

    return meet(0, 0)
