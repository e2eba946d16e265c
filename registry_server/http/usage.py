"""What repositories store against their quotas (``GET /berth/v1/usage``).

``?repository=<name>`` answers for one repository to whoever may pull it; without it,
the repositories the caller may pull, paginated like the catalog (``n``, ``last``, a
``Link`` header), with the catalog's rights (docs/usage-and-quotas.md).
"""

from __future__ import annotations

import json

from aiohttp import web

from registry_server.auth.model import CATALOG, Access
from registry_server.http.context import client_address, services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import names, pagination

PATH = "/berth/v1/usage"


def _json(payload: object, extra: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers={**API_VERSION_HEADER, **(extra or {})},
    )


async def usage(request: web.Request) -> web.Response:
    svc = services(request)
    query = request.rel_url.query
    header = request.headers.get("Authorization")
    if "repository" in query:
        repo = names.validate_name(query["repository"])
        await svc.auth.authorize(header, client_address(request), [Access.repository(repo, "pull")])
        return _json((await svc.usage.one(repo)).as_json())
    principal = await svc.auth.authorize(header, client_address(request), [CATALOG])
    n = pagination.parse_n(query.get("n"))

    async def visible(repo: str) -> bool:
        return await svc.auth.allowed(principal, Access.repository(repo, "pull"))

    entries, next_last = await svc.usage.page(n, pagination.parse_last(query.get("last")), visible)
    extra = {}
    if next_last is not None and n:
        extra["Link"] = pagination.link_header(PATH, n, next_last)
    return _json({"repositories": [e.as_json() for e in entries]}, extra)


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", PATH, usage)
