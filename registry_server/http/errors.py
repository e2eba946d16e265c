"""The one place registry errors become HTTP responses."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from registry_server.http.context import Handler
from registry_server.protocol import errors

log = logging.getLogger("registry_server.http")

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
ROUTE_UNKNOWN = errors.ErrorCode("NOT_FOUND", "endpoint not found", 404)
METHOD_NOT_ALLOWED = errors.ErrorCode("UNSUPPORTED", "method not allowed", 405)


def render(err: errors.RegistryError, head: bool = False) -> web.Response:
    headers = {**API_VERSION_HEADER, **err.headers}
    body = json.dumps(err.body()).encode()
    if head:
        headers["Content-Length"] = str(len(body))
        return web.Response(status=err.status, headers=headers, content_type="application/json")
    return web.Response(
        status=err.status, body=body, headers=headers, content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.RegistryError as err:
        if err.status >= 500:
            log.error("request failed", extra={"path": request.path, "error": str(err)})
        return render(err, head=request.method == "HEAD")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return render(errors.RegistryError(errors.INTERNAL), head=request.method == "HEAD")
