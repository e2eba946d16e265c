"""An OCI registry client for replication peers: auth (Basic or Bearer), blobs, manifests.

It speaks the plain distribution API, so any OCI registry can be a one-way target, plus
Berth's replication endpoints for two-way peers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from registry_server.config import PeerConfig
from registry_server.events import replies
from registry_server.protocol import versions

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# Where a blob's bytes come from: (offset, length) -> its chunks. The local blob store's
# reader, whatever its driver (a file, or an object in S3).
BlobSource = Callable[[int, int], AsyncIterator[bytes]]
# Anti-entropy replies list a repository's tags (a few hundred bytes each) and referrers.
MAX_JSON_REPLY = 64 << 20


class PeerError(Exception):
    """A peer request failed. ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


_REDIRECTS = (301, 302, 303, 307, 308)
_TOKENS_KEPT = 1024  # Bearer tokens kept, by scope


class ReplyTooLarge(PeerError):
    """A reply wanted whole (a manifest) is larger than the limit it was read with."""


def _classify(status: int, what: str, body: str) -> PeerError:
    # 4xx other than auth, throttling and timeouts will not change by retrying.
    retryable = status >= 500 or status in (401, 403, 404, 408, 409, 429)
    return PeerError(f"{what}: HTTP {status}: {body[:300]}", status, retryable)


class _Throttle:
    """A token bucket for the optional per-peer bandwidth limit."""

    def __init__(self, mbps: float) -> None:
        self.rate = mbps * 1024 * 1024 / 8 if mbps > 0 else 0.0
        self._allowance = self.rate
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= n
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port filled in; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def _realm_id(url: str) -> tuple[tuple[str, str, int] | None, str]:
    return origin(url), urlsplit(url).path or "/"


