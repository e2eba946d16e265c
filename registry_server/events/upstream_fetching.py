"""Fetching manifests and blobs from an upstream registry (the pull-through cache's I/O).

Auth, TLS and the token flow are the replication peer client's: an upstream is reached
like a one-way peer, with pull scopes only. Every failure is an UpstreamFailure, but a
manifest over the size limit: that is the content's fault (MANIFEST_TOO_LARGE).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

from registry_server.config import UpstreamConfig
from registry_server.events.peer_client import PeerClient, PeerError, ReplyTooLarge, new_session
from registry_server.protocol import errors
from registry_server.protocol.upstreams import UpstreamFailure, UpstreamManifest

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
# A blob transfer stalls out after this long without a byte (a whole blob may take long).
_BLOB_READ_TIMEOUT = 60.0


class UpstreamFetcher:
    def __init__(self, config: UpstreamConfig, max_manifest_bytes: int) -> None:
        self.name = config.name
        self.config = config
        self.max_manifest_bytes = max_manifest_bytes
        self._session: aiohttp.ClientSession | None = None
        self._blob_session: aiohttp.ClientSession | None = None
        self._client: PeerClient | None = None

    def _peer(self) -> PeerClient:
        # Made on first use: a session belongs to the running event loop.
        if self._client is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.timeout_seconds, sock_read=_BLOB_READ_TIMEOUT
            )
            self._session = new_session(timeout)
            # Blob fills on connections of their own: a hundred under way (aiohttp's
            # pool size) must not hold up a manifest's HEAD or GET, which would time out
            # and serve stale, blaming the upstream.
            self._blob_session = new_session(timeout)
            self._client = PeerClient(self.config.as_peer(), self._session, self._blob_session)
        return self._client

    def _failure(self, exc: PeerError) -> UpstreamFailure:
        timed_out = isinstance(exc.__cause__, TimeoutError)  # aiohttp's are TimeoutErrors
        return UpstreamFailure(self.name, str(exc)[:300], exc.status, timed_out)

    async def manifest(self, repo: str, reference: str, head: bool) -> UpstreamManifest:
        """HEAD or GET a manifest (callers bound the time with asyncio.timeout)."""
        try:
            _, headers, body = await self._peer().request(
                "HEAD" if head else "GET",
                f"/v2/{repo}/manifests/{reference}",
                f"repository:{repo}:pull",
                headers={"Accept": MANIFEST_ACCEPT},
                what=f"manifest {'HEAD' if head else 'GET'} {repo}:{reference}"[:200],
                whole_reply=None if head else self.max_manifest_bytes,
            )
        except ReplyTooLarge:
            # The upstream answered: it is the manifest this cache will not hold.
            raise errors.RegistryError(
                errors.MANIFEST_TOO_LARGE,
                detail={"upstream": self.name, "limit": self.max_manifest_bytes},
            ) from None
        except PeerError as exc:
            raise self._failure(exc) from None
        return UpstreamManifest(
            headers.get("Docker-Content-Digest"),
            (headers.get("Content-Type") or "").split(";")[0].strip() or None,
            None if head else body,
        )

    async def has_blob(self, repo: str, digest: str) -> bool:
        """Whether the upstream serves ``digest`` in ``repo`` (a HEAD: no rate-limit cost
        on the registries that count pulls by manifest GET)."""
        try:
            return await self._peer().blob_exists(repo, digest, pull_only=True)
        except PeerError as exc:
            raise self._failure(exc) from None

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: str, digest: str
    ) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
        """The blob's size (when the upstream says it) and its bytes, as they arrive."""
        try:
            async with self._peer().stream(
                f"/v2/{repo}/blobs/{digest}",
                f"repository:{repo}:pull",
                what=f"blob GET {repo}@{digest}"[:200],
            ) as resp:
                yield resp.content_length, self._chunks(resp)
        except PeerError as exc:
            raise self._failure(exc) from None

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            # The pieces as received: iter_chunked would join them into new bytes (a
            # copy of the blob on the event loop).
            async for chunk, _ in resp.content.iter_chunks():
                if chunk:
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailure(
                self.name,
                f"blob transfer failed: {exc or type(exc).__name__}"[:300],
                timed_out=isinstance(exc, TimeoutError),
            ) from None

    async def close(self) -> None:
        for session in (self._session, self._blob_session):
            if session is not None:
                await session.close()
