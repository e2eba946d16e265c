"""The one place registry errors become HTTP responses."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from registry_server.http.context import Handler
from registry_server.protocol import errors
from registry_server.storage.driver import BackendUnavailable, StorageConflict, StorageFull

log = logging.getLogger("registry_server.http")

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}

# aiohttp's own refusals (no route, wrong method, a body read past its limit), by status.
_FRAMEWORK = {
    404: errors.ROUTE_UNKNOWN,
    405: errors.METHOD_NOT_ALLOWED,
    413: errors.BODY_TOO_LARGE,
}


def render(err: errors.RegistryError, head: bool = False) -> web.Response:
    headers = {**API_VERSION_HEADER, **err.headers}
    body = json.dumps(err.body()).encode()
    if head:
        headers["Content-Length"] = str(len(body))
        return web.Response(status=err.status, headers=headers, content_type="application/json")
    return web.Response(
        status=err.status, body=body, headers=headers, content_type="application/json"
    )


def from_framework(exc: web.HTTPException) -> errors.RegistryError:
    """An error aiohttp raised itself, as the catalogue's error for its status."""
    code = _FRAMEWORK.get(exc.status)
    if code is None:
        code = errors.INTERNAL if exc.status >= 500 else errors.REQUEST_MALFORMED
    allow = exc.headers.get("Allow")
    return errors.RegistryError(code, headers={"Allow": allow} if allow is not None else {})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    head = request.method == "HEAD"
    try:
        return await handler(request)
    except errors.RegistryError as err:
        if err.status >= 500:
            log.error("request failed", extra={"path": request.path, "error": str(err)})
        return render(err, head=head)
    except StorageFull as exc:
        # Expected while the volume is full: one line per refused request, no traceback.
        log.warning(
            "write refused: storage full",
            extra={"method": request.method, "path": request.path, "reason": str(exc)},
        )
        retry = {"Retry-After": str(errors.STORAGE_FULL_RETRY_AFTER)}
        return render(errors.RegistryError(errors.STORAGE_FULL, headers=retry), head=head)
    except StorageConflict as exc:
        # Another request (on another replica) changed the upload first: nothing of this
        # one was applied; the client asks where the upload is and goes on from there.
        log.warning("write lost a race", extra={"path": request.path, "key": str(exc)})
        return render(errors.RegistryError(errors.UPLOAD_CONFLICT), head=head)
    except BackendUnavailable as exc:
        # Expected during an outage: one line per request, no traceback.
        log.warning(
            "request failed: back end unavailable",
            extra={"path": request.path, "error": str(exc)},
        )
        retry = {"Retry-After": str(errors.BACKEND_UNAVAILABLE_RETRY_AFTER)}
        message = f"service unavailable: the registry cannot reach its {exc.backend}"
        unavailable = errors.RegistryError(
            errors.BACKEND_UNAVAILABLE, message=message, headers=retry
        )
        return render(unavailable, head=head)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        return render(from_framework(exc), head=head)
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return render(errors.RegistryError(errors.INTERNAL), head=head)