def ssl_context(url: str, tls_verify: bool, ca_file: Path | None) -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` takes: verification on unless switched off, extra CA."""
    if not url.startswith("https://"):
        return True
    if not tls_verify:
        return False
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def new_session(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A session for peers and upstreams: content is hashed against its digest as it
    came, so it is never decompressed, and asked for as is (aiohttp's default
    Accept-Encoding lets a CDN in front of a registry gzip it, and the digest fail)."""
    return aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, headers={"Accept-Encoding": "identity"}
    )


class PeerClient:
    def __init__(
        self,
        peer: PeerConfig,
        session: aiohttp.ClientSession,
        stream_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.peer = peer
        self.session = session
        # For ``stream`` (blob bodies): a pool of its own keeps the short requests from
        # queueing behind long transfers for a connection.
        self.stream_session = stream_session or session
        self.base = peer.url.rstrip("/")
        self._tokens: dict[str, str] = {}  # scope -> "Bearer ..." header value
        self._throttle = _Throttle(peer.bandwidth_limit_mbps)
        self._ssl = ssl_context(peer.url, peer.tls_verify, peer.ca_file)
        self._origin = origin(self.base)

    def _keep_token(self, scope: str, value: str) -> None:
        """Tokens are per repository: kept for the most recent scopes only (they expire
        within minutes anyway), or a registry of many repositories grew this for good."""
        self._tokens.pop(scope, None)
        while len(self._tokens) >= _TOKENS_KEPT:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[scope] = value

    def _replicated(self) -> dict[str, str]:
        """What tells a Berth peer that a send by digest is replication, not a push of
        its own (the other region held it to the quota; it is not forwarded again)."""
        return {versions.REPLICATED_HEADER: "1"} if self.peer.kind == "berth" else {}

    # -- transport and auth --------------------------------------------------------------

    def _basic(self) -> dict[str, str]:
        """The Basic credentials as a header (aiohttp's ``auth=`` is going away); aiohttp
        drops it, as it did ``auth``, on a redirect to another origin."""
        try:
            user = self.peer.user()
            password = self.peer.secret() if user else ""
        except OSError as exc:  # a credentials Secret not mounted (yet): the peer's failure
            raise PeerError(f"credentials: {exc}") from None
        if not user:
            return {}
        if ":" in user:  # a file's; the config refuses such a name inline
            raise PeerError(f"{self.peer.username_file}: the username holds ':'", retryable=False)
        pair = f"{user}:{password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}

    def _ours(self, url: str) -> bool:
        """Whether ``url`` is at the peer's own origin (the only place credentials go)."""
        return self._origin is not None and origin(url) == self._origin

    def _realm_allowed(self, realm: str) -> bool:
        # The challenge is the peer's text; whoever answers at the peer's URL (or a proxy
        # in between) would otherwise get our credentials sent wherever it names, or in
        # clear over http while the peer itself is https.
        if self._ours(realm):
            return True
        configured = self.peer.token_realm
        return bool(configured) and _realm_id(realm) == _realm_id(configured)

    async def _token(self, challenge: str, scope: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm:
            raise PeerError(f"bearer challenge without realm: {challenge[:200]}", 401)
        realm = urljoin(f"{self.base}/", realm)
        if not self._realm_allowed(realm):
            raise PeerError(
                f"the peer's token realm {realm[:200]!r} is not at the peer's origin "
                f"{self.base!r}: credentials not sent (name it in the peer's token_realm "
                "to allow it)",
                401,
            )
        query = {"service": params.get("service", ""), "scope": scope}
        async with self.session.get(
            f"{realm}?{urlencode(query)}", headers=self._basic(), ssl=self._ssl
        ) as resp:
            content, cut = await replies.read(resp)
            if resp.status != 200:
                raise _classify(resp.status, "token request", content.decode(errors="replace"))
        try:
            payload = json.loads(content) if not cut else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise PeerError("token response is not a JSON object", 401)
        token = payload.get("token") or payload.get("access_token")
        if not token:
            raise PeerError("token response without a token", 401)
        return f"Bearer {token}"

    async def request(
        self,
        method: str,
        path: str,
        scope: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        data_factory: Any = None,
        expect: tuple[int, ...] = (200,),
        what: str = "",
        whole_reply: int | None = None,
        follow: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request with auth handled; returns (status, headers, body).

        ``data_factory`` rebuilds a streamed body for the retry after an auth challenge.
        The reply's body is wanted whole only with ``whole_reply`` (its limit: a larger
        one is an error); otherwise no more of it than an error message quotes is read.
        A GET or HEAD follows redirects unless ``follow`` is False.
        """
        limit = whole_reply if whole_reply is not None else replies.SMALL
        url = path if path.startswith("http") else f"{self.base}{path}"
        for attempt in range(2):
            hdrs = dict(headers or {})
            # Credentials go to the peer's origin only, never to a Location elsewhere.
            if self._ours(url):
                if scope in self._tokens:
                    hdrs["Authorization"] = self._tokens[scope]
                else:
                    hdrs.update(self._basic())
            body = data_factory() if data_factory is not None else data
            try:
                async with self.session.request(
                    method,
                    url,
                    headers=hdrs,
                    data=body,
                    ssl=self._ssl,
                    allow_redirects=follow and method in ("GET", "HEAD"),
                ) as resp:
                    content, cut = await replies.read(resp, limit)
                    if resp.status == 401 and attempt == 0 and self._ours(url):
                        challenge = resp.headers.get("WWW-Authenticate", "")
                        if challenge.lower().startswith("bearer"):
                            self._keep_token(scope, await self._token(challenge, scope))
                            continue
                    if resp.status not in expect:
                        raise _classify(
                            resp.status,
                            what or f"{method} {path}",
                            content.decode(errors="replace"),
                        )
                    if cut and whole_reply is not None:
                        raise ReplyTooLarge(
                            f"{what or method + ' ' + path}: reply larger than {limit} bytes",
                            resp.status,
                            retryable=False,
                        )
                    return resp.status, dict(resp.headers), content
            except aiohttp.ClientError as exc:
                raise PeerError(f"{what or method + ' ' + path}: {exc}") from exc
            except TimeoutError as exc:
                raise PeerError(f"{what or method + ' ' + path}: timeout") from exc
        raise PeerError(f"{what or method + ' ' + path}: unauthorized", 401)

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, scope: str, *, headers: dict[str, str] | None = None, what: str = ""
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose 200 reply the caller reads itself (a blob), auth handled as in
        ``request``; anything else raises PeerError. What the caller's block raises (its
        reads of the reply, or its own work: a store's timeout) goes out as it is."""
        url = f"{self.base}{path}"
        what = what or f"GET {path}"
        for attempt in range(2):
            hdrs = dict(headers or {})
            if scope in self._tokens:
                hdrs["Authorization"] = self._tokens[scope]
            else:
                hdrs.update(self._basic())
            handed = False
            try:
                async with self.stream_session.get(url, headers=hdrs, ssl=self._ssl) as resp:
                    if resp.status == 401 and attempt == 0:
                        challenge = resp.headers.get("WWW-Authenticate", "")
                        if challenge.lower().startswith("bearer"):
                            self._keep_token(scope, await self._token(challenge, scope))
                            continue
                    if resp.status != 200:
                        content, _ = await replies.read(resp)
                        raise _classify(resp.status, what, content.decode(errors="replace"))
                    handed = True
                    yield resp
                    return
            except aiohttp.ClientError as exc:
                if handed:
                    raise
                raise PeerError(f"{what}: {exc}") from exc
            except TimeoutError as exc:
                if handed:
                    raise
                raise PeerError(f"{what}: timeout") from exc
        raise PeerError(f"{what}: unauthorized", 401)

    # -- blobs ---------------------------------------------------------------------------

    @staticmethod
    def _pull(repo: str) -> str:
        return f"repository:{repo}:pull"

    @staticmethod
    def _push(repo: str) -> str:
        return f"repository:{repo}:pull,push"

    async def blob_exists(self, repo: str, digest: str, pull_only: bool = False) -> bool:
        """A HEAD of the blob. ``pull_only``: with a pull scope (an upstream, not a
        peer this registry pushes to)."""
        scope = self._pull(repo) if pull_only else self._push(repo)
        path = f"/v2/{repo}/blobs/{digest}"
        status, headers, _ = await self.request(
            "HEAD",
            path,
            scope,
            expect=(200, 404, *_REDIRECTS),
            what=f"blob HEAD {repo}@{digest}"[:200],
            follow=False,
        )
        if status not in _REDIRECTS:
            return status == 200
        location = headers.get("Location")
        if not location:
            raise PeerError(f"blob HEAD {repo}@{digest}: HTTP {status} without Location")
        # Where the registry sends clients for the blob: a URL signed for GET (S3, GCS)
        # answers a HEAD with 403, so it is asked for one byte as a client would fetch it
        # (credentials only at the peer's own origin, as for any request).
        status, _, _ = await self.request(
            "GET",
            urljoin(f"{self.base}{path}", location),
            scope,
            headers={"Range": "bytes=0-0"},
            expect=(200, 206, 403, 404),
            what=f"blob {repo}@{digest} at its redirect"[:200],
        )
        return status in (200, 206)

    async def start_upload(self, repo: str, digest: str, source: str | None) -> str | None:
        """Start an upload, mounting from ``source`` when given; None when mounted."""
        query = f"?mount={digest}&from={source}" if source else ""
        status, headers, _ = await self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/{query}",
            self._push(repo),
            headers=self._replicated(),
            expect=(201, 202),
            what="upload start",
        )
        if status == 201:
            return None
        location = headers.get("Location")
        if not location:
            raise PeerError("upload start without Location", status, retryable=False)
        return urljoin(f"{self.base}/", location)

    async def post_blob(self, repo: str, digest: str, size: int, source: BlobSource) -> None:
        """Upload a whole blob in one request (``POST ?digest=``)."""
        await self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?digest={digest}",
            self._push(repo),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
                **self._replicated(),
            },
            data_factory=lambda: self._chunks(source, 0, size),
            expect=(201,),
            what="blob single POST",
        )

    async def _chunks(self, source: BlobSource, offset: int, length: int) -> AsyncIterator[bytes]:
        remaining = length
        async for chunk in source(offset, length):
            remaining -= len(chunk)
            await self._throttle.take(len(chunk))
            yield chunk
        if remaining > 0:
            raise PeerError("local blob shorter than expected", retryable=False)

    async def _offset(self, location: str, repo: str) -> int:
        _, headers, _ = await self.request(
            "GET", location, self._push(repo), expect=(204, 200), what="upload status"
        )
        value = headers.get("Range", "0-0")
        end = int(value.rsplit("-", 1)[-1])
        return end + 1 if end > 0 else 0

    async def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        source: BlobSource,
        location: str,
        attempts: int = 5,
    ) -> None:
        """Upload a local blob: one PUT when small, else chunks that resume after failures."""
        chunk = self.peer.chunk_size_mb * 1024 * 1024
        sep = "&" if "?" in location else "?"
        if size <= chunk:
            await self.request(
                "PUT",
                f"{location}{sep}digest={digest}",
                self._push(repo),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                data_factory=lambda: self._chunks(source, 0, size),
                expect=(201,),
                what="blob PUT",
            )
            return
        offset = 0
        failures = 0
        while offset < size:
            length = min(chunk, size - offset)
            try:
                _, headers, _ = await self.request(
                    "PATCH",
                    location,
                    self._push(repo),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                        "Content-Length": str(length),
                    },
                    data_factory=lambda o=offset, n=length: self._chunks(source, o, n),
                    expect=(202,),
                    what="blob PATCH",
                )
                location = urljoin(f"{self.base}/", headers.get("Location", location))
                offset += length
            except PeerError as exc:
                failures += 1
                if failures >= attempts or not exc.retryable:
                    raise
                await asyncio.sleep(min(2**failures * 0.2, 5))
                offset = await self._offset(location, repo)  # resume where the peer is
        sep = "&" if "?" in location else "?"
        await self.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            self._push(repo),
            headers={"Content-Length": "0"},
            expect=(201,),
            what="blob commit",
        )

    # -- manifests -----------------------------------------------------------------------

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        status, headers, _ = await self.request(
            "HEAD",
            f"/v2/{repo}/manifests/{reference}",
            self._push(repo),
            headers={"Accept": ", ".join(_ACCEPT)},
            expect=(200, 404),
            what="manifest HEAD",
        )
        if status == 404:
            return None
        return headers.get("Docker-Content-Digest") or reference

    async def put_manifest(
        self,
        repo: str,
        reference: str,
        body: bytes,
        media_type: str,
        stamp: versions.Stamp | None,
        stored_version: int | None = None,
    ) -> None:
        """``stored_version``: a referrer's clock version when first stored (a Berth
        peer that has deleted it since keeps it deleted)."""
        headers = {"Content-Type": media_type}
        if stamp is not None:
            headers[versions.VERSION_HEADER] = str(stamp.version)
            headers[versions.ORIGIN_HEADER] = stamp.origin
        else:  # by digest: a platform, a referrer
            headers.update(self._replicated())
            if stored_version is not None and self.peer.kind == "berth":
                headers[versions.STORED_VERSION_HEADER] = str(stored_version)
        await self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            self._push(repo),
            headers=headers,
            data=body,
            expect=(201,),
            what="manifest PUT",
        )

    async def delete_manifest(
        self, repo: str, reference: str, stamp: versions.Stamp | None
    ) -> None:
        headers = {}
        if stamp is not None:
            headers[versions.VERSION_HEADER] = str(stamp.version)
            headers[versions.ORIGIN_HEADER] = stamp.origin
        await self.request(
            "DELETE",
            f"/v2/{repo}/manifests/{reference}",
            f"repository:{repo}:delete",
            headers=headers,
            expect=(202, 404),
            what="manifest DELETE",
        )

    # -- Berth replication API -----------------------------------------------------------

    async def get_json(self, path: str, payload: Any = None) -> Any:
        method = "GET" if payload is None else "POST"
        _, _, body = await self.request(
            method,
            path,
            "registry:replication:*",
            headers={"Content-Type": "application/json"} if payload is not None else None,
            data=json.dumps(payload).encode() if payload is not None else None,
            expect=(200,),
            what=f"{method} {path}",
            whole_reply=MAX_JSON_REPLY,
        )
        return json.loads(body)


_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
