"""Tag list, catalog and referrers endpoints."""

from __future__ import annotations

import json

from aiohttp import web

from registry_server.auth.model import Access, Principal
from registry_server.http.context import services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import digests, manifests, pagination


def _json(payload: object, extra: dict[str, str] | None = None) -> web.Response:
    return _body(json.dumps(payload).encode(), extra)


def _body(body: bytes, extra: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=200,
        body=body,
        content_type="application/json",
        headers={**API_VERSION_HEADER, **(extra or {})},
    )


async def list_tags(request: web.Request, name: str) -> web.Response:
    query = request.rel_url.query
    n = pagination.parse_n(query.get("n"))
    page = await services(request).discovery.tags(name, n, pagination.parse_last(query.get("last")))
    extra = {}
    if page.next_last is not None and n:
        extra["Link"] = pagination.link_header(f"/v2/{name}/tags/list", n, page.next_last)
    if page.body is not None:
        return _body(page.body, extra)
    return _json({"name": name, "tags": page.items}, extra)


async def catalog(request: web.Request, principal: Principal) -> web.Response:
    svc = services(request)
    query = request.rel_url.query
    n = pagination.parse_n(query.get("n"))

    async def visible(repo: str) -> bool:
        return await svc.auth.allowed(principal, Access.repository(repo, "pull"))

    page = await svc.discovery.catalog(n, pagination.parse_last(query.get("last")), visible)
    extra = {}
    if page.next_last is not None and n:
        extra["Link"] = pagination.link_header("/v2/_catalog", n, page.next_last)
    return _json({"repositories": page.items}, extra)


async def referrers(request: web.Request, name: str, digest_text: str) -> web.Response:
    subject = digests.parse(digest_text)
    artifact_type = request.rel_url.query.get("artifactType")
    result = await services(request).discovery.referrers(name, subject, artifact_type)
    headers = {**API_VERSION_HEADER}
    if result.filtered:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(
        status=200, body=result.body, content_type=manifests.OCI_INDEX, headers=headers
    )
