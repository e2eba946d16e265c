"""Tag lists kept in memory per repository, each valid for one tag-list version.

A listing of a repository with thousands of tags costs a query of every name and their
serialisation, at every request; the list changes only on a tag's push, move or delete,
which the index counts per repository (``tag_list_version``). A request asks the index
for that version (one row by the repository's name) and serves the kept list while it
holds: the whole list as the bytes already serialised, a page as a slice of it. Every
replica and worker reads the version from the shared index, so none serves a list
another one changed. The lists kept are bounded by their total count of names, the
least recently used dropped first.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass, field

# About 6 MB of names at the common tag length, in each worker.
MAX_NAMES = 200_000


@dataclass
class TagList:
    version: tuple[int, int]
    names: list[str]  # sorted, as the index lists them
    _body: bytes | None = field(default=None, repr=False)

    def body(self, repo: str) -> bytes:
        """The whole list as the tags/list response body, serialised once."""
        if self._body is None:
            self._body = json.dumps({"name": repo, "tags": self.names}).encode()
        return self._body

    def page(self, n: int | None, last: str | None) -> list[str]:
        """The names after ``last``, at most ``n`` of them: the index's own answer to
        the same query (names compare by code point, as the index orders them)."""
        start = 0 if last is None else bisect.bisect_right(self.names, last)
        end = len(self.names) if n is None else start + max(n, 0)
        return self.names[start:end]


class TagListCache:
    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self.max_names = max_names
        self._lists: OrderedDict[str, TagList] = OrderedDict()
        self._names = 0

    def get(self, repo: str, version: tuple[int, int]) -> TagList | None:
        found = self._lists.get(repo)
        if found is None or found.version != version:
            return None
        self._lists.move_to_end(repo)
        return found

    def put(self, repo: str, version: tuple[int, int], names: list[str]) -> TagList:
        kept = TagList(version, names)
        old = self._lists.pop(repo, None)
        if old is not None:
            self._names -= len(old.names)
        if len(names) > self.max_names:
            return kept  # served once, not kept
        self._lists[repo] = kept
        self._names += len(names)
        while self._names > self.max_names:
            _, dropped = self._lists.popitem(last=False)
            self._names -= len(dropped.names)
        return kept
