"""Blob upload sessions: POST (start, single-shot, mount), PATCH, PUT, GET, DELETE."""

from __future__ import annotations

from aiohttp import web

from registry_server.auth.model import Access, Principal
from registry_server.http import body, manifests
from registry_server.http.context import services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import digests, errors, names, ranges
from registry_server.services.blobs import upload_headers


def _accepted(name: str, upload_id: str, size: int) -> web.Response:
    return web.Response(
        status=202,
        headers={
            **API_VERSION_HEADER,
            **upload_headers(name, upload_id, size),
            "Content-Length": "0",
        },
    )


def _created(name: str, digest: digests.Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={
            **API_VERSION_HEADER,
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": str(digest),
            "Content-Length": "0",
        },
    )


async def start_upload(request: web.Request, name: str, principal: Principal) -> web.Response:
    svc = services(request)
    query = request.rel_url.query
    mount = query.get("mount")
    if mount is not None:
        digest = digests.parse(mount)
        source = query.get("from")
        if source is not None:
            names.validate_name(source)

        async def may_pull(repo: str) -> bool:
            return await svc.auth.allowed(principal, Access.repository(repo, "pull"))

        if await svc.blobs.mount(name, digest, source, may_pull):
            return _created(name, digest)
    # A peer's copy of what another region took: that region held it to the quota.
    exempt = await manifests.replicated(request, principal)
    if mount is None and "digest" in query:
        digest = digests.parse(query["digest"])
        await svc.blobs.upload_whole(name, digest, body.stream(request), quota_exempt=exempt)
        return _created(name, digest)
    upload_id = await svc.blobs.start_upload(name, quota_exempt=exempt)
    return _accepted(name, upload_id, 0)


async def upload_status(request: web.Request, name: str, upload_id: str) -> web.Response:
    info = await services(request).blobs.upload_status(name, upload_id)
    return web.Response(
        status=204,
        headers={
            **API_VERSION_HEADER,
            **upload_headers(name, upload_id, info.size),
            "Content-Length": "0",
        },
    )


async def _chunk_range(
    request: web.Request, name: str, upload_id: str
) -> tuple[tuple[int, int] | None, int | None]:
    """``_parse_chunk_range``; a 416 tells where the session stands, as every 416 does."""
    try:
        return _parse_chunk_range(request)
    except errors.RegistryError as exc:
        if exc.error is not errors.RANGE_INVALID or exc.headers:
            raise
        info = await services(request).blobs.upload_status(name, upload_id)
        raise errors.RegistryError(
            exc.error, detail=exc.detail, headers=upload_headers(name, upload_id, info.size)
        ) from None


def _parse_chunk_range(request: web.Request) -> tuple[tuple[int, int] | None, int | None]:
    """The chunk's Content-Range and the body length it implies; 416 when Content-Length
    says otherwise (a body that is longer or shorter while streaming is SIZE_INVALID)."""
    header = request.headers.get("Content-Range")
    if not header:
        return None, None
    content_range = ranges.parse_content_range(header)
    expected = content_range[1] - content_range[0] + 1
    declared = body.content_length(request)
    if declared is not None and declared != expected:
        raise errors.RegistryError(
            errors.RANGE_INVALID, detail={"Content-Range": header, "Content-Length": declared}
        )
    return content_range, expected


async def patch_upload(request: web.Request, name: str, upload_id: str) -> web.Response:
    svc = services(request)
    content_range, expected = await _chunk_range(request, name, upload_id)
    size = await svc.blobs.append(name, upload_id, body.stream(request, expected), content_range)
    return _accepted(name, upload_id, size)


async def put_upload(request: web.Request, name: str, upload_id: str) -> web.Response:
    svc = services(request)
    digest_text = request.rel_url.query.get("digest")
    if not digest_text:
        raise errors.RegistryError(errors.DIGEST_INVALID, detail={"reason": "digest missing"})
    digest = digests.parse(digest_text)
    has_body = (body.content_length(request) or 0) > 0 or request.headers.get(
        "Transfer-Encoding", ""
    ).lower() == "chunked"
    if has_body:  # a Content-Range on the final PUT describes its body, as on a PATCH
        content_range, expected = await _chunk_range(request, name, upload_id)
    else:  # without a body it only has to start where the session is
        header = request.headers.get("Content-Range")
        content_range, expected = (ranges.parse_content_range(header) if header else None), None
    await svc.blobs.finish_upload(
        name,
        upload_id,
        digest,
        body.stream(request, expected) if has_body else None,
        content_range,
    )
    return _created(name, digest)


async def cancel_upload(request: web.Request, name: str, upload_id: str) -> web.Response:
    await services(request).blobs.cancel_upload(name, upload_id)
    return web.Response(status=204, headers={**API_VERSION_HEADER, "Content-Length": "0"})
