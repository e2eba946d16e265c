"""S3 storage driver: blobs in any S3-compatible object store (AWS S3, SeaweedFS, MinIO, ...).

Client library: aiobotocore. It is botocore (signing, retries, endpoints, the credential
chain: inline keys, ``AWS_*`` variables, web identity) on asyncio and aiohttp, which the
server already runs on. A blob GET streams from the store to the client chunk by chunk
on the event loop, and a thousand transfers in flight cost sockets, not threads. boto3
in threads would hop to the default thread pool (six threads on a 2-core pod) for every
chunk of every transfer, so concurrent pulls would queue behind each other.

Layout: path ``p`` is the object ``<prefix>/p``. S3 has no directories: a directory is
the set of keys under ``p/``, and listing asks for common prefixes.

Files being written (upload sessions) are *segmented*, because S3 cannot append, and an
upload must be resumable by any replica and readable (the next replica rehashes what was
written so far: the blob store keeps its running sha256 in process memory only, since
hashlib's state cannot be saved). Their key holds a small JSON state (marked by the
metadata ``berth-segmented``, whose value repeats the state when it is short, so that
one HEAD tells a file's size and segments) listing the names and sizes of segment objects
``<key>.segments/<n>-<writer>``; every segment but the last is a full part
(``part_size``, at least S3's 5 MiB multipart minimum). A writer keeps about one part in
memory (the part filling, and the previous one being sent): full parts are PUT as they
fill; at the end of a request the partial last part is PUT too and the state rewritten.
The next request, on any replica, reads that last part back (at most one part) and
writes it again extended, under its own name. The state is written with a conditional
PUT on the state it read (If-Match; If-None-Match for a new file), so of two writers
that continued one state (a PATCH retried on another replica while the first runs)
only the first to finish wins and the other gets StorageConflict: a file is always one
writer's history, never a mix. The recorded sizes are the truth: truncating (undoing a
failed PATCH) only rewrites the state, and segments no state names are deleted (or go
with the session).

A segment this writer PUT holds exactly its recorded size, and the state says so (the
``s2:`` marker, "!" after its size); a truncation cuts the recorded size of one, which
then is not exact. The state a writer leaves is kept in this process until the file's
move (``_known``): a final request opens the file, then moves it, and the move copies
the state it knows without asking the store again, nor the size of an exact segment.

A final request into an empty upload says where the file will be moved (``destine``):
its body is then written at the target directly, one PUT at the move (a part or less,
held in memory until then) or a multipart upload there whose completion is the move,
and nothing is written to the file. The target appears only when the move completes
it, after the digest was verified; a writer closed without commit aborts its multipart
upload and leaves the file as it was, empty.

Moves are copy + delete. A segmented file becomes one plain object by a multipart upload
whose parts are server-side copies of the segments (UploadPartCopy: the bytes do not pass
through the registry); a one-segment file is copied with CopyObject when the segment
holds exactly its recorded bytes (else its recorded head is read and PUT). A
plain object is copied with CopyObject (multipart copies of 1 GiB ranges above 5 GiB).
The target appears atomically (CompleteMultipartUpload, CopyObject and PutObject replace
an object whole), then the source is deleted. A crash in between leaves both: for an
upload's publish, the blob in place plus the upload session (the session is purged as
stale, the blob deleted as unrecorded by the collector); for the collector's trash moves,
the blob and its trash copy (the next round's trash recovery empties the trash entry when
the blob is there, and collects the blob if it is still garbage). A crash during a
multipart copy leaves an incomplete multipart upload, invisible to reads and lists,
which ``purge_incomplete`` aborts once it is older than the upload purge age.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as botocore_exceptions
from botocore.exceptions import ClientError

from registry_server.storage.driver import (
    BackendUnavailable,
    Hasher,
    StorageConflict,
    StorageNotFound,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import PutObjectRequestTypeDef

T = TypeVar("T")

MIN_PART = 5 << 20  # S3's smallest multipart part (except the last)
_MAX_COPY = 5 << 30  # the most one CopyObject or UploadPartCopy may copy
_BIG_COPY_PIECE = 1 << 30  # piece size when a large plain object is copied in parts
_READ_CHUNK = 1 << 20
_SEGMENTS = ".segments"  # reserved suffix: a file's segment directory
_MARKER = "berth-segmented"  # metadata key of a segmented file's state object
# The marker's value: "1", or the state itself when short (S3 allows 2 KB of metadata).
# "s2:" marks the segments holding exactly their recorded size with "!"; "s1:" states
# (written by earlier versions, which read an "s2:" one from the object) do not say.
_INLINE_PREFIX = "s2:"
_INLINE_V1 = "s1:"
_INLINE_MAX = 1024
_COPY_CONCURRENCY = 4
_DELETE_BATCH = 1000  # DeleteObjects' limit
# Committed files destined to a move (S3Writer.destine) wait for it here, in memory or
# as a multipart upload: in the normal flow for milliseconds (the move is the same
# request's next step). Bounded for the flows where it never comes (an index that failed
# to link): the oldest are dropped, and their move then fails instead of publishing.
_STAGED_MAX = 256
_STAGED_BYTES = 256 << 20
_DROPPED_MAX = 4096
_KNOWN_MAX = 1024
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_CONFLICT = frozenset({"412", "PreconditionFailed", "409", "ConditionalRequestConflict"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _range(offset: int, length: int | None) -> str | None:
    if length is None:
        return f"bytes={offset}-" if offset else None
    return f"bytes={offset}-{offset + length - 1}"


@dataclass
class _State:
    """A segmented file: its segments' names and recorded sizes, in order, and which of
    them hold exactly their recorded size (a truncation leaves a segment longer)."""

    part_size: int
    segments: list[tuple[str, int]] = field(default_factory=list)
    etag: str | None = None  # of the state object this was read from
    exact: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        return sum(size for _, size in self.segments)

    def encode(self) -> bytes:
        segments = [[name, size] for name, size in self.segments]
        exact = sorted(name for name, _ in self.segments if name in self.exact)
        document = {"part_size": self.part_size, "segments": segments, "exact": exact}
        return json.dumps(document).encode()

    @classmethod
    def decode(cls, data: bytes, etag: str | None) -> _State:
        raw = json.loads(data)
        segments = [(str(name), int(size)) for name, size in raw["segments"]]
        exact = frozenset(str(name) for name in raw.get("exact", ()))  # absent before s2
        return cls(int(raw["part_size"]), segments, etag, exact)

    def inline(self) -> str | None:
        """The state as the marker's metadata value, when it is small enough to ride on
        every HEAD (a HEAD then tells a file's state without a GET of the object)."""
        entries = [f"{n}={size}{'!' if n in self.exact else ''}" for n, size in self.segments]
        text = _INLINE_PREFIX + ",".join([str(self.part_size), *entries])
        return text if len(text) <= _INLINE_MAX else None

    @classmethod
    def from_inline(cls, text: str, etag: str | None) -> _State | None:
        """The state carried by the marker, or None when the marker carries none (a large
        state, or one written before states rode on the marker)."""
        prefix = next((p for p in (_INLINE_PREFIX, _INLINE_V1) if text.startswith(p)), None)
        if prefix is None:
            return None
        part_size, *entries = text[len(prefix) :].split(",")
        segments, exact = [], set()
        for entry in entries:
            name, _, size = entry.rpartition("=")
            if size.endswith("!"):
                size = size[:-1]
                exact.add(name)
            segments.append((name, int(size)))
        return cls(int(part_size), segments, etag, frozenset(exact))


@dataclass
class _Staged:
    """A destined file's committed content, waiting for its move: the bytes to PUT at
    ``target``, or the parts of a multipart upload there to complete."""

    target: str
    body: bytes | None = None
    upload_id: str | None = None
    etags: list[str] = field(default_factory=list)

    @property
    def held(self) -> int:
        return len(self.body) if self.body is not None else 0


@dataclass(frozen=True)
class _File:
    """What a key holds: a plain object of ``size`` bytes, or a segmented file."""

    size: int
    state: _State | None = None


def _segment(key: str, name: str) -> str:
    return f"{key}{_SEGMENTS}/{name}"


# How a writer's state write is conditioned: on the state it read (its ETag), on there
# being none yet, or not at all (a writer that truncates).
_CREATE = "create"


class S3Writer:
    """Appends to a segmented file; see the module docstring for the layout."""

    def __init__(
        self, driver: S3Driver, key: str, state: _State, dirty: bool, condition: str | None
    ) -> None:
        self._driver = driver
        self._key = key
        self._part_size = state.part_size
        self._segments = list(state.segments)
        self._stored = state.size
        self._condition = condition
        # Segment names are this writer's own: a concurrent writer (a retried PATCH on
        # another replica) never overwrites a segment another state refers to.
        self._token = secrets.token_hex(4)
        self._written: list[str] = []
        self._superseded: list[str] = []
        self._opened = state  # as read: what the file is if nothing is written
        self._exact = set(state.exact)
        # The part being filled, as the chunks received: joined once, when it is full
        # (a growing bytearray would be copied as it grows).
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._tail_loaded = False
        self._dirty = dirty  # the state must be written at close
        self._sending: asyncio.Task[None] | None = None
        self._closed = False
        # Destined (``destine``): the data goes to this key instead, as one PUT or the
        # parts of a multipart upload, which the move completes.
        self._target: str | None = None
        self._multipart: str | None = None
        self._etags: list[str] = []

    @property
    def size(self) -> int:
        return self._stored + self._pending_size

    def hash_with(self, hasher: Hasher) -> bool:
        return False  # parts may be sent out of order: the caller hashes

    async def hashed(self) -> None:
        pass

    async def flush(self) -> None:
        pass  # an object is read once it is complete

    def destine(self, path: str) -> None:
        """Write at ``path`` directly (see the protocol): the move then PUTs the data or
        completes its multipart upload there, where segments, a state and a copy of
        them were four requests and the bytes written twice."""
        if self._segments or self._pending_size or self._written or self._closed:
            return  # only an empty file, before its first write
        self._target = self._driver._key(path)

    async def _load_tail(self) -> None:
        # A partial last segment is continued, so that every segment but the last stays
        # a full part: read it back (at most one part) and write it again, extended.
        self._tail_loaded = True
        if not self._segments or self._segments[-1][1] >= self._part_size:
            return
        name, last = self._segments.pop()
        self._stored -= last
        tail = await self._driver._get_range(_segment(self._key, name), 0, last)
        self._pending, self._pending_size = [tail], last
        self._superseded.append(name)

    async def _wait_sent(self) -> None:
        if self._sending is not None:
            sending, self._sending = self._sending, None
            await sending

    async def _send(self, size: int) -> None:
        """Send the first ``size`` pending bytes as the next segment (or part)."""
        part = self._take(size)
        # One part in flight while the next fills: the client's upload and ours overlap.
        await self._wait_sent()
        if self._target is not None:
            await self._send_part(self._target, part)
            return
        name = f"{len(self._segments):06d}-{self._token}"
        self._segments.append((name, size))
        self._written.append(name)
        self._exact.add(name)  # this writer PUTs exactly the bytes it records
        self._stored += size
        self._sending = asyncio.ensure_future(self._driver._put(_segment(self._key, name), part))

    async def _send_part(self, target: str, part: bytes) -> None:
        if self._multipart is None:
            self._multipart = await self._driver._start_multipart(target)
        upload_id, number = self._multipart, len(self._etags) + 1
        self._etags.append("")
        self._stored += len(part)

        async def send() -> None:
            etag = await self._driver._upload_part(target, upload_id, number, part)
            self._etags[number - 1] = etag

        self._sending = asyncio.ensure_future(send())

    def _take(self, size: int) -> bytes:
        """The first ``size`` pending bytes, joined."""
        pieces: list[bytes | memoryview] = []
        taken = 0
        while taken < size:
            chunk = self._pending.pop(0)
            want = size - taken
            if len(chunk) > want:
                self._pending.insert(0, memoryview(chunk)[want:])
                chunk = memoryview(chunk)[:want]
            pieces.append(chunk)
            taken += len(chunk)
        self._pending_size -= size
        return b"".join(pieces)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._tail_loaded:
            await self._load_tail()
        self._pending.append(data)
        self._pending_size += len(data)
        self._dirty = True
        while self._pending_size >= self._part_size:
            await self._send(self._part_size)

    async def commit(self) -> None:
        if self._target is None:
            # An acknowledged PUT is durable: closing is committing.
            await self.close()
            return
        if self._closed:
            return
        self._closed = True
        try:
            if self._multipart is None:
                staged = _Staged(self._target, body=self._take(self._pending_size))
            else:
                if self._pending_size:
                    await self._send(self._pending_size)
                await self._wait_sent()
                staged = _Staged(self._target, upload_id=self._multipart, etags=self._etags)
        except BaseException:
            await self._discard()
            raise
        self._driver._stage(self._key, staged)

    async def _discard(self) -> None:
        """A destined writer closed without commit: nothing of it stays."""
        self._pending.clear()
        self._pending_size = 0
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)
            self._sending = None
        if self._multipart is not None and self._target is not None:
            await self._driver._abort_multipart(self._target, self._multipart)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._target is not None:
            await self._discard()
            return
        try:
            if self._pending_size:
                await self._send(self._pending_size)
            await self._wait_sent()
        except BaseException:
            if self._sending is not None:
                self._sending.cancel()
            raise
        if not self._dirty:
            self._driver._remember(self._key, self._opened)
            return
        state = _State(self._part_size, self._segments, exact=frozenset(self._exact))
        try:
            state.etag = await self._driver._put_state(self._key, state, self._condition)
        except StorageConflict:
            # Another writer's state won: its file stands as it wrote it. Ours goes, but
            # for segments that state names: our write was applied (its answer lost) and
            # that writer went on from it. Unread, nothing goes (the session's deletion
            # takes what is left).
            self._driver._lost.add(self._key)
            try:
                current = await self._driver._state(self._key)
            except (ClientError, OSError):
                raise StorageConflict(self._key) from None
            named = {name for name, _ in current.segments} if current is not None else set()
            await self._driver._forget(self._key, [n for n in self._written if n not in named])
            raise
        self._driver._remember(self._key, state)
        await self._driver._forget(self._key, self._superseded)


