"""Watching the htpasswd and policy files and rebuilding the Directory when they change.

Kubernetes updates a mounted ConfigMap or Secret by swapping a symlink to a new directory,
so a file is identified by its resolved target as well as device, inode, size and mtime.
A change is applied once it has been seen unchanged by two consecutive polls, so a file
being rewritten in place is not read half-written. A file that fails to parse is refused
with a log line and the last good content stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from registry_server.auth import htpasswd, metrics
from registry_server.auth import policy as policy_mod
from registry_server.auth.directory import Directory

log = logging.getLogger("registry_server.auth")

T = TypeVar("T")


class LoadError(Exception):
    """A watched file is missing or invalid."""


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


def read_policy(path: Path) -> policy_mod.Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read {path}: {exc}") from None
    try:
        document: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise LoadError(f"{path}: not valid {kind}: {exc}") from None
    if document is None:
        raise LoadError(f"{path}: the file is empty")
    try:
        return policy_mod.parse(document)
    except policy_mod.PolicyError as exc:
        raise LoadError(f"{path}: {exc}") from None


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

    def __init__(self, kind: str, path: Path, reader: Callable[[Path], T]) -> None:
        self.kind = kind
        self.path = path
        self._reader = reader
        self.value: T | None = None
        self._loaded: Fingerprint | None = None
        self._seen: Fingerprint | None = None

    def load(self) -> T:
        """The first load: errors are raised (a server must not start without its policy)."""
        self._seen = self._loaded = fingerprint(self.path)
        self.value = self._reader(self.path)
        return self.value

    def poll(self) -> bool:
        """Reload when the file changed and has settled; True when the value changed."""
        now = fingerprint(self.path)
        settled = now == self._seen
        self._seen = now
        if now == self._loaded or not settled:
            return False
        self._loaded = now  # a broken version is reported once, not on every poll
        if now is None:
            log.error(
                "auth file disappeared; keeping the last good version",
                extra={"file": str(self.path), "kind": self.kind},
            )
            metrics.RELOADS.labels(self.kind, "error").inc()
            return False
        try:
            value = self._reader(self.path)
        except LoadError as exc:
            log.error(
                "auth file rejected; keeping the last good version",
                extra={"file": str(self.path), "kind": self.kind, "error": str(exc)},
            )
            metrics.RELOADS.labels(self.kind, "error").inc()
            return False
        self.value = value
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
        self.policy = WatchedFile("policy", policy_path, read_policy) if policy_path else None
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
