"""Blob pull, delete, mount and the upload session use cases."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from registry_server.protocol import digests, errors
from registry_server.protocol.quotas import NO_QUOTA, Quota, refused
from registry_server.storage.blobstore import BlobStore, UploadInfo
from registry_server.storage.driver import Writer
from registry_server.storage.index import MetadataIndex


def _blob_unknown(digest: digests.Digest) -> errors.RegistryError:
    return errors.RegistryError(errors.BLOB_UNKNOWN, detail={"digest": str(digest)})


class BlobService:
    def __init__(
        self,
        store: BlobStore,
        index: MetadataIndex,
        quota: Callable[[str], Quota] | None = None,
    ) -> None:
        self.store = store
        self.index = index
        # The repository's quota as the policy says now: a repository already at its
        # storage quota takes no new uploads (no manifest using them could be pushed).
        self.quota = quota or (lambda _repo: NO_QUOTA)

    async def _refuse_when_full(self, repo: str) -> None:
        quota = self.quota(repo)
        if quota.storage is None:
            return
        usage = await self.index.usage(repo)
        reason = quota.full(usage) if usage is not None else None
        if usage is not None and reason is not None:
            raise refused(reason, usage, quota)

    # -- pull ----------------------------------------------------------------------------

    async def size(self, repo: str, digest: digests.Digest) -> int:
        size = await self.index.blob_size(repo, str(digest))
        if size is None:
            raise _blob_unknown(digest)
        return size

    def local_path(self, digest: digests.Digest) -> Path | None:
        return self.store.local_path(digest)

    async def redirect_url(self, digest: digests.Digest) -> str | None:
        return await self.store.redirect_url(digest)

    def read(self, digest: digests.Digest, offset: int, length: int) -> AsyncIterator[bytes]:
        return self.store.read(digest, offset, length)

    async def delete(self, repo: str, digest: digests.Digest) -> None:
        """Unlink a blob from a repository; the bytes go when garbage collection finds them."""
        if not await self.index.unlink_blob(repo, str(digest)):
            raise _blob_unknown(digest)

    # -- mount ---------------------------------------------------------------------------

    async def mount(
        self,
        repo: str,
        digest: digests.Digest,
        source: str | None,
        may_pull: Callable[[str], Awaitable[bool]],
    ) -> bool:
        """Link a blob another repository holds; False when it cannot be mounted.

        Without ``source`` any repository the caller may pull from is a candidate. A
        blob ``repo`` already holds is mounted as it is (no upload to make again), for a
        caller who may pull ``repo`` (to others it tells nothing a HEAD would not).
        """
        self.store.space.require_writable()
        linked = await self.index.blob_size(repo, str(digest))
        # Linked again, as an upload would: its link time is the grace period's start,
        # and a delete may have released it for the next collection. Its bytes lost, it
        # is mounted from another candidate, or uploaded.
        if (
            linked is not None
            and await may_pull(repo)
            and await self._link_stored(repo, digest, linked)
        ):
            return True
        candidates = [source] if source else await self.index.repositories_with_blob(str(digest))
        for candidate in candidates:
            if candidate == repo or not await may_pull(candidate):
                continue
            size = await self.index.blob_size(candidate, str(digest))
            if size is not None and await self._link_stored(repo, digest, size):
                return True
        return False

    async def _link_stored(self, repo: str, digest: digests.Digest, size: int) -> bool:
        """Link the stored blob into ``repo``; False when its bytes are not there at
        ``size`` (lost, or collected since its record was read). They are checked once,
        under the index's write lock (a stat; a HEAD on an object store)."""
        try:
            await self.index.link_blob(
                repo, str(digest), size, publish=functools.partial(self.store.require, digest, size)
            )
        except errors.RegistryError:
            return False
        return True

    # -- uploads -------------------------------------------------------------------------

    async def start_upload(self, repo: str, quota_exempt: bool = False) -> str:
        if not quota_exempt:
            await self._refuse_when_full(repo)
        return await self.store.start_upload(repo)

    async def upload_status(self, repo: str, upload_id: str) -> UploadInfo:
        return await self.store.upload_info(repo, upload_id)

    @staticmethod
    def _check_range(repo: str, info: UploadInfo, content_range: tuple[int, int] | None) -> None:
        """A chunk must start where the session is; otherwise 416 with the real offset."""
        if content_range is not None and content_range[0] != info.size:
            raise errors.RegistryError(
                errors.RANGE_INVALID,
                detail={"offset": info.size, "range": list(content_range)},
                headers=upload_headers(repo, info.upload_id, info.size),
            )

    async def append(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        content_range: tuple[int, int] | None,
    ) -> int:
        async with self.store.lock(upload_id):
            info, writer = await self._open(repo, upload_id, content_range)
            return await self.store.append(info, body, writer=writer, hash_alone=True)

    async def _open(
        self, repo: str, upload_id: str, content_range: tuple[int, int] | None
    ) -> tuple[UploadInfo, Writer]:
        info, writer = await self.store.open_upload(repo, upload_id)
        try:
            self._check_range(repo, info, content_range)
        except BaseException:
            await writer.close()
            raise
        return info, writer

    async def finish_upload(
        self,
        repo: str,
        upload_id: str,
        digest: digests.Digest,
        body: AsyncIterator[bytes] | None,
        content_range: tuple[int, int] | None = None,
    ) -> int:
        async with self.store.lock(upload_id):
            info, writer = await self._open(repo, upload_id, content_range)
            if body is not None:
                size = await self.store.append(
                    info, body, last=digest, writer=writer, hash_alone=True
                )
            else:
                size = await self.store.verify(info, digest, writer=writer)
            published = False

            async def publish() -> None:
                nonlocal published
                await self.store.publish(info, digest)
                published = True

            try:
                await self.index.link_blob(repo, str(digest), size, publish=publish)
            finally:
                if published:  # the data is gone from the session either way: end it
                    await self.store.cancel(upload_id)
        return size

    async def upload_whole(
        self,
        repo: str,
        digest: digests.Digest,
        body: AsyncIterator[bytes],
        quota_exempt: bool = False,
    ) -> int:
        """Single POST with ``?digest=``: the whole blob in one request."""
        if not quota_exempt:
            await self._refuse_when_full(repo)
        upload_id = await self.store.start_upload(repo)
        try:
            return await self.finish_upload(repo, upload_id, digest, body)
        except BaseException:
            await self.store.cancel(upload_id)
            raise

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        # Under the session's lock: a PATCH or PUT in flight finishes first (then this is a
        # 404), instead of writing into, or publishing, a session being deleted.
        async with self.store.lock(upload_id):
            await self.store.upload_info(repo, upload_id)  # 404 for unknown sessions
            await self.store.cancel(upload_id)


def upload_headers(repo: str, upload_id: str, size: int) -> dict[str, str]:
    """Where an upload session is and how much it holds (every upload response carries it)."""
    return {
        "Location": f"/v2/{repo}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
    }
