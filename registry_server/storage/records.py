"""The tag record: a durable per-repository journal next to the blobs, from which the
SQLite index can be rebuilt (``registry_server.maintenance``).

Manifests live only in the index, and tags only there too; each repository therefore
keeps ``<root>/records/<sha256 of its name>.jsonl`` (a name of up to 255 characters
would not fit a file name), one JSON line per change, each naming its repository,
appended and fdatasync'ed after the index committed it and before the client is answered:

- ``{"op": "manifest", "digest", "media_type", "content": base64}`` - a manifest stored;
- ``{"op": "delete_manifest", "digest"}``;
- ``{"op": "tag", "tag", "digest" (null: deleted), "version", "origin"}`` - a tag's state
  as the index holds it after the change, with its version: replayed, the highest version
  wins (the index's own rule), so lines of concurrent pushes may land in any order.

One append per push, no read of the file. Appends to one file that arrive while its
fdatasync runs share the next one (group commit): concurrent pushes into a repository
cost one sync per round, not one each. Retention's removals are recorded too (else
``check`` found the record ahead of the index after each round, and a rebuild brought
back expired tags whose layers were collected).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry_server.protocol import errors, manifests, versions
from registry_server.protocol.versions import Stamp
from registry_server.storage.driver import StorageFull
from registry_server.storage.index import TagState
from registry_server.storage.space import full_as_storage_full

log = logging.getLogger("registry_server.storage")

RECORDS_DIR = "records"
_SUFFIX = ".jsonl"


@dataclass
class RecordedManifest:
    digest: str
    media_type: str
    content: bytes


@dataclass
class RepositoryState:
    """A repository as its record says: manifests, and each tag's winning state."""

    manifests: dict[str, RecordedManifest] = field(default_factory=dict)
    tags: dict[str, TagState] = field(default_factory=dict)

    def live_tags(self) -> dict[str, str]:
        return {
            name: state.digest
            for name, state in self.tags.items()
            if state.digest is not None and state.digest in self.manifests
        }


@dataclass
class _Syncs:
    """One record file's group commit: appends are numbered as they complete, and a sync
    started after append n makes every append up to n durable."""

    written: int = 0
    synced: int = 0
    running: asyncio.Future[None] | None = None


