"""Berth's replication endpoints: status, and state digests for anti-entropy."""

from __future__ import annotations

import json

from aiohttp import web

from registry_server.auth.model import REPLICATION
from registry_server.http import body
from registry_server.http.context import client_address, services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import errors, names

_MAX_HASH_QUERY = 1000
# A query of _MAX_HASH_QUERY names of at most 255 characters, with room to spare.
MAX_MESSAGE_BYTES = 1 << 20


async def _authorize(request: web.Request) -> None:
    await services(request).auth.authorize(
        request.headers.get("Authorization"), client_address(request), [REPLICATION]
    )


def _json(payload: object) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=API_VERSION_HEADER,
    )


async def status(request: web.Request) -> web.Response:
    await _authorize(request)
    svc = services(request)
    if svc.replicator is None:
        return _json({"region": svc.region, "peers": []})
    return _json(await svc.replicator.status())


async def hashes(request: web.Request) -> web.Response:
    """Hashes of the requested repositories' tag states (None where unknown)."""
    await _authorize(request)
    raw = await body.read_limited(
        request, MAX_MESSAGE_BYTES, errors.BODY_TOO_LARGE, errors.BODY_INVALID
    )
    try:
        payload = json.loads(raw)
        wanted = payload["repositories"]
        if not isinstance(wanted, list) or len(wanted) > _MAX_HASH_QUERY:
            raise ValueError
        wanted = [names.validate_name(str(n)) for n in wanted]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise errors.RegistryError(
            errors.BODY_INVALID, detail={"reason": "expected {repositories: [name, ...]}"}
        ) from None
    index = services(request).index
    found: dict[str, str] = {}
    for name in wanted:
        digest = await index.repository_hash(name)
        if digest is not None:
            found[name] = digest
    return _json({"hashes": found})


async def state(request: web.Request) -> web.Response:
    await _authorize(request)
    repo = names.validate_name(request.rel_url.query.get("repository", ""))
    index = services(request).index
    tags = [
        {"name": t.name, "digest": t.digest, "version": t.version, "origin": t.origin}
        for t in await index.tag_states(repo)
    ]
    referrers: list[str] = []
    deleted: list[dict[str, object]] = []
    stored: dict[str, int] = {}
    for ref in await index.referrer_states(repo):
        if ref.deleted is not None:
            deleted.append(
                {"digest": ref.digest, "version": ref.deleted.version, "origin": ref.deleted.origin}
            )
        else:
            referrers.append(ref.digest)
            if ref.stored is not None:
                stored[ref.digest] = ref.stored
    return _json(
        {
            "repository": repo,
            "tags": tags,
            "referrers": referrers,
            # Each one's clock version when first stored, and the referrers deleted by
            # digest (the delete's stamp): so that anti-entropy neither brings back a
            # deleted referrer nor misses a delete (Berth before these fields: none).
            "referrers_stored": stored,
            "deleted_referrers": deleted,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/berth/v1/replication/status", status)
    app.router.add_route("POST", "/berth/v1/replication/hashes", hashes)
    app.router.add_route("GET", "/berth/v1/replication/state", state)