# botocore's errors for a store it could not reach, or that stopped answering.
_UNREACHABLE = (botocore_exceptions.ConnectionError, botocore_exceptions.HTTPClientError)


async def _reached(call: Awaitable[T]) -> T:
    try:
        return await call
    except _UNREACHABLE as exc:
        raise BackendUnavailable("object store", str(exc)) from exc


class _Reaching:
    """The S3 client, its calls' failures to reach the store raised as
    BackendUnavailable (which the API answers with 503, as for the database) rather than
    as botocore's own errors (a 500 with a traceback)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if name == "get_paginator":  # its pages are fetched as they are iterated
                return _ReachingPaginator(result)
            return _reached(result) if inspect.isawaitable(result) else result

        return call


class _ReachingPaginator:
    """A paginator whose pages raise BackendUnavailable when the store cannot be reached
    (a listing: a GC round, a session's delete)."""

    def __init__(self, paginator: Any) -> None:
        self._paginator = paginator

    def paginate(self, **kwargs: Any) -> AsyncIterator[Any]:
        return _reached_pages(self._paginator.paginate(**kwargs))


async def _reached_pages(pages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for page in pages:
            yield page
    except _UNREACHABLE as exc:
        raise BackendUnavailable("object store", str(exc)) from exc


class S3Driver:
    name = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str = "",
        region: str = "us-east-1",
        prefix: str = "",
        access_key: str = "",
        secret_key: str = "",
        ca_file: Path | None = None,
        tls_verify: bool = True,
        part_size: int = 8 << 20,
        redirect: bool = False,
        redirect_expiry_seconds: int = 1200,
        path_style: bool = True,
        max_connections: int = 64,
    ) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART}")
        self.bucket = bucket
        self.part_size = part_size
        self.redirect = redirect
        self.redirect_expiry_seconds = redirect_expiry_seconds
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint or None,
            "region_name": region,
            "aws_access_key_id": access_key or None,
            "aws_secret_access_key": secret_key or None,
            "verify": str(ca_file) if ca_file is not None and tls_verify else tls_verify,
            "config": AioConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path" if path_style else "auto"},
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=max_connections,
                # The newer default checksums (CRC trailers, aws-chunked bodies) are not
                # spoken by every S3-compatible store; ask for them only where required.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=10,
                read_timeout=120,
            ),
        }
        self._client: S3Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self._opening: asyncio.Lock | None = None
        # Files whose last writer here lost a race (StorageConflict): the truncate that
        # undoes a failed append must leave the winner's content alone.
        self._lost: set[str] = set()
        # Committed destined files by key, until their move; and the keys whose staged
        # content was dropped unmoved (their move fails: the file itself is empty).
        self._staged: OrderedDict[str, _Staged] = OrderedDict()
        self._staged_bytes = 0
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self._aborting: set[asyncio.Task[None]] = set()
        # Each segmented file's state as this process's last writer of it left it: what
        # the move that follows a final request's open (the same request) copies, without
        # asking the store again. Taken by that move; dropped by anything else changing
        # the file here. Another process's change since is a client racing itself (two
        # requests of one upload at once): the copy is then of the bytes this process
        # verified, or fails if their segments are gone, never of other bytes.
        self._known: OrderedDict[str, _State] = OrderedDict()

    # -- plumbing ------------------------------------------------------------------------

    async def _s3(self) -> S3Client:
        # Created on first use, inside the running loop of the process that uses it (each
        # worker forks before its loop starts).
        if self._client is not None:
            return self._client
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._client is None:
                creator = get_session().create_client("s3", **self._client_args)
                client = await self._stack.enter_async_context(creator)
                self._client = cast("S3Client", _Reaching(client))
        return self._client

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    def _key(self, path: str) -> str:
        # Paths come from the blob store layer; refuse escapes, the root, and our own
        # segment directories anyway.
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if path.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"invalid storage path {path!r}")
        if any(p.endswith(_SEGMENTS) for p in parts):
            raise ValueError(f"storage path {path!r} uses the reserved suffix {_SEGMENTS}")
        return self._prefix + "/".join(parts)

    async def _put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        s3 = await self._s3()
        # A BytesIO over bytes shares them and is sent in pieces; bytes themselves would be
        # copied whole on the way out (measured: one copy of each part more).
        await s3.put_object(
            Bucket=self.bucket, Key=key, Body=io.BytesIO(data), Metadata=metadata or {}
        )

    async def _get_range(self, key: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        s3 = await self._s3()
        response = await s3.get_object(
            Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        async with response["Body"] as body:
            data = await body.read()
        if len(data) != length:
            raise OSError(f"s3: {key} is shorter than its recorded size")
        return data

    async def _state(self, key: str) -> _State | None:
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        async with response["Body"] as body:
            data = await body.read()
        if _MARKER not in response.get("Metadata", {}):
            return None  # replaced by a plain object since the caller looked
        return _State.decode(data, response.get("ETag"))

    async def _put_state(self, key: str, state: _State, condition: str | None) -> str | None:
        """Write a segmented file's state: a compare-and-swap on the state read (S3's
        conditional PUT), so of two writers that started from one state only the first
        to finish wins; the other gets StorageConflict."""
        s3 = await self._s3()
        request: PutObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": io.BytesIO(state.encode()),
            "Metadata": {_MARKER: state.inline() or "1"},
        }
        if condition == _CREATE:
            request["IfNoneMatch"] = "*"
        elif condition is not None:
            request["IfMatch"] = condition
        try:
            written = await s3.put_object(**request)
        except ClientError as exc:
            if _code(exc) in _CONFLICT:
                # The client retries a PUT whose answer was lost (a 504 from a proxy in
                # front of the store after the store took it): the retry meets its own
                # state. Segment names carry the writer's token, so an equal state is
                # this write, applied; taken for a lost race, its segments were deleted
                # under the state naming them.
                current = await self._state(key)
                if current is not None and current.encode() == state.encode():
                    return current.etag
                raise StorageConflict(key) from None
            if condition not in (None, _CREATE) and _code(exc) in ("404", "NoSuchKey"):
                raise StorageConflict(key) from None  # removed since read (a purge, a DELETE)
            raise
        return written.get("ETag")

    async def _forget(self, key: str, names: list[str]) -> None:
        """Delete segments no state refers to any more (best effort: the session's
        deletion takes whatever is left)."""
        if names:
            with contextlib.suppress(ClientError, OSError):
                await self._delete_keys(_segment(key, name) for name in names)

    async def _describe(self, key: str) -> _File | None:
        s3 = await self._s3()
        try:
            head = await s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        marker = head.get("Metadata", {}).get(_MARKER)
        if marker is None:
            return _File(head["ContentLength"])
        state = _State.from_inline(marker, head.get("ETag"))
        if state is not None:
            return _File(state.size, state)
        state = await self._state(key)
        return None if state is None else _File(state.size, state)

    async def _keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``."""
        s3 = await self._s3()
        keys: list[str] = []
        async for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    async def _delete_keys(self, keys: Iterable[str]) -> None:
        s3 = await self._s3()
        batch = sorted(set(keys))
        for start in range(0, len(batch), _DELETE_BATCH):
            chunk = batch[start : start + _DELETE_BATCH]
            response = await s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
            )
            failed = [e for e in response.get("Errors", []) if e.get("Code") not in _MISSING]
            if failed:
                raise OSError(f"s3: could not delete {len(failed)} objects: {failed[0]}")

    async def _delete_file(self, key: str, found: _File) -> None:
        """A moved file's source: the key and the segments its state names (one request,
        no listing). Segments no state names, left by a writer that lost or failed, are
        in the same directory (an upload session's) and go with it."""
        keys = [key]
        if found.state is not None:
            keys += [_segment(key, name) for name, _ in found.state.segments]
        await self._delete_keys(keys)

    # -- destined files ------------------------------------------------------------------

    async def _start_multipart(self, key: str) -> str:
        s3 = await self._s3()
        upload = await s3.create_multipart_upload(Bucket=self.bucket, Key=key)
        return upload["UploadId"]

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        s3 = await self._s3()
        part = await s3.upload_part(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=io.BytesIO(data),
        )
        return part["ETag"]

    async def _complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        s3 = await self._s3()
        await s3.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
            },
        )

    async def _abort_multipart(self, key: str, upload_id: str) -> None:
        # Best effort, on the way out of a failure: purge_incomplete aborts what is left
        # once it is old.
        with contextlib.suppress(Exception):
            s3 = await self._s3()
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _stage(self, key: str, staged: _Staged) -> None:
        self._unstage(key)
        self._dropped.pop(key, None)
        self._staged[key] = staged
        self._staged_bytes += staged.held
        while len(self._staged) > 1 and (
            len(self._staged) > _STAGED_MAX or self._staged_bytes > _STAGED_BYTES
        ):
            oldest = next(iter(self._staged))
            self._unstage(oldest)
            self._dropped[oldest] = None
            while len(self._dropped) > _DROPPED_MAX:
                self._dropped.popitem(last=False)

    def _remember(self, key: str, state: _State) -> None:
        self._known[key] = state
        self._known.move_to_end(key)
        while len(self._known) > _KNOWN_MAX:
            self._known.popitem(last=False)

    def _take_staged(self, key: str) -> _Staged | None:
        staged = self._staged.pop(key, None)
        if staged is not None:
            self._staged_bytes -= staged.held
        return staged

    def _unstage(self, key: str) -> None:
        """Drop a key's staged content; a multipart upload left is aborted."""
        staged = self._take_staged(key)
        if staged is not None and staged.upload_id is not None:
            task = asyncio.ensure_future(self._abort_multipart(staged.target, staged.upload_id))
            self._aborting.add(task)
            task.add_done_callback(self._aborting.discard)

    def _unstage_below(self, key: str) -> None:
        """Forget what is staged or known of the files at or under ``key``."""
        for staged_key in [k for k in self._staged if k == key or k.startswith(key + "/")]:
            self._unstage(staged_key)
        for known_key in [k for k in self._known if k == key or k.startswith(key + "/")]:
            del self._known[known_key]

    async def _complete(self, staged: _Staged) -> None:
        """Make a staged file's content the object at its target, atomically."""
        if staged.upload_id is None:
            await self._put(staged.target, staged.body or b"")
            return
        try:
            await self._complete_multipart(staged.target, staged.upload_id, staged.etags)
        except BaseException:
            await self._abort_multipart(staged.target, staged.upload_id)
            raise

    # -- copies --------------------------------------------------------------------------

    async def _copy_file(self, key: str, found: _File, target: str) -> None:
        """Make ``target`` a plain object with the content of ``key`` (server-side where
        the store can)."""
        s3 = await self._s3()
        if found.state is None:
            if found.size <= _MAX_COPY:
                await s3.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": key},
                )
                return
            pieces = [
                (key, start, min(_BIG_COPY_PIECE, found.size - start))
                for start in range(0, found.size, _BIG_COPY_PIECE)
            ]
            await self._compose(target, pieces)
            return
        segments = found.state.segments
        if not segments:
            await self._put(target, b"")
            return
        if len(segments) == 1:
            # One segment: a server-side copy of it (no multipart upload, the bytes do not
            # pass through the registry), if it holds exactly the recorded bytes; a
            # truncation leaves it longer, and then its recorded head is read and put.
            name, size = segments[0]
            source = _segment(key, name)
            if name in found.state.exact or await self._length(source) == size:
                await s3.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": source},
                )
            else:
                await self._put(target, await self._get_range(source, 0, size))
            return
        await self._compose(target, [(_segment(key, name), 0, size) for name, size in segments])

    async def _length(self, key: str) -> int:
        s3 = await self._s3()
        return int((await s3.head_object(Bucket=self.bucket, Key=key))["ContentLength"])

    async def _compose(self, target: str, pieces: list[tuple[str, int, int]]) -> None:
        """One multipart upload whose parts are server-side copies of byte ranges."""
        s3 = await self._s3()
        upload_id = await self._start_multipart(target)
        limit = asyncio.Semaphore(_COPY_CONCURRENCY)

        async def copy(number: int, key: str, start: int, length: int) -> str:
            async with limit:
                part = await s3.upload_part_copy(
                    Bucket=self.bucket,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    CopySourceRange=f"bytes={start}-{start + length - 1}",
                )
            return part["CopyPartResult"]["ETag"]

        copies = [asyncio.ensure_future(copy(n, *piece)) for n, piece in enumerate(pieces, start=1)]
        try:
            await self._complete_multipart(target, upload_id, await asyncio.gather(*copies))
        except BaseException:
            for task in copies:
                task.cancel()
            await asyncio.gather(*copies, return_exceptions=True)
            await self._abort_multipart(target, upload_id)
            raise

    # -- the StorageDriver interface -----------------------------------------------------

    async def stat(self, path: str) -> int | None:
        found = await self._describe(self._key(path))
        return None if found is None else found.size

    async def get_content(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.reader(path)])

    async def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        await self._put(self._key(path), data)  # an object store's PUT is durable anyway

    def local_path(self, path: str) -> Path | None:
        return None

    async def redirect_url(self, path: str) -> str | None:
        if not self.redirect:
            return None
        s3 = await self._s3()
        url: str = await s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(path)},
            ExpiresIn=self.redirect_expiry_seconds,
        )
        return url

    async def reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        key = self._key(path)
        if length == 0:
            if await self._describe(key) is None:
                raise StorageNotFound(path)
            return
        s3 = await self._s3()
        wanted = _range(offset, length)
        try:
            if wanted is None:
                response = await s3.get_object(Bucket=self.bucket, Key=key)
            else:
                response = await s3.get_object(Bucket=self.bucket, Key=key, Range=wanted)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise StorageNotFound(path) from None
            if _code(exc) != "InvalidRange":
                raise
            # The offset is past the object's end: a plain file read to its end, or a
            # segmented one whose state object is smaller than the offset.
            found = await self._describe(key)
            if found is None:
                raise StorageNotFound(path) from None
            if found.state is not None:
                async for chunk in self._read_segments(key, found.state, offset, length):
                    yield chunk
            return
        async with response["Body"] as body:
            if _MARKER not in response.get("Metadata", {}):
                while chunk := await body.read(_READ_CHUNK):
                    yield chunk
                return
        # A segmented file: the object is its state (possibly cut by our Range).
        state = await self._state(key)
        if state is None:
            raise StorageNotFound(path)
        async for chunk in self._read_segments(key, state, offset, length):
            yield chunk

    async def _read_segments(
        self, key: str, state: _State, offset: int, length: int | None
    ) -> AsyncIterator[bytes]:
        s3 = await self._s3()
        end = state.size if length is None else min(state.size, offset + length)
        start = 0
        for name, size in state.segments:
            first, last = max(offset, start), min(end, start + size)
            start += size
            if first >= last:
                continue
            response = await s3.get_object(
                Bucket=self.bucket,
                Key=_segment(key, name),
                Range=f"bytes={first - (start - size)}-{last - (start - size) - 1}",
            )
            async with response["Body"] as body:
                while chunk := await body.read(_READ_CHUNK):
                    yield chunk

    async def writer(self, path: str, append: bool = False, create: bool = True) -> S3Writer:
        key = self._key(path)
        self._lost.discard(key)
        self._unstage(key)  # a committed destined file not moved: it stays empty
        self._dropped.pop(key, None)
        self._known.pop(key, None)
        if not append and create:
            return S3Writer(self, key, _State(self.part_size), dirty=True, condition=None)
        found = await self._describe(key)
        if found is None:
            if not create:
                raise StorageNotFound(path)
            return S3Writer(self, key, _State(self.part_size), dirty=True, condition=_CREATE)
        if not append:  # an existing file, truncated: this write replaces it
            return S3Writer(self, key, _State(self.part_size), dirty=True, condition=None)
        if found.state is None:
            # A plain object (the blob store never appends to one): rewrite it as a
            # segmented file, streaming it through a writer (one part in memory).
            rewritten = S3Writer(self, key, _State(self.part_size), dirty=True, condition=None)
            async for chunk in self.reader(path):
                await rewritten.write(chunk)
            await rewritten.close()
            found = await self._describe(key)
            if found is None or found.state is None:
                raise StorageConflict(key)
        assert found.state is not None
        return S3Writer(self, key, found.state, dirty=False, condition=found.state.etag)

    @contextlib.asynccontextmanager
    async def holding(self, path: str) -> AsyncIterator[None]:
        """Nothing to hold: a session's writes are conditional on its state (above)."""
        yield

    async def move(self, src: str, dst: str) -> None:
        source, target = self._key(src), self._key(dst)
        staged = self._staged.get(source)
        if staged is not None:
            if staged.target != target:
                raise ValueError(f"{src} was destined to another path than {dst}")
            self._take_staged(source)
            # The file itself is left, empty: the session's end deletes it with the rest
            # (Writer.destine), one request fewer than deleting it here.
            await self._complete(staged)
            return
        if source in self._dropped:
            # Its content was dropped unmoved (see _STAGED_MAX): the file is empty, and
            # moving that would publish nothing under the target's name.
            raise StorageNotFound(src)
        known = self._known.pop(source, None)
        found = _File(known.size, known) if known is not None else await self._describe(source)
        if found is not None:
            await self._copy_file(source, found, target)
            await self._delete_file(source, found)
            return
        # A directory: move each file below it (segment objects go with their file).
        keys = await self._keys(source + "/")
        if not keys:
            raise StorageNotFound(src)
        for key in keys:
            rest = key[len(source) + 1 :]
            if any(p.endswith(_SEGMENTS) for p in rest.split("/")[:-1]):
                continue
            entry = await self._describe(key)
            if entry is not None:
                await self._copy_file(key, entry, f"{target}/{rest}")
        await self._delete_keys(await self._keys(source + "/"))

    async def truncate(self, path: str, size: int) -> None:
        key = self._key(path)
        self._unstage(key)
        self._known.pop(key, None)
        if key in self._lost:
            # Undoing an append that lost to another writer: the file is the winner's.
            self._lost.discard(key)
            return
        found = await self._describe(key)
        if found is None:
            raise StorageNotFound(path)
        if size >= found.size:
            return
        if found.state is None:
            # Plain: rewrite it segmented first (the blob store never truncates these).
            await (await self.writer(path, append=True)).close()
            found = await self._describe(key)
            if found is None or found.state is None:
                raise StorageConflict(key)
        state = found.state
        kept: list[tuple[str, int]] = []
        exact: set[str] = set()
        remaining = size
        for name, length in state.segments:
            if remaining <= 0:
                break
            taken = min(length, remaining)
            kept.append((name, taken))
            if taken == length and name in state.exact:
                exact.add(name)  # a segment cut short holds more than it records
            remaining -= taken
        # Only the state changes: the segments' bytes past the recorded sizes are ignored.
        await self._put_state(
            key, _State(state.part_size, kept, exact=frozenset(exact)), state.etag
        )

    async def delete(self, path: str) -> None:
        # One listing finds a file, its segments and a directory's content alike; keys
        # that merely start with the same characters are not this path's.
        key = self._key(path)
        self._unstage_below(key)
        mine = (key + "/", f"{key}{_SEGMENTS}/")
        found = [k for k in await self._keys(key) if k == key or k.startswith(mine)]
        if found:  # nothing listed, nothing to delete (a session its publish emptied)
            await self._delete_keys(found)

    async def list(self, prefix: str) -> list[str]:
        base = self._key(prefix) + "/"
        s3 = await self._s3()
        names: set[str] = set()
        async for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        ):
            names.update(p["Prefix"][len(base) : -1] for p in page.get("CommonPrefixes", []))
            names.update(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        return sorted(n for n in names if n and not n.endswith(_SEGMENTS))

    async def purge_incomplete(self, older_than: float) -> int:
        """Abort multipart uploads started before ``older_than`` (a copy a crash cut)."""
        s3 = await self._s3()
        aborted = 0
        async for page in s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._prefix
        ):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() >= older_than:
                    continue
                with contextlib.suppress(ClientError):  # finished or aborted meanwhile
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted
