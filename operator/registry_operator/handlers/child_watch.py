"""Watch the children's metadata, one thread per kind, and hand the events to the loop.

Each thread lists its kind (metadata only, in pages), then watches from the list's
version, with bookmarks, and lists again when the version has expired. The listing
itself asks for nothing: the Registries' resume handlers reconcile every Registry after
a start. Events are acted on only while Kopf's handlers run (`kopf_toggles.handling`):
before Kopf has indexed every Registry, a reconcile could not yet see every node port
claim; while a peer of higher priority is active, the children are that peer's to mend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from registry_operator import kopf_toggles
from registry_operator.handlers import children, runtime
from registry_operator.kube import errors

log = logging.getLogger(__name__)

WATCH_SECONDS = 300  # the server ends each watch after this; the thread watches again
BACKOFF_MAX = 30.0

Deliver = Callable[[str, str, Mapping[str, Any]], None]


class ChildWatch:
    def __init__(
        self,
        state: runtime.Runtime,
        loop: asyncio.AbstractEventLoop,
        kinds: tuple[tuple[str, str], ...] = children.WATCHED,
        namespaces: Sequence[str] = (),
    ) -> None:
        """`namespaces`: watch only these (the operator's `--namespace`); empty: all."""
        self.state = state
        self.loop = loop
        self.kinds = kinds
        self.namespaces: tuple[str | None, ...] = tuple(namespaces) or (None,)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: dict[tuple[str, str | None], Any] = {}  # (kind, namespace) -> response
        self._lock = threading.Lock()

    def start(self) -> None:
        for api_version, kind in self.kinds:
            for namespace in self.namespaces:
                thread = threading.Thread(
                    target=self._run,
                    args=(api_version, kind, namespace),
                    name=f"watch {kind}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            responses = list(self._open.values())
        for response in responses:
            try:
                response.shutdown()  # wakes the thread blocked reading it
            except (AttributeError, OSError):
                response.close()
        for thread in self._threads:
            thread.join(timeout)

    def deliver(self, kind: str, type: str, meta: Mapping[str, Any]) -> None:
        """On the loop: act on one event, when Kopf's handlers run."""
        if kopf_toggles.handling():
            children.changed(self.state, kind, type, meta)

    def _run(self, api_version: str, kind: str, namespace: str | None) -> None:
        kube = self.state.kube
        version = ""
        listed_before = False
        pause = 1.0
        while not self._stop.is_set():
            try:
                if not version:
                    found, version = kube.list_metadata(
                        api_version, kind, children.SELECTOR, namespace
                    )
                    if listed_before:
                        # Events were lost (the version expired): the Registries named
                        # are reconciled, as a missed event would have made them.
                        for meta in found:
                            self._post(kind, "MODIFIED", meta)
                    listed_before = True
                    del found
                for type, meta in kube.watch_metadata(
                    api_version,
                    kind,
                    version,
                    children.SELECTOR,
                    WATCH_SECONDS,
                    opened=lambda response: self._opened((kind, namespace), response),
                    namespace=namespace,
                ):
                    version = str(meta.get("resourceVersion") or version)
                    if type != "BOOKMARK":
                        self._post(kind, type, meta)
                pause = 1.0
            except errors.Expired:
                version = ""
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("watching %s failed, again in %.0f s: %s", kind, pause, exc)
                self._stop.wait(pause)
                pause = min(BACKOFF_MAX, pause * 2)
            finally:
                with self._lock:
                    self._open.pop((kind, namespace), None)

    def _opened(self, key: tuple[str, str | None], response: Any) -> None:
        with self._lock:
            self._open[key] = response
        if self._stop.is_set():
            response.close()

    def _post(self, kind: str, type: str, meta: Mapping[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.deliver, kind, type, meta)
        except RuntimeError:  # the loop is closed: the operator is ending
            self._stop.set()
