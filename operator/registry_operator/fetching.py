"""Calls to the registry servers themselves (never the API server): whether the server
accepts a new credential yet, and its replication status. Synchronous (urllib); callers
run them in worker threads.

The operator reaches a registry through its Service, `http://<name>.<namespace>.svc:5000`,
as any in-cluster client does. Where that name does not resolve (an operator run outside
the cluster, the tests here, which have no Service networking), an overrides file maps
`namespace/name` to a URL: JSON, `{"registries/main": "http://127.0.0.1:5000"}`, named by
`--endpoint-overrides` (`BERTH_ENDPOINT_OVERRIDES`) and read again whenever it changes.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry_operator import access, status
from registry_operator.rendering import names

TIMEOUT = 5.0
STATUS_PATH = "/berth/v1/replication/status"


class Endpoints:
    """Where the operator reaches each registry's server."""

    def __init__(self, overrides: str | None = None) -> None:
        self._path = Path(overrides) if overrides else None
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._map: dict[str, str] = {}

    def _overrides(self) -> Mapping[str, str]:
        if self._path is None:
            return {}
        with self._lock:
            try:
                stat = self._path.stat()
            except OSError:
                return {}
            stamp = (stat.st_mtime, stat.st_size)
            if stamp != self._stamp:
                try:
                    loaded = json.loads(self._path.read_text())
                except (OSError, ValueError):
                    loaded = None  # half-written: keep the last good map, read again later
                else:
                    self._stamp = stamp
                if isinstance(loaded, dict):
                    self._map = {str(k): str(v).rstrip("/") for k, v in loaded.items()}
            return self._map

    def url(self, namespace: str, name: str) -> str:
        return self._overrides().get(f"{namespace}/{name}") or names.in_cluster_url(name, namespace)


def _get(url: str, username: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


def probe(url: str, username: str, password: str) -> str:
    """Whether the server at `url` accepts the credential (access.ACCEPTED/REFUSED/UNREACHABLE)."""
    try:
        code, _ = _get(f"{url}/v2/", username, password)
    except (OSError, ValueError):
        return access.UNREACHABLE
    if code == 200:
        return access.ACCEPTED
    if code in (401, 403, 429):
        return access.REFUSED
    return access.UNREACHABLE


def replication_status(url: str, username: str, password: str) -> status.ReplicationObservation:
    try:
        code, body = _get(f"{url}{STATUS_PATH}", username, password)
    except (OSError, ValueError) as exc:
        return status.ReplicationObservation(error=f"GET {url}{STATUS_PATH}: {exc}")
    if code != 200:
        return status.ReplicationObservation(error=f"GET {url}{STATUS_PATH} answered {code}")
    try:
        payload: Any = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return status.ReplicationObservation(error=f"GET {url}{STATUS_PATH}: not a JSON object")
    return status.ReplicationObservation(payload=payload)
