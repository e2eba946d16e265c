"""Watching the htpasswd and policy files and rebuilding the Directory when they change.

Kubernetes updates a mounted ConfigMap or Secret by swapping a symlink to a new directory,
so a file is identified by its resolved target as well as device, inode, size and mtime.
A change is applied once it has been seen unchanged by two consecutive polls, so a file
being rewritten in place is not read half-written. A file that fails to parse is refused
with a log line and the last good content stays in force.

A policy split into shards (auth.policy's `shards`) is read as one: the shards are read
from the directory the main file resolves to (one kubelet snapshot), each checked against
the SHA-256 the main file lists. The kubelet updates the Secrets behind a projected volume
one by one as it sees them, so a snapshot may hold a new shard and an old main file, or the
reverse; such a set is *inconsistent*: nothing of it is applied, the last good policy stays,
and the set is read again when any of its files changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from registry_server.auth import htpasswd, metrics
from registry_server.auth import policy as policy_mod
from registry_server.auth.directory import Directory
from registry_server.storage.tasks import cancel_and_wait

log = logging.getLogger("registry_server.auth")

T = TypeVar("T")


class LoadError(Exception):
    """A watched file is missing or invalid."""


class Inconsistent(LoadError):
    """A split policy whose files do not belong together (yet): read again later."""


# A shard is decompressed into memory: refuse what no operator would write.
MAX_SHARD_BYTES = 256 << 20
# At start-up there is no last good policy to keep: wait this long for a consistent set.
STARTUP_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Fingerprint:
    target: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def fingerprint(path: Path) -> Fingerprint | None:
    """The identity of the file behind ``path`` now, or None when it does not exist."""
    try:
        target = os.path.realpath(path)
        st = os.stat(target)
    except OSError:
        return None
    return Fingerprint(target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _decode(path: Path, raw: bytes) -> Any:
    """A JSON (`.json`) or YAML document; `.gz` is gunzipped first."""
    name = path.name
    if name.endswith(".gz"):
        inflater = zlib.decompressobj(wbits=31)  # gzip framing
        try:
            raw = inflater.decompress(raw, MAX_SHARD_BYTES + 1)
        except zlib.error as exc:
            raise LoadError(f"{path}: not valid gzip: {exc}") from None
        if len(raw) > MAX_SHARD_BYTES or not inflater.eof:
            raise LoadError(f"{path}: truncated, or larger than {MAX_SHARD_BYTES} bytes unpacked")
        name = name.removesuffix(".gz")
    is_json = name.endswith(".json")
    try:
        text = raw.decode("utf-8")
        document: Any = json.loads(text) if is_json else yaml.load(text, Loader=_YAML_LOADER)
    except (ValueError, yaml.YAMLError) as exc:
        raise LoadError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from None
    if document is None:
        raise LoadError(f"{path}: the file is empty")
    return document


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from None


class PolicyReader:
    """Reads the policy file and, when it lists shards, the shards with it.

    Parsed shards are kept by digest, so a change to one shard parses that one only.
    """

    def __init__(self) -> None:
        self._shards: dict[str, policy_mod.Policy] = {}
        self._listed: tuple[str, ...] = ()  # shard files of the last main file read

    def fingerprint(self, path: Path) -> Hashable:
        """The main file's identity and that of each shard it listed when last read."""
        base = path.parent
        return (fingerprint(path), tuple(fingerprint(base / name) for name in self._listed))

    def __call__(self, path: Path) -> policy_mod.Policy:
        # The main file's real path is inside one kubelet snapshot (..<timestamp>/):
        # the shards are read from there, not through ..data, which may move meanwhile.
        real = Path(os.path.realpath(path))
        document = _decode(path, _read_bytes(real))
        try:
            main, shards = policy_mod.parse_main(document)
        except policy_mod.PolicyError as exc:
            raise LoadError(f"{path}: {exc}") from None
        self._listed = tuple(ref.file for ref in shards)
        if not shards:
            self._shards = {}
            return main
        parts: list[tuple[str, policy_mod.Policy]] = [(str(path), main)]
        kept: dict[str, policy_mod.Policy] = {}
        for ref in shards:
            shard_path = real.parent / ref.file
            try:
                raw = shard_path.read_bytes()
            except FileNotFoundError:
                raise Inconsistent(f"{path}: shard {ref.file} is not there (yet)") from None
            except OSError as exc:
                raise LoadError(f"cannot read {shard_path}: {exc}") from None
            if hashlib.sha256(raw).hexdigest() != ref.sha256:
                raise Inconsistent(f"{path}: shard {ref.file} does not match its digest (yet)")
            parsed = self._shards.get(ref.sha256)
            if parsed is None:
                try:
                    parsed = policy_mod.parse(_decode(shard_path, raw))
                except policy_mod.PolicyError as exc:
                    raise LoadError(f"{path.parent / ref.file}: {exc}") from None
            kept[ref.sha256] = parsed
            parts.append((str(path.parent / ref.file), parsed))
        try:
            merged = policy_mod.merge(parts)
        except policy_mod.PolicyError as exc:
            raise LoadError(str(exc)) from None
        self._shards = kept
        return merged


