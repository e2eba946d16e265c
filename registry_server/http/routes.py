"""The route table: OCI paths (names contain slashes) matched once, access checked once."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from registry_server.auth.model import CATALOG, METRICS, Access, Principal
from registry_server.http import blobs, discovery, health, manifests, token, uploads
from registry_server.http.context import client_address, services
from registry_server.http.errors import API_VERSION_HEADER
from registry_server.protocol import errors, names

Handler = Callable[[web.Request, "Match"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Match:
    name: str
    arg: str
    principal: Principal


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern[str]
    # method -> (actions needed on the repository, handler)
    methods: dict[str, tuple[tuple[str, ...], Handler]]


def _r(operation: str, **methods: tuple[tuple[str, ...], Handler]) -> Route:
    # The name may be empty (or the path start at the operation) so that validation, not
    # routing, refuses it: NAME_INVALID rather than "no such endpoint".
    pattern = rf"^(?:(?P<name>.*)/)?{operation}\Z"
    return Route(re.compile(pattern), {m.upper(): v for m, v in methods.items()})


PULL, PUSH, DELETE = ("pull",), ("pull", "push"), ("delete",)

# Greedy names: the last occurrence of an operation segment is the operation.
ROUTES: tuple[Route, ...] = (
    _r(r"tags/list", get=(PULL, lambda r, m: discovery.list_tags(r, m.name))),
    _r(
        r"manifests/(?P<arg>[^/]+)",
        get=(PULL, lambda r, m: manifests.get_manifest(r, m.name, m.arg)),
        head=(PULL, lambda r, m: manifests.get_manifest(r, m.name, m.arg)),
        put=(PUSH, lambda r, m: manifests.put_manifest(r, m.name, m.arg, m.principal)),
        delete=(DELETE, lambda r, m: manifests.delete_manifest(r, m.name, m.arg, m.principal)),
    ),
    _r(
        r"blobs/uploads/?",
        post=(PUSH, lambda r, m: uploads.start_upload(r, m.name, m.principal)),
    ),
    _r(
        r"blobs/uploads/(?P<arg>[^/]+)",
        get=(PUSH, lambda r, m: uploads.upload_status(r, m.name, m.arg)),
        patch=(PUSH, lambda r, m: uploads.patch_upload(r, m.name, m.arg)),
        put=(PUSH, lambda r, m: uploads.put_upload(r, m.name, m.arg)),
        delete=(PUSH, lambda r, m: uploads.cancel_upload(r, m.name, m.arg)),
    ),
    _r(
        r"blobs/(?P<arg>[^/]+)",
        get=(PULL, lambda r, m: blobs.get_blob(r, m.name, m.arg)),
        head=(PULL, lambda r, m: blobs.get_blob(r, m.name, m.arg)),
        delete=(DELETE, lambda r, m: blobs.delete_blob(r, m.name, m.arg)),
    ),
    # Last, and taking any argument: a path no other route serves that names referrers has
    # a malformed digest (empty, or with a slash), which the handler refuses as such.
    _r(
        r"referrers/(?P<arg>.*)",
        get=(PULL, lambda r, m: discovery.referrers(r, m.name, m.arg)),
    ),
)


async def base(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    await svc.auth.authorize(request.headers.get("Authorization"), client_address(request), [])
    return web.json_response({}, headers=API_VERSION_HEADER)


async def catalog(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    principal = await svc.auth.authorize(
        request.headers.get("Authorization"), client_address(request), [CATALOG]
    )
    return await discovery.catalog(request, principal)


async def dispatch(request: web.Request) -> web.StreamResponse:
    path = request.match_info["tail"]
    for route in ROUTES:
        m = route.pattern.match(path)
        if m is None:
            continue
        entry = route.methods.get(request.method)
        if entry is None:
            raise errors.RegistryError(
                errors.METHOD_NOT_ALLOWED,
                detail={"method": request.method},
                headers={"Allow": ", ".join(sorted(route.methods))},
            )
        actions, handler = entry
        name = names.validate_name(m.group("name") or "")
        svc = services(request)
        if svc.pull_through is not None:
            # containerd names the mirrored host in ?ns=; policy sees the local name.
            name = svc.pull_through.local_name(name, request.query.get("ns"))
            if "push" in actions:
                svc.pull_through.require_writable(name)
        principal = await svc.auth.authorize(
            request.headers.get("Authorization"),
            client_address(request),
            [Access.repository(name, *actions)],
        )
        return await handler(request, Match(name, m.groupdict().get("arg") or "", principal))
    raise errors.RegistryError(errors.ROUTE_UNKNOWN, detail={"path": request.path[:300]})


async def registry_metrics(request: web.Request) -> web.Response:
    """``/metrics`` on the registry's port: with auth on, for admins (Prometheus with
    basic_auth); on ``http.metrics_addr``'s own listener it needs none."""
    await services(request).auth.authorize(
        request.headers.get("Authorization"), client_address(request), [METRICS]
    )
    return await health.metrics(request)


def add_routes(app: web.Application, metrics: bool = True) -> None:
    """The registry's routes; ``/metrics`` too unless it has a listener of its own."""
    app.router.add_route("GET", "/v2/", base)
    app.router.add_route("HEAD", "/v2/", base)
    app.router.add_route("GET", "/v2", base)
    app.router.add_route("GET", "/v2/_catalog", catalog)
    # Not _catalog: its other methods are the router's 405, with Allow: GET.
    app.router.add_route("*", "/v2/{tail:(?!_catalog$).+}", dispatch)
    app.router.add_route("GET", "/healthz", health.healthz)
    app.router.add_route("GET", "/readyz", health.readyz)
    app.router.add_route("GET", "/readyz/writes", health.readyz_writes)
    if metrics:
        app.router.add_route("GET", "/metrics", registry_metrics)
    token.add_routes(app)
