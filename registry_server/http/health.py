"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from registry_server.http.context import Handler, services
from registry_server.http.errors import error_middleware

REQUESTS = Counter("berth_http_requests_total", "HTTP requests served", ["method", "status"])
LATENCY = Histogram("berth_http_request_seconds", "HTTP request latency", ["method"])
# Label values come from this set only: a client inventing methods must not grow the series.
# Under the kubelet's probe timeout (2 s in the operator's pod template).
PROBE_TIMEOUT = 1.5
_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        method = request.method if request.method in _METHODS else "other"
        REQUESTS.labels(method, str(status)).inc()
        LATENCY.labels(method).observe(time.perf_counter() - start)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready when both back ends answer: the metadata index and the blob store (with
    PostgreSQL and S3, a replica that cannot reach either leaves the Service)."""
    svc = services(request)
    for what, ping in (("index", svc.index.ping), ("blob store", svc.blobs.store.ping)):
        try:
            await asyncio.wait_for(ping(), PROBE_TIMEOUT)
        except Exception as exc:  # any failure means not ready; say which and why
            name = "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            return web.Response(status=503, text=f"{what} unavailable: {name}\n")
    return web.Response(text="ok\n")


async def readyz_writes(request: web.Request) -> web.Response:
    """Ready for pushes: the index answers and the volume is not full. (``/readyz`` stays
    ready on a full volume: pulls and deletes still work.)"""
    not_ready = await readyz(request)
    if not_ready.status != 200:
        return not_ready
    space = services(request).space
    if space.full:
        return web.Response(status=503, text=f"{space.describe()}\n")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    """The listener of ``http.metrics_addr``: ``/metrics`` and nothing else, so that what
    routes the registry's port to the world (an Ingress) never exposes it."""
    app = web.Application(middlewares=[error_middleware])
    app.router.add_route("GET", "/metrics", metrics)
    return app
