"""Calls to the registry servers themselves (never the API server): whether the server
has a new credential yet, and its replication status. Synchronous (urllib); callers
run them in worker threads.

The operator reaches a registry through its Service, `https://<name>.<namespace>.svc:5000`
(`http://` with spec.tls Disabled), as any in-cluster client does, and verifies the
server's certificate against the Registry's own CA (`Trust`), never the system's. Where
that name does not resolve (an operator run outside the cluster, the tests here, which
have no Service networking), an overrides file maps `namespace/name` to a URL: JSON,
`{"registries/main": "https://127.0.0.1:5000"}`, named by `--endpoint-overrides`
(`BERTH_ENDPOINT_OVERRIDES`) and read again whenever it changes. The certificate is
verified for the override's host then (the generated one names 127.0.0.1 and localhost).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry_operator import access, robots, status, usage
from registry_operator.rendering import names

TIMEOUT = 5.0
STATUS_PATH = "/berth/v1/replication/status"
CREDENTIALS_PATH = "/berth/v1/auth/credentials"
USAGE_PATH = "/berth/v1/usage"
USAGE_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class Trust:
    """How clients in the cluster reach a Registry's server: its scheme, and the CA its
    certificate is verified against (None: plain HTTP, or no CA known yet, in which case
    nothing is trusted and the calls fail until the reconcile has made one)."""

    scheme: str = "https"
    ca_pem: str | None = None

    def context(self) -> ssl.SSLContext | None:
        if self.scheme != "https":
            return None
        return _context(self.ca_pem or "")


@functools.lru_cache(maxsize=256)
def _context(ca_pem: str) -> ssl.SSLContext:
    """A client context trusting `ca_pem` alone (no system CAs), names verified."""
    if ca_pem:
        # Only the Registry's CA: a certificate from any public CA is not this server.
        context = ssl.create_default_context(cadata=ca_pem)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing: fails closed
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Endpoints:
    """Where the operator reaches each registry's server, and how it verifies it."""

    def __init__(self, overrides: str | None = None) -> None:
        self._path = Path(overrides) if overrides else None
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._map: dict[str, str] = {}
        self._trust: dict[tuple[str, str], Trust] = {}

    def remember(self, namespace: str, name: str, trust: Trust | None) -> None:
        """What the last reconcile found (None: forget it, the Registry is gone)."""
        if trust is None:
            self._trust.pop((namespace, name), None)
        else:
            self._trust[(namespace, name)] = trust

    def trust(self, namespace: str, name: str) -> Trust | None:
        return self._trust.get((namespace, name))

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

    def url(self, namespace: str, name: str, scheme: str = "https") -> str:
        found = self._overrides().get(f"{namespace}/{name}")
        return found or names.in_cluster_url(name, namespace, scheme)


def _get(
    url: str, username: str, password: str, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


def fingerprint(secret_hash: str) -> str:
    """The server's digest of a stored hash (registry_server.auth.configured's
    `secret_fingerprint`; the two packages do not import each other, a test pins it)."""
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


def probe(
    url: str,
    admin: tuple[str, str] | None,
    credential: robots.Credential,
    context: ssl.SSLContext | None = None,
) -> str:
    """Whether the server at `url` has the credential yet (access.ACCEPTED/REFUSED/UNREACHABLE).

    Asked with the admin account: which hash the server holds for the account. Trying
    the new secret instead would be a failed login on the server until it has reloaded
    its policy, counted by its limiter against the account and the operator's address.
    A server too old to answer that is asked the old way.
    """
    if admin is not None:
        query = urllib.parse.urlencode({"account": credential.name})
        try:
            code, body = _get(f"{url}{CREDENTIALS_PATH}?{query}", *admin, context)
        except (OSError, ValueError):
            return access.UNREACHABLE
        if code == 200:
            try:
                held = json.loads(body).get("fingerprint")
            except (ValueError, AttributeError):
                return access.UNREACHABLE
            return access.ACCEPTED if held == fingerprint(credential.hash) else access.REFUSED
        if code != 404:
            return access.UNREACHABLE  # the admin refused or throttled: wait instead
    try:
        code, _ = _get(f"{url}/v2/", credential.name, credential.password, context)
    except (OSError, ValueError):
        return access.UNREACHABLE
    if code == 200:
        return access.ACCEPTED
    if code in (401, 403, 429):
        return access.REFUSED
    return access.UNREACHABLE


def replication_status(
    url: str, username: str, password: str, context: ssl.SSLContext | None = None
) -> status.ReplicationObservation:
    try:
        code, body = _get(f"{url}{STATUS_PATH}", username, password, context)
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


def usage_entries(
    url: str, username: str, password: str, context: ssl.SSLContext | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Every repository's usage (GET /berth/v1/usage, page by page), or why not."""
    entries: list[dict[str, Any]] = []
    last = ""
    while True:
        query = urllib.parse.urlencode({"n": USAGE_PAGE, **({"last": last} if last else {})})
        target = f"{url}{USAGE_PATH}?{query}"
        try:
            code, body = _get(target, username, password, context)
        except (OSError, ValueError) as exc:
            return entries, f"GET {target}: {exc}"
        if code != 200:
            return entries, f"GET {target} answered {code}"
        try:
            page = json.loads(body)["repositories"]
            if not isinstance(page, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return entries, f"GET {target}: not a usage page"
        entries.extend(e for e in page if isinstance(e, dict))
        if len(page) < USAGE_PAGE:
            return entries, None
        last = str(page[-1].get("repository", ""))


def usage_observation(
    url: str,
    admin: tuple[str, str] | None,
    previous: usage.Observation | None,
    now: float,
    context: ssl.SSLContext | None = None,
) -> usage.Observation:
    if admin is None:
        return usage.Observation(error="the admin credentials are not there yet")
    entries, error = usage_entries(url, *admin, context)
    if error is not None:
        # Keep the figures last seen: a server restarting is not a repository emptied.
        if previous is not None and previous.error is None:
            return previous
        return usage.Observation(error=error)
    return usage.observe(entries, previous, now)


READINESS_PATH = "/readyz/writes"
READINESS_TIMEOUT = 3.0


def readiness(url: str, context: ssl.SSLContext | None = None) -> status.Readiness:
    """GET /readyz/writes (unauthenticated): 200 when the server reaches its index and
    blob store and its volume is not full; otherwise the code and the first line of its
    answer ("storage full: ...", "index unavailable: ..."), or why nothing answered."""
    target = f"{url}{READINESS_PATH}"
    try:
        with urllib.request.urlopen(target, timeout=READINESS_TIMEOUT, context=context) as response:
            return status.Readiness(int(response.status), _first_line(response.read()))
    except urllib.error.HTTPError as exc:
        return status.Readiness(int(exc.code), _first_line(exc.read()))
    except (OSError, ValueError) as exc:
        return status.Readiness(None, f"GET {target}: {exc}")


def _first_line(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip().splitlines()[0][:200] if body.strip() else ""