class TagRecord:
    def __init__(self, root: Path) -> None:
        self.dir = root / RECORDS_DIR
        self._syncs: dict[Path, _Syncs] = {}

    def path(self, repo: str) -> Path:
        return self.dir / (hashlib.sha256(repo.encode()).hexdigest() + _SUFFIX)

    def _write_sync(self, path: Path, data: bytes) -> None:
        with full_as_storage_full():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the first record of all: no directory yet
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # One write of O_APPEND: lines of two writers never mix.
                if os.write(fd, data) != len(data):
                    # A short write (the volume filled): what it wrote stays as a torn
                    # line, which the next append's leading newline closes off.
                    raise OSError(errno.ENOSPC, "short write to the tag record")
            finally:
                os.close(fd)

    @staticmethod
    def _encode(repo: str, lines: list[dict[str, Any]]) -> bytes:
        # Each append starts on a line of its own: a torn last line (a crash or a full
        # volume mid-append) would otherwise swallow the first line appended after it.
        encoded = (json.dumps({"repo": repo, **line}, separators=(",", ":")) for line in lines)
        return ("\n" + "".join(f"{text}\n" for text in encoded)).encode()

    def append_blocking(self, repo: str, lines: list[dict[str, Any]]) -> None:
        """Append durably from a thread of its own (maintenance commands)."""
        path = self.path(repo)
        self._write_sync(path, self._encode(repo, lines))
        self._datasync(path)

    def rewrite_blocking(
        self, repo: str, lines: list[dict[str, Any]], durable: bool = True
    ) -> None:
        """Replace the repository's record whole (maintenance commands, with no server
        appending to it); durably, or leaving the flush to the caller (one ``sync`` for
        many files)."""
        path = self.path(repo)
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        self._write_sync(partial, self._encode(repo, lines))
        if durable:
            self._datasync(partial)
        os.replace(partial, path)
        if durable:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)

    @staticmethod
    def _datasync(path: Path) -> None:
        # Any descriptor of the file will do: the sync is of the file's pages.
        with full_as_storage_full():
            fd = os.open(path, os.O_WRONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    async def _sync(self, path: Path, syncs: _Syncs) -> None:
        """One fdatasync, covering every append counted when it began."""
        covered = syncs.written
        try:
            await asyncio.to_thread(self._datasync, path)
            syncs.synced = max(syncs.synced, covered)
        finally:
            syncs.running = None

    async def _durable(self, path: Path, syncs: _Syncs, ticket: int) -> None:
        """Return once a sync started after append ``ticket`` has completed: the one
        running if it began after it, else the next, which one of its waiters starts."""
        while syncs.synced < ticket:
            if syncs.running is None:
                syncs.running = asyncio.ensure_future(self._sync(path, syncs))
            # Shielded: a waiter that goes away does not stop the others' sync.
            await asyncio.shield(syncs.running)

    async def append(self, repo: str, lines: list[dict[str, Any]]) -> None:
        """Append durably. A full volume does not fail a delete that is already committed:
        it is logged, and ``check`` reports the record behind the index."""
        data = self._encode(repo, lines)
        path = self.path(repo)
        syncs = self._syncs.setdefault(path, _Syncs())
        try:
            await asyncio.to_thread(self._write_sync, path, data)
            syncs.written += 1
            await self._durable(path, syncs, syncs.written)
        except StorageFull:
            log.warning("tag record not written: storage full", extra={"repository": repo})
        finally:
            if syncs.running is None and syncs.synced >= syncs.written:
                self._syncs.pop(path, None)

    async def manifest(
        self, repo: str, digest: str, media_type: str, content: bytes, tags: Sequence[TagState]
    ) -> None:
        line = {
            "op": "manifest",
            "digest": digest,
            "media_type": media_type,
            "content": base64.b64encode(content).decode(),
        }
        await self.append(repo, [line, *(_tag_line(t) for t in tags)])

    async def deleted(self, repo: str, digest: str | None, tags: Sequence[TagState]) -> None:
        await self.removed(repo, [digest] if digest is not None else [], tags)

    async def removed(self, repo: str, digests: Sequence[str], tags: Sequence[TagState]) -> None:
        """Manifests deleted and tags removed (a delete; retention's expiry)."""
        lines = [{"op": "delete_manifest", "digest": digest} for digest in digests]
        await self.append(repo, lines + [_tag_line(t) for t in tags])

    # -- reading (maintenance commands, blocking) ------------------------------------------

    def repositories(self) -> Iterator[str]:
        if not self.dir.is_dir():
            return
        names = set()
        for entry in self.dir.iterdir():
            if entry.name.endswith(_SUFFIX):
                name = _first_repository(entry)
                if name is not None:
                    names.add(name)
        yield from sorted(names)

    def replay(self, repo: str) -> RepositoryState:
        state = RepositoryState()
        removed: dict[str, RecordedManifest] = {}
        with open(self.path(repo), "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue  # the newline each append starts with
                try:
                    line = json.loads(raw)
                except ValueError:  # a torn line (a crash mid-append): nothing acked
                    continue
                op = line.get("op")
                if op == "manifest":
                    content = base64.b64decode(line["content"])
                    state.manifests[line["digest"]] = RecordedManifest(
                        line["digest"], line["media_type"], content
                    )
                elif op == "delete_manifest":
                    gone = state.manifests.pop(line["digest"], None)
                    if gone is not None:
                        removed[gone.digest] = gone
                elif op == "tag":
                    tag = TagState(line["tag"], line["digest"], line["version"], line["origin"])
                    held = state.tags.get(tag.name)
                    stamp = Stamp(tag.version, tag.origin)
                    if held is None or not versions.wins(Stamp(held.version, held.origin), stamp):
                        state.tags[tag.name] = tag
        _restore_held(state, removed)
        return state


def _restore_held(state: RepositoryState, removed: dict[str, RecordedManifest]) -> None:
    """Bring back deleted manifests that a live tag, or an index held by one, still
    needs. Lines are appended after their commits, from several workers, so a push of a
    digest again can be written before the delete it followed in the index; a delete
    that really happened tombstoned its tags in the same line group. Without this, a
    rebuild dropped a manifest the index held (found by review)."""
    wanted = [state.tags[name].digest for name in state.tags]
    seen: set[str] = set()
    while wanted:
        digest = wanted.pop()
        if digest is None or digest in seen:
            continue
        seen.add(digest)
        found = state.manifests.get(digest)
        if found is None and digest in removed:
            found = state.manifests[digest] = removed[digest]
        if found is None:
            continue
        try:
            children = manifests.parse(found.content, found.media_type).children
        except errors.RegistryError:  # stored as pushed; what it lists is not ours to judge
            continue
        wanted.extend(str(child.digest) for child in children)


def _first_repository(path: Path) -> str | None:
    """The repository a record file belongs to, from its first readable line."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                name = json.loads(raw).get("repo")
            except ValueError:
                continue
            if isinstance(name, str):
                return name
    return None


def _tag_line(tag: TagState) -> dict[str, Any]:
    return {
        "op": "tag",
        "tag": tag.name,
        "digest": tag.digest,
        "version": tag.version,
        "origin": tag.origin,
    }
