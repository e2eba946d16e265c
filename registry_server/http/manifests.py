"""Manifest GET/HEAD/PUT/DELETE."""

from __future__ import annotations

import time

from aiohttp import web

from registry_server.auth.model import REPLICATION, Principal
from registry_server.http import body
from registry_server.http.context import services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import errors, manifests, versions


def _accept(request: web.Request) -> list[str]:
    return [
        part.strip()
        for value in request.headers.getall("Accept", [])
        for part in value.split(",")
        if part.strip()
    ]


async def get_manifest(request: web.Request, name: str, reference: str) -> web.Response:
    svc = services(request)
    head = request.method == "HEAD"
    stale = None
    if svc.pull_through is not None:
        stale = await svc.pull_through.manifest(name, reference)
    record = await svc.manifests.get(name, reference, content=not head)
    if not manifests.negotiate(record.media_type, _accept(request)):
        raise errors.RegistryError(
            errors.MANIFEST_UNKNOWN,
            detail={"reason": "no acceptable media type", "mediaType": record.media_type},
        )
    headers = {
        **API_VERSION_HEADER,
        "Docker-Content-Digest": record.digest,
        "Content-Type": record.media_type,
        "Content-Length": str(record.size),
        "ETag": f'"{record.digest}"',
    }
    if stale is not None:
        headers["Warning"] = stale
    if head:
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=record.content, headers=headers)


async def _stamp(request: web.Request, principal: Principal) -> versions.Stamp | None:
    """A replicated change's version, accepted only from principals allowed to replicate."""
    stamp = versions.from_headers(
        request.headers.get(versions.VERSION_HEADER), request.headers.get(versions.ORIGIN_HEADER)
    )
    if stamp is not None and not await services(request).auth.allowed(principal, REPLICATION):
        raise errors.RegistryError(errors.DENIED, detail={"reason": "replication not allowed"})
    if stamp is not None:
        _not_too_far_ahead(stamp.version, stamp.origin[:63])
    return stamp


def _not_too_far_ahead(version: int, region: str) -> None:
    if versions.too_far_ahead(versions.Stamp(version, region), time.time()):
        raise errors.RegistryError(
            errors.CLOCK_AHEAD,
            detail={
                "reason": f"the change's clock is more than {versions.MAX_AHEAD_SECONDS:g} s"
                f" ahead of this region's: check the clocks of {region} and here"
            },
            headers={"Retry-After": str(errors.CLOCK_AHEAD_RETRY_AFTER)},
        )


def _stored_version(request: web.Request) -> int | None:
    """A referrer's version when first stored, as the peer sending it says."""
    stored = versions.stored_version_from_header(
        request.headers.get(versions.STORED_VERSION_HEADER)
    )
    if stored is not None:
        _not_too_far_ahead(stored, "the sending region")
    return stored


async def replicated(request: web.Request, principal: Principal) -> bool:
    """Whether a peer says it sends this by digest, as only those allowed to replicate
    may (it lifts the quota)."""
    if request.headers.get(versions.REPLICATED_HEADER) is None:
        return False
    if not await services(request).auth.allowed(principal, REPLICATION):
        raise errors.RegistryError(errors.DENIED, detail={"reason": "replication not allowed"})
    return True


async def put_manifest(
    request: web.Request, name: str, reference: str, principal: Principal
) -> web.Response:
    svc = services(request)
    content = await body.read_limited(request, svc.max_manifest_bytes)
    extra_tags = request.rel_url.query.getall("tag", [])
    stamp = await _stamp(request, principal)
    by_peer = stamp is None and await replicated(request, principal)
    stored_version = _stored_version(request) if by_peer else None
    result = await svc.manifests.put(
        name,
        reference,
        content,
        request.headers.get("Content-Type"),
        extra_tags,
        stamp,
        actor=principal.name or None,
        replicated=by_peer,
        stored_version=stored_version,
    )
    headers = {
        **API_VERSION_HEADER,
        "Location": f"/v2/{name}/manifests/{result.digest}",
        "Docker-Content-Digest": result.digest,
        "Content-Length": "0",
    }
    if extra_tags:
        headers["OCI-Tag"] = ", ".join(extra_tags)
    if result.subject:
        headers["OCI-Subject"] = result.subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(
    request: web.Request, name: str, reference: str, principal: Principal
) -> web.Response:
    stamp = await _stamp(request, principal)
    await services(request).manifests.delete(name, reference, stamp, actor=principal.name or None)
    return web.Response(status=202, headers={**API_VERSION_HEADER, "Content-Length": "0"})
