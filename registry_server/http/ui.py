"""The web UI under ``/ui/``: server-side rendered pages (Jinja2), no JavaScript, no
assets from elsewhere (docs/ui.md).

Who sees what is the registry's own policy: a visitor sees the repositories it may
pull (anonymous visitors what anonymous pull allows) and delete buttons only where it
may delete. Logging in with a registry account gives a session cookie holding a token
signed by the registry's key for the UI's own audience (``SessionSource``): HttpOnly,
SameSite=Strict, Secure behind TLS, valid on every worker and replica, and void once
the account's secret changes. Every form that changes something carries a CSRF token
equal to a cookie of its own (double submit) and must come from this origin.
"""

from __future__ import annotations

import datetime
import hmac
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jinja2
from aiohttp import web

from registry_server import __version__
from registry_server.auth.model import (
    ANONYMOUS,
    REPLICATION,
    Access,
    Principal,
    SessionSource,
)
from registry_server.http import body
from registry_server.http.context import client_address, services
from registry_server.protocol import digests, errors, names, pagination
from registry_server.protocol.sizes import format_bytes
from registry_server.services import gc
from registry_server.storage.space import SpaceMonitor

PREFIX = "/ui"
SESSION_COOKIE = "berth_session"
CSRF_COOKIE = "berth_csrf"
REPOSITORIES_PER_PAGE = 50
TAGS_PER_PAGE = 100
_SEARCH_MAX = 128

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("registry_server.http", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters["size"] = lambda value: format_bytes(int(value))
_ENV.filters["when"] = lambda value: datetime.datetime.fromtimestamp(
    float(value), datetime.UTC
).strftime("%Y-%m-%d %H:%M UTC")
_ENV.filters["query"] = lambda value: urllib.parse.urlencode(
    {k: v for k, v in dict(value).items() if v}
)
_STYLE = (_ENV.loader.get_source(_ENV, "style.css")[0] if _ENV.loader else "").encode()

# No script, no frames, no form posting elsewhere, styles only from here.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Visitor:
    """Who asks, and what the page needs to know about it."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.auth = services(request).auth
        self.sessions = self.auth if isinstance(self.auth, SessionSource) else None
        value = request.cookies.get(SESSION_COOKIE, "")
        found = self.sessions.session_principal(value) if self.sessions and value else None
        self.principal: Principal = found or ANONYMOUS
        known = request.cookies.get(CSRF_COOKIE, "")
        self.new_csrf = len(known) != 43  # token_urlsafe(32)
        self.csrf = secrets.token_urlsafe(32) if self.new_csrf else known

    async def may(self, repo: str, action: str) -> bool:
        return await self.auth.allowed(self.principal, Access.repository(repo, action))

    def context(self) -> dict[str, Any]:
        return {
            "user": self.principal.name,
            "sessions": self.sessions is not None,
            "csrf": self.csrf,
            "notice": self.request.rel_url.query.get("notice", ""),
        }


def _secure(request: web.Request) -> bool:
    """Whether the browser reached the UI over HTTPS: directly, through a trusted proxy
    that says so, or at an https external_url (a TLS proxy not listed as trusted)."""
    svc = services(request)
    if request.secure or svc.clients.forwarded_https(request):
        return True
    external = urllib.parse.urlsplit(svc.external_url)
    return external.scheme == "https" and external.netloc == request.host


def _cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=f"{PREFIX}/",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        max_age=None,
    )


def _page(visitor: _Visitor, template: str, status: int = 200, **values: Any) -> web.Response:
    html = _ENV.get_template(template).render(**visitor.context(), **values)
    response = web.Response(
        text=html, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )
    if visitor.new_csrf:
        _cookie(response, visitor.request, CSRF_COOKIE, visitor.csrf)
    return response


def _error_page(visitor: _Visitor, err: errors.RegistryError) -> web.Response:
    return _page(
        visitor,
        "error.html",
        status=err.status,
        http_status=err.status,
        code=err.error.code,
        message=err.message or err.error.message,
    )


def _host(request: web.Request) -> str:
    """The registry's address as clients pull from it."""
    external = services(request).external_url
    if external:
        return urllib.parse.urlsplit(external).netloc or request.host
    return request.host


Handler = Callable[[web.Request, _Visitor], Awaitable[web.StreamResponse]]


def _page_handler(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        visitor = _Visitor(request)
        try:
            return await handler(request, visitor)
        except errors.RegistryError as err:
            if err.status >= 500:
                raise
            return _error_page(visitor, err)

    return wrapped


def _name(query: Mapping[str, str]) -> str:
    return names.validate_name(query.get("name", ""))


async def _pullable(visitor: _Visitor, repo: str) -> None:
    """Unknown and forbidden look alike: a visitor learns nothing of what it cannot pull."""
    if not await visitor.may(repo, "pull"):
        raise errors.RegistryError(errors.NAME_UNKNOWN, detail={"name": repo})


# -- pages -----------------------------------------------------------------------------------


async def repositories(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    query = request.rel_url.query
    q = query.get("q", "").strip().lower()[:_SEARCH_MAX]
    rows, next_last = await services(request).browse.repositories(
        REPOSITORIES_PER_PAGE,
        pagination.parse_last(query.get("last")),
        q,
        lambda repo: visitor.may(repo, "pull"),
    )
    return _page(visitor, "repositories.html", rows=rows, q=q, next_last=next_last)


async def repository(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    query = request.rel_url.query
    name = _name(query)
    await _pullable(visitor, name)
    browse = services(request).browse
    repo = await browse.usage(name)
    rows, next_last = await browse.tags(
        name, TAGS_PER_PAGE, pagination.parse_last(query.get("last"))
    )
    return _page(
        visitor,
        "repository.html",
        name=name,
        repo=repo,
        rows=rows,
        next_last=next_last,
        host=_host(request),
        may_delete=await visitor.may(name, "delete"),
    )


async def manifest(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    query = request.rel_url.query
    name = _name(query)
    digest = str(digests.parse(query.get("digest", "")))
    await _pullable(visitor, name)
    page = await services(request).browse.manifest(name, digest)
    return _page(
        visitor,
        "manifest.html",
        page=page,
        d=page.description,
        host=_host(request),
        may_delete=await visitor.may(name, "delete"),
    )


async def status(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    """The version for everyone; the rest (peers' addresses and errors, storage) for
    admins, as the API's replication status (``registry:replication:*``)."""
    svc = services(request)
    admin = await svc.auth.allowed(visitor.principal, REPLICATION)
    peers: list[dict[str, Any]] = []
    note = "No replication peers are configured."
    if svc.replicator is not None and admin:
        peers = list((await svc.replicator.status()).get("peers") or [])
    elif svc.replicating:
        note = "Replication runs in another worker process of this server."
    return _page(
        visitor,
        "status.html",
        admin=admin,
        version=__version__,
        region=svc.region,
        storage=_storage(svc.space),
        gc=gc.last_round,
        peers=peers,
        replication_note=note,
    )


def _storage(space: SpaceMonitor) -> str:
    """The volume's free space (``describe`` words it for a refusal, full or not)."""
    free, total = space.free_bytes, space.total_bytes
    if free is None:
        return "no local volume" if space.root is None else "not measured yet"
    text = f"{format_bytes(free)} free"
    if total:
        text += f" of {format_bytes(total)} ({100 * (total - free) / total:.0f}% used)"
    return text + (": full, pushes are refused" if space.full else "")


async def style(_: web.Request) -> web.StreamResponse:
    return web.Response(
        body=_STYLE,
        content_type="text/css",
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


async def login_form(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    return _page(visitor, "login.html", error="", next=_next(request.rel_url.query.get("next")))


def _next(value: str | None) -> str:
    """Where to go after logging in: a page of the UI, never another site."""
    if value and value.startswith(f"{PREFIX}/") and not value.startswith("//"):
        return value
    return f"{PREFIX}/"


def _same_origin(request: web.Request, origin: urllib.parse.SplitResult) -> bool:
    """Host and port, and the scheme: a page of http://<this host> posting to the UI
    served over HTTPS is another origin (found by review: the scheme was not compared).
    An https page posting to what this server sees as plain HTTP is a TLS proxy it was
    not told of, as before."""
    scheme_ok = origin.scheme == "https" or not _secure(request)
    return origin.netloc == request.host and scheme_ok


async def _form(request: web.Request, visitor: _Visitor) -> Mapping[str, str]:
    """A state-changing form's fields, once its CSRF token and origin check out."""
    # Read as every other body is: bounded however it is sent, and under the idle
    # timeout (a form that never finished held its connection for good).
    raw = await body.read_limited(request, _FORM_BYTES, errors.BODY_TOO_LARGE, errors.BODY_INVALID)
    try:
        pairs = urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raise errors.RegistryError(errors.BODY_INVALID, detail={"reason": "not UTF-8"}) from None
    fields = dict(pairs)
    origin = request.headers.get("Origin")
    same_origin = origin is None or _same_origin(request, urllib.parse.urlsplit(origin))
    token = fields.get("csrf", "")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not (same_origin and cookie and hmac.compare_digest(token.encode(), cookie.encode())):
        raise errors.RegistryError(
            errors.DENIED, message="the form's CSRF token is missing or wrong: reload the page"
        )
    return fields


_FORM_BYTES = 16 * 1024  # a form's fields: a name, a password, a token


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **_HEADERS})


async def login(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    fields = await _form(request, visitor)
    target = _next(fields.get("next"))
    if visitor.sessions is None:
        return _redirect(target)
    try:
        value = await visitor.sessions.open_session(
            fields.get("username", "")[:256],
            fields.get("password", "")[:1024],
            client_address(request),
        )
    except errors.RegistryError as err:
        why = err.message or err.error.message
        return _page(visitor, "login.html", status=err.status, error=why, next=target)
    response = _redirect(target)
    _cookie(response, request, SESSION_COOKIE, value)
    return response


async def logout(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    await _form(request, visitor)
    value = request.cookies.get(SESSION_COOKIE, "")
    if visitor.sessions is not None and value:
        await visitor.sessions.end_session(value)  # a copy of the cookie is refused too
    response = _redirect(f"{PREFIX}/")
    response.del_cookie(SESSION_COOKIE, path=f"{PREFIX}/")
    return response


async def delete(request: web.Request, visitor: _Visitor) -> web.StreamResponse:
    fields = await _form(request, visitor)
    name = names.validate_name(fields.get("name", ""))
    await _pullable(visitor, name)
    if not await visitor.may(name, "delete"):
        raise errors.RegistryError(errors.DENIED, message=f"you may not delete in {name}")
    tag, digest = fields.get("tag"), fields.get("digest")
    reference = names.validate_tag(tag) if tag else str(digests.parse(digest or ""))
    actor = visitor.principal.name or None
    await services(request).manifests.delete(name, reference, actor=actor)
    gone = f"tag {tag}" if tag else f"manifest {reference}"
    query = urllib.parse.urlencode({"name": name, "notice": f"Deleted {gone}."})
    return _redirect(f"{PREFIX}/repository?{query}")


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", PREFIX, _to_home)
    app.router.add_route("GET", f"{PREFIX}/", _page_handler(repositories))
    app.router.add_route("GET", f"{PREFIX}/repository", _page_handler(repository))
    app.router.add_route("GET", f"{PREFIX}/manifest", _page_handler(manifest))
    app.router.add_route("GET", f"{PREFIX}/status", _page_handler(status))
    app.router.add_route("GET", f"{PREFIX}/login", _page_handler(login_form))
    app.router.add_route("POST", f"{PREFIX}/login", _page_handler(login))
    app.router.add_route("POST", f"{PREFIX}/logout", _page_handler(logout))
    app.router.add_route("POST", f"{PREFIX}/delete", _page_handler(delete))
    app.router.add_route("GET", f"{PREFIX}/static/style.css", style)


async def _to_home(_: web.Request) -> web.Response:
    # A coroutine function, as aiohttp wants (a lambda returning a coroutine is deprecated).
    return _redirect(f"{PREFIX}/")
