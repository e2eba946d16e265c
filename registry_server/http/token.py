"""The token endpoint (Docker token protocol, GET and the OAuth2 POST form).

GET  /token?service=..&scope=..[&offline_token=true]   with Basic credentials, or none
     for an anonymous token;
POST /token  grant_type=password|refresh_token, username, password, refresh_token, scope,
     service, access_type=offline.
The handler only takes the request apart and renders the answer; authentication and the
grant decision belong to the Authorizer (registry_server.auth).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.typedefs import Middleware

from registry_server.auth.model import (
    REQUEST_ORIGIN,
    Background,
    TokenError,
    TokenIssuer,
    TokenRequest,
)
from registry_server.http import body
from registry_server.http.context import SERVICES, Handler, client_address, services
from registry_server.protocol import errors

PATH = "/token"
# A token request is a handful of short fields; anything larger is not one.
MAX_FORM_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def origin_middleware(relayed_hosts: Iterable[str] = ()) -> Middleware:
    """Make each request's origin available to the Authorizer for challenge realms.

    `relayed_hosts` (http.relayed_hosts) are Host values whose clients speak plain HTTP
    to a relay that re-encrypts to this TLS listener (the node proxy's localhost:<port>):
    their realm must say http://, the scheme they can reach, not the one we see."""
    relayed = frozenset(host.lower() for host in relayed_hosts)

    @web.middleware
    async def origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, host = request.scheme, request.host
        if scheme == "https" and host.lower() in relayed:
            scheme = "http"
        reset = REQUEST_ORIGIN.set(f"{scheme}://{host}")
        try:
            return await handler(request)
        finally:
            REQUEST_ORIGIN.reset(reset)

    return origin


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


async def _from_form(request: web.Request) -> TokenRequest:
    if request.content_type != "application/x-www-form-urlencoded":
        raise TokenError(400, "invalid_request", "expected application/x-www-form-urlencoded")
    try:
        raw = await body.read_limited(
            request, MAX_FORM_BYTES, errors.BODY_TOO_LARGE, errors.BODY_INVALID
        )
    except errors.RegistryError as err:
        if err.status == 413:
            raise TokenError(413, "invalid_request", "request body too large") from None
        raise TokenError(400, "invalid_request", "the request body was cut short") from None
    try:
        form = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise TokenError(400, "invalid_request", "the form is not UTF-8") from None

    def one(key: str) -> str | None:
        values = form.get(key)
        return values[0] if values else None

    return TokenRequest(
        client=client_address(request),
        scopes=tuple(form.get("scope", [])),
        service=one("service"),
        grant_type=one("grant_type") or "",
        username=one("username"),
        password=one("password"),
        refresh_token=one("refresh_token"),
        offline=one("access_type") == "offline",
    )


def _from_query(request: web.Request) -> TokenRequest:
    query = request.query
    return TokenRequest(
        client=client_address(request),
        scopes=tuple(query.getall("scope", [])),
        service=query.get("service"),
        authorization=request.headers.get("Authorization"),
        offline=_truthy(query.get("offline_token")),
    )


async def token(request: web.Request) -> web.StreamResponse:
    issuer = services(request).auth
    if not isinstance(issuer, TokenIssuer):
        # No auth configured: there is nothing to hand out tokens for.
        raise errors.RegistryError(errors.ROUTE_UNKNOWN, detail={"path": request.path})
    try:
        wanted = await _from_form(request) if request.method == "POST" else _from_query(request)
        issued = await issuer.issue_token(wanted)
    except TokenError as err:
        refusal = {"error": err.error, "error_description": err.description}
        return web.json_response(refusal, status=err.status, headers={**_NO_STORE, **err.headers})
    answer: dict[str, object] = {
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": issued.issued_at,
        "scope": issued.scope,
    }
    if request.method == "GET":
        answer["token"] = issued.token  # the Docker token protocol's name for it
    if issued.refresh_token is not None:
        answer["refresh_token"] = issued.refresh_token
    return web.json_response(answer, headers=_NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", PATH, token)
    app.router.add_route("POST", PATH, token)


def setup(app: web.Application, relayed_hosts: Iterable[str] = ()) -> None:
    """Request origins for challenges, and the Authorizer's own background work."""
    app.middlewares.append(origin_middleware(relayed_hosts))
    auth = app[SERVICES].auth
    if isinstance(auth, Background):
        background: Background = auth

        async def start(_: web.Application) -> None:
            await background.start()

        async def stop(_: web.Application) -> None:
            await background.stop()

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