def read_policy(path: Path) -> policy_mod.Policy:
    """The policy at `path`, with its shards (one reading, nothing kept between calls)."""
    return PolicyReader()(path)


def read_htpasswd(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read {path}: {exc}") from None
    try:
        return htpasswd.parse(text, str(path))
    except htpasswd.HtpasswdError as exc:
        raise LoadError(str(exc)) from None


class WatchedFile(Generic[T]):
    """One file, the value last loaded from it, and the change-detection state."""

    def __init__(
        self,
        kind: str,
        path: Path,
        reader: Callable[[Path], T],
        identity: Callable[[Path], Hashable] | None = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self._reader = reader
        # What tells a change: the file's fingerprint, or (a split policy) its files'.
        self._identity = identity or fingerprint
        self.value: T | None = None
        self._loaded: Hashable = None
        self._seen: Hashable = None

    def load(self, wait: float = STARTUP_WAIT_SECONDS) -> T:
        """The first load: errors are raised (a server must not start without its policy).
        An inconsistent split policy is read again for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            before = fingerprint(self.path)
            try:
                self.value = self._reader(self.path)
                break
            except Inconsistent as exc:
                if time.monotonic() >= deadline:
                    raise LoadError(f"{exc}; gave up after {wait:.0f} s") from None
                log.info("waiting for a consistent policy", extra={"reason": str(exc)})
                time.sleep(0.2)
        self._remember(before)
        return self.value

    def _remember(self, before: Fingerprint | None) -> None:
        """Note what was just read. The identity is taken after reading (a split policy's
        covers the shards that reading listed); if the main file moved meanwhile, what was
        read may be older than it, so the next settled poll reads again."""
        self._seen = self._identity(self.path)
        self._loaded = self._seen if fingerprint(self.path) == before else None

    def poll(self) -> bool:
        """Reload when the file changed and has settled; True when the value changed."""
        now = self._identity(self.path)
        settled = now == self._seen
        self._seen = now
        if now == self._loaded or not settled:
            return False
        self._loaded = now  # a broken version is reported once, not on every poll
        before = fingerprint(self.path)
        if before is None:
            log.error(
                "auth file disappeared; keeping the last good version",
                extra={"file": str(self.path), "kind": self.kind},
            )
            metrics.RELOADS.labels(self.kind, "error").inc()
            return False
        try:
            value = self._reader(self.path)
        except Inconsistent as exc:
            # Not an error: the kubelet has not caught up with every Secret. Any change to
            # one of the files (the identity covers them all) reads the set again.
            self._remember(before)
            log.info(
                "policy shards do not match the main file yet; keeping the current policy",
                extra={"file": str(self.path), "reason": str(exc)},
            )
            metrics.RELOADS.labels(self.kind, "inconsistent").inc()
            return False
        except LoadError as exc:
            log.error(
                "auth file rejected; keeping the last good version",
                extra={"file": str(self.path), "kind": self.kind, "error": str(exc)},
            )
            metrics.RELOADS.labels(self.kind, "error").inc()
            return False
        self.value = value
        self._remember(before)
        metrics.RELOADS.labels(self.kind, "ok").inc()
        log.info("auth file reloaded", extra={"file": str(self.path), "kind": self.kind})
        return True


class AuthFiles:
    """The configured files and the Directory built from their last good versions."""

    def __init__(
        self,
        htpasswd_path: Path | None,
        policy_path: Path | None,
        interval_seconds: float = 1.0,
    ) -> None:
        self.htpasswd = (
            WatchedFile("htpasswd", htpasswd_path, read_htpasswd) if htpasswd_path else None
        )
        reader = PolicyReader()
        self.policy = (
            WatchedFile("policy", policy_path, reader, reader.fingerprint) if policy_path else None
        )
        self.interval = interval_seconds
        self.directory = Directory.build({}, None)
        self._task: asyncio.Task[None] | None = None

    def load(self) -> Directory:
        users = self.htpasswd.load() if self.htpasswd else {}
        policy = self.policy.load() if self.policy else None
        self.directory = Directory.build(users, policy)
        return self.directory

    def poll(self) -> bool:
        """Check both files once (blocking I/O: run it in a thread); True when rebuilt."""
        changed = False
        for watched in (self.htpasswd, self.policy):
            if watched is not None and watched.poll():
                changed = True
        if changed:
            users = self.htpasswd.value if self.htpasswd and self.htpasswd.value else {}
            policy = self.policy.value if self.policy else None
            self.directory = Directory.build(users, policy)
        return changed

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.poll)
            except Exception:
                log.exception("auth file watcher failed; will retry")
            elapsed = time.monotonic() - started
            if elapsed > self.interval:
                log.warning("auth file poll is slow", extra={"seconds": round(elapsed, 3)})

    async def start(self) -> None:
        if self._task is None and (self.htpasswd or self.policy):
            self._task = asyncio.create_task(self._watch(), name="berth-auth-file-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])
